"""Images decoded by a pool of workers load exactly as reading the files one by one did:
the same pixels, in the same rows and splits, and the same first refusal (bigsite
review H3: the loader decoded one file at a time and opened each twice).

The reference here reads the files the way the loader documents, one after the other:
split folders sorted, classes in declared order, files by name; each file checked
(``verify``) and decoded from its path, turned as its EXIF orientation says, 8-bit
modes through Pillow's greyscale / 255, 16-bit greyscale / 65535, resized to
``image_size``; then ``val_fraction`` of the training images held out by a
permutation fixed by ``seed``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import fedge.train.data as data
from fedge.train.data import DataError, DatasetSpec, load_site_data

SIZE = 24
CLASSES = ["benign", "malignant", "normal"]


def _image(path: Path, kind: int, rng: np.random.Generator) -> None:
    """One small image of one of eight kinds: 8-bit and 16-bit greyscale, colour, with
    alpha, palette PNGs; JPEGs with and without an EXIF orientation; BMP; 16-bit TIFF."""
    grey = rng.integers(0, 256, (int(rng.integers(12, 40)), int(rng.integers(12, 40))),
                        dtype=np.uint8)
    im = Image.fromarray(grey)
    if kind == 0:
        im.save(path.with_suffix(".png"))
    elif kind == 1:
        Image.fromarray(grey.astype(np.uint16) * 257).save(path.with_suffix(".png"))
    elif kind == 2:
        Image.fromarray(np.dstack([grey, grey[::-1], 255 - grey])).save(path.with_suffix(".png"))
    elif kind == 3:
        Image.fromarray(np.dstack([grey] * 4)).save(path.with_suffix(".png"))
    elif kind == 4:
        im.convert("P").save(path.with_suffix(".png"))
    elif kind == 5:
        exif = Image.Exif()
        exif[0x0112] = int(rng.integers(2, 9))  # a phone's sideways JPEG
        im.convert("RGB").save(path.with_suffix(".jpg"), quality=85, exif=exif)
    elif kind == 6:
        im.save(path.with_suffix(".bmp"))
    else:
        Image.fromarray(grey.astype(np.uint16) * 200).save(path.with_suffix(".tif"))


def _folder(root: Path, per_class: int, *, splits: tuple[str, ...] = (), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits or ("",):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _image(root / split / cls / f"{i:04d}", int(rng.integers(0, 8)), rng)
    return root


def _reference_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            grey = Image.fromarray(np.asarray(im).astype(np.float32) / np.float32(65535))
            return np.clip(np.asarray(grey.resize((SIZE, SIZE)), np.float32), 0.0, 1.0)
        return np.asarray(im.convert("L").resize((SIZE, SIZE)), np.float32) / 255.0


def _reference(root: Path, val_fraction: float, seed: int, cv_folds: int = 0,
               cv_fold: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The splits, reading each file in turn, as the loader documents."""
    split_folders = sorted(p.name for p in root.iterdir()) if (root / "train").is_dir() else [""]
    named = {"": "train", "train": "train", "val": "val", "test": "test"}
    xs, ys, marks = [], [], []
    for split in split_folders:
        for label, cls in enumerate(CLASSES):
            for path in sorted((root / split / cls).iterdir()):
                xs.append(_reference_pixels(path)[None])
                ys.append(label)
                marks.append(named[split])
    x, y, mark = np.stack(xs), np.asarray(ys, np.int64), np.asarray(marks)
    rows = {name: np.flatnonzero(mark == name) for name in ("train", "val", "test")}
    if cv_folds:  # the test split is a fold of the training images
        fold = np.random.default_rng(seed).permutation(rows["train"].size) % cv_folds
        rows["train"], rows["test"] = (rows["train"][fold != cv_fold],
                                       rows["train"][fold == cv_fold])
    if rows["val"].size == 0 and val_fraction > 0:
        perm = np.random.default_rng(seed).permutation(rows["train"])
        n_val = round(val_fraction * perm.size)
        rows["val"], rows["train"] = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return {name: (x[idx], y[idx]) for name, idx in rows.items() if idx.size}


def _load(root: Path, **kw: object) -> data.SiteData:
    return load_site_data(DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": str(root), "task": "multiclass",
        "classes": CLASSES, "image_size": SIZE, **kw}))


def _pool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("fedge-images")]


