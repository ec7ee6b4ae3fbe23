"""Image folders: labels come from the declared class list, and pixels keep their depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.train.data import DataError, DatasetSpec, load_site_data


def _folders(root: Path, classes: list[str], *, n: int = 2, value: int = 100,
             dtype: type = np.uint8) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((16, 16), value, dtype)).save(root / name / f"{i}.png")
    return root


def _load(root: Path, classes: list[str], task: str = "multiclass", **kw: object):  # type: ignore[no-untyped-def]
    return load_site_data(DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": str(root), "task": task,
        "classes": classes, "val_fraction": 0.0, "image_size": 16, **kw}))


CLASSES = ["benign", "malignant", "normal"]


def test_a_class_has_the_same_label_at_a_site_that_lacks_another_class(tmp_path: Path) -> None:
    full = _load(_folders(tmp_path / "a", CLASSES), CLASSES)
    # site B holds no 'malignant' folder: its 'normal' images are still label 2
    part = _load(_folders(tmp_path / "b", ["benign", "normal"], value=7), CLASSES)
    assert sorted(set(full.train.y.tolist())) == [0, 1, 2] and full.n_classes == 3
    assert sorted(set(part.train.y.tolist())) == [0, 2] and part.n_classes == 3


def test_declared_order_not_folder_order_decides_the_label(tmp_path: Path) -> None:
    root = _folders(tmp_path, ["a_first", "z_last"])
    for v in (0, 255):
        Image.fromarray(np.full((16, 16), v, np.uint8)).save(root / "z_last" / f"v{v}.png")
    d = _load(root, ["z_last", "a_first"], task="binary")
    n_z = len(list((root / "z_last").iterdir()))
    assert d.train.y.tolist() == [0.0] * n_z + [1.0] * 2


def test_dot_folders_and_dot_files_are_ignored(tmp_path: Path) -> None:
    root = _folders(tmp_path, ["benign", "malignant"])
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("L", (16, 16)).save(root / ".ipynb_checkpoints" / "0.png")
    (root / "benign" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS copy
    d = _load(root, ["benign", "malignant"], task="binary")
    assert len(d.train) == 4 and sorted(set(d.train.y.tolist())) == [0.0, 1.0]


def test_a_folder_not_among_the_declared_classes_is_refused_by_name(tmp_path: Path) -> None:
    root = _folders(tmp_path, ["benign", "malignant", "unsure"])
    with pytest.raises(DataError, match=r"\['unsure'\] are not among datasets\.classes"):
        _load(root, ["benign", "malignant"], task="binary")
    tt = _folders(tmp_path / "tt" / "train", ["benign", "malignant"])
    _folders(tt.parent / "test", ["benign", "other"])
    with pytest.raises(DataError, match=r"test: class folder\(s\) \['other'\]"):
        _load(tt.parent, ["benign", "malignant"], task="binary")


@pytest.mark.parametrize(("classes", "task", "rule"), [
    (None, "binary", "kind 'images' needs datasets.classes"),
    ([], "binary", "kind 'images' needs datasets.classes"),
    (["benign"], "multiclass", "at least 2 classes"),
    (["a", "b", "c"], "binary", "exactly 2"),
    (["a", "a"], "binary", "twice"),
    (["a", ".hidden"], "binary", "plain folder names"),
    (["a", "b/c"], "binary", "plain folder names"),
    ("ab", "binary", "must be a list"),
])
def test_the_class_list_is_checked_before_any_file_is_read(
        classes: object, task: str, rule: str) -> None:
    table = {"name": "scans", "kind": "images", "path": "/nonexistent", "task": task}
    if classes is not None:
        table["classes"] = classes
    with pytest.raises(ValueError, match=rule):
        DatasetSpec.from_config(table)


def test_classes_on_a_table_data_set_is_refused() -> None:
    with pytest.raises(ValueError, match="takes none"):
        DatasetSpec.from_config({"name": "t", "kind": "numpy", "path": "x.npz",
                                 "task": "binary", "classes": ["a", "b"]})


@pytest.mark.parametrize("value", [1000, 20000, 60000])
def test_16_bit_greyscale_keeps_its_intensity(tmp_path: Path, value: int) -> None:
    root = _folders(tmp_path, ["a", "b"], value=value, dtype=np.uint16)
    assert Image.open(root / "a" / "0.png").mode == "I;16"
    d = _load(root, ["a", "b"], task="binary")
    np.testing.assert_allclose(d.train.x, value / 65535, rtol=1e-5)


def test_16_bit_and_8_bit_of_one_scene_load_alike(tmp_path: Path) -> None:
    scene = np.linspace(0, 255, 32 * 32).reshape(32, 32).round().astype(np.uint8)
    for name, arr in (("eight", scene), ("sixteen", scene.astype(np.uint16) * 257)):
        (tmp_path / name / "x").mkdir(parents=True)
        (tmp_path / name / "y").mkdir()
        Image.fromarray(arr).save(tmp_path / name / "x" / "0.png")
        Image.fromarray(arr).save(tmp_path / name / "y" / "0.png")
    eight = _load(tmp_path / "eight", ["x", "y"], task="binary")
    sixteen = _load(tmp_path / "sixteen", ["x", "y"], task="binary")
    assert float(sixteen.train.x.max()) > 0.9  # not saturated, not black
    np.testing.assert_allclose(sixteen.train.x, eight.train.x, atol=1.5 / 255)


def test_images_without_a_fixed_range_are_refused_by_name(tmp_path: Path) -> None:
    root = _folders(tmp_path, ["a", "b"])
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(root / "a" / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif: 32-bit float pixels \(mode F\)"):
        _load(root, ["a", "b"], task="binary")
    (root / "a" / "f.tif").unlink()
    Image.fromarray(np.full((16, 16), 70000, np.int32)).save(root / "a" / "i.tif")
    assert Image.open(root / "a" / "i.tif").mode == "I"
    with pytest.raises(DataError, match=r"i\.tif: 32-bit integer pixels.*70000"):
        _load(root, ["a", "b"], task="binary")
    Image.fromarray(np.full((16, 16), 30000, np.int32)).save(root / "a" / "i.tif")
    d = _load(root, ["a", "b"], task="binary")  # within 16 bits: scaled as 16-bit
    assert d.train.x.max() == pytest.approx(30000 / 65535, rel=1e-5)


def test_a_png_whose_pixel_data_fails_its_crc_is_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    root = _folders(tmp_path, ["benign", "malignant"])
    bad = root / "benign" / "0.png"
    data = bytearray(bad.read_bytes())
    at = data.find(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    data[at + 4 + length] ^= 0xFF  # the IDAT chunk's CRC: the pixels may be damaged
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"0\.png.*not a readable image"):
        _load(root, ["benign", "malignant"])


def test_a_decompression_bomb_is_refused_before_its_pixels_are_decoded(
    tmp_path: Path,
) -> None:
    root = _folders(tmp_path, ["benign", "malignant"])
    Image.new("L", (12000, 12000)).save(root / "malignant" / "big.png")  # 144 M pixels
    with pytest.raises(DataError, match=r"big\.png.*too large to load safely"):
        _load(root, ["benign", "malignant"])
