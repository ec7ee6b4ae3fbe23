"""Image folders as hospitals lay them out: a validation folder next to train/ is the
validation split, anything else there is refused by name, files of another type are
counted aloud, and a flat layout's missing test split names the test/ folder."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.train.data import DataError, DatasetSpec, load_site_data

CLASSES = ["blob", "ring"]


def _images(folder: Path, n: int, value: int) -> None:
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), value, np.uint8)).save(folder / name / f"{i}.png")


def _load(root: Path, **kw: object):  # type: ignore[no-untyped-def]
    return load_site_data(DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": str(root), "task": "binary",
        "classes": CLASSES, "image_size": 8, **kw}))


@pytest.mark.parametrize("folder", ["val", "valid", "validation"])
def test_a_validation_folder_next_to_train_is_the_validation_split(tmp_path: Path,
                                                                    folder: str) -> None:
    _images(tmp_path / "train", 5, 10)
    _images(tmp_path / "test", 2, 20)
    _images(tmp_path / folder, 3, 30)
    d = _load(tmp_path)  # val_fraction 0.2 by default: not used when a folder is there
    assert (len(d.train), len(d.val), len(d.test)) == (10, 6, 4)
    np.testing.assert_allclose(d.val.x, 30 / 255, rtol=1e-6)  # its images, not train's
    np.testing.assert_allclose(d.train.x, 10 / 255, rtol=1e-6)


def test_a_folder_next_to_train_that_names_no_split_is_refused_by_name(tmp_path: Path) -> None:
    _images(tmp_path / "train", 2, 10)
    _images(tmp_path / "holdout", 2, 10)
    with pytest.raises(DataError, match=r"\['holdout'\] next to train/ are not split folders"):
        _load(tmp_path)


def test_files_of_another_type_are_skipped_with_one_warning_naming_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _images(tmp_path, 2, 10)
    for name in ("a.dcm", "b.webp", "noext"):
        (tmp_path / "ring" / name).write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="fedge.train"):
        d = _load(tmp_path, val_fraction=0.0)
    assert len(d.train) == 4
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "3 file(s) skipped" in line and "ring/a.dcm" in line and "ring/noext" in line


def test_a_class_folder_of_unsupported_files_only_is_refused(tmp_path: Path) -> None:
    _images(tmp_path, 2, 10)
    for p in (tmp_path / "ring").iterdir():
        p.unlink()
    for i in range(3):
        (tmp_path / "ring" / f"{i}.dcm").write_bytes(b"DICM")
    with pytest.raises(DataError, match=r"ring: holds 3 file\(s\) \(\.dcm\) and not one "
                                        r"supported image"):
        _load(tmp_path)


def test_the_flat_layouts_missing_test_split_names_the_test_folder(tmp_path: Path) -> None:
    _images(tmp_path, 3, 10)
    d = _load(tmp_path)
    with pytest.raises(ValueError, match=r"put them under <root>/test/<class>/") as err:
        d.split("test")
    assert "train_test_split.csv" not in str(err.value)