@pytest.mark.parametrize("workers", [1, 4])
@pytest.mark.parametrize("splits", [(), ("test", "train", "val")], ids=["flat", "split-folders"])
def test_every_pixel_row_and_split_is_what_reading_the_files_one_by_one_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int,
        splits: tuple[str, ...]) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _folder(tmp_path, 30, splits=splits)
    got = _load(root, val_fraction=0.25, seed=7)
    want = _reference(root, 0.25, 7)
    assert {name for name in ("train", "val", "test") if getattr(got, name) is not None} \
        == set(want)
    for name, (x, y) in want.items():
        part = getattr(got, name)
        assert part.x.dtype == np.float32 and part.x.flags.c_contiguous
        assert part.x.shape == x.shape and part.x.tobytes() == x.tobytes(), name
        assert part.y.tolist() == y.tolist(), name
    assert _pool_threads() == []


@pytest.mark.parametrize("workers", [1, 3])
def test_under_cv_folds_the_folds_are_the_same_and_a_test_folder_is_still_checked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _folder(tmp_path, 12, splits=("test", "train"), seed=1)
    got = _load(root, val_fraction=0.25, cv_folds=3, cv_fold=1, seed=3)
    want = _reference(root, 0.25, 3, cv_folds=3, cv_fold=1)
    assert set(want) == {"train", "val", "test"}
    for name, (x, y) in want.items():
        part = getattr(got, name)
        assert part.x.tobytes() == x.tobytes() and part.y.tolist() == y.tolist(), name
    (root / "test" / "normal" / "0000x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"0000x\.png: not a readable image"):
        _load(root, val_fraction=0.25, cv_folds=3, cv_fold=1, seed=3)


def _break_crc(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    at = raw.find(b"IDAT")
    raw[at + 4 + int.from_bytes(raw[at - 4:at], "big")] ^= 0xFF
    path.write_bytes(bytes(raw))


def _grey_pngs(root: Path, per_class: int) -> Path:
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 20), i, np.uint8)).save(root / cls / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("workers", [1, 4])
def test_the_refusal_names_the_first_bad_file_in_reading_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _grey_pngs(tmp_path, 60)
    first = root / "benign" / "0050.png"
    _break_crc(first)  # read late in its class, after many good files
    (root / "benign" / "0055.png").write_bytes(b"not an image")
    (root / "malignant" / "0003.png").write_bytes(b"not an image either")
    Image.new("L", (12000, 12000)).save(root / "normal" / "0001.png")  # a bomb, later
    with pytest.raises(SyntaxError) as serial, Image.open(first) as im:
        im.verify()  # what reading it alone says of it
    with pytest.raises(DataError) as refused:
        _load(root, val_fraction=0.2)
    assert str(refused.value) == f"{first}: not a readable image: {serial.value}"
    assert refused.value.public == "an image file of class 'benign': not a readable image"
    assert _pool_threads() == []


@pytest.mark.parametrize("workers", [1, 4])
def test_a_decompression_bomb_among_many_is_refused_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _grey_pngs(tmp_path, 40)
    Image.new("L", (12000, 12000)).save(root / "malignant" / "0020.png")  # 144 M pixels
    with pytest.raises(DataError, match=r"malignant/0020\.png: image too large to load "
                       r"safely: Image size \(144000000 pixels\)") as refused:
        _load(root)
    assert refused.value.public == ("an image file of class 'malignant': image too large "
                                    "to load safely")


@pytest.mark.parametrize("workers", [1, 4])
def test_an_unreadable_image_before_a_folder_of_no_images_is_refused_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _grey_pngs(tmp_path, 30)
    for f in (root / "normal").iterdir():
        f.unlink()
    (root / "normal" / "scan.dcm").write_bytes(b"DICM")
    (root / "malignant" / "0029.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"malignant/0029\.png: not a readable image"):
        _load(root)
    # mended, the class folder read after it is refused in its turn
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "malignant" / "0029.png")
    with pytest.raises(DataError, match=r"normal: holds 1 file\(s\) \(\.dcm\) and not one"):
        _load(root)


@pytest.mark.parametrize("workers", [1, 4])
def test_a_folder_of_no_images_before_an_unreadable_image_is_refused_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(data, "IMAGE_DECODE_WORKERS", workers)
    root = _grey_pngs(tmp_path, 30)
    for f in (root / "benign").iterdir():
        f.unlink()
    (root / "benign" / "notes.txt").write_text("read me")
    (root / "normal" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"benign: holds 1 file\(s\) \(\.txt\) and not one"):
        _load(root)
