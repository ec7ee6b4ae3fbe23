"""What Windows and macOS leave in image folders is ignored like a dot-file: Thumbs.db
and desktop.ini in a class folder (even one that holds nothing else), and the
__MACOSX folder a zip made on a Mac unpacks to."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.train.data import DatasetSpec, load_site_data

CLASSES = ["benign", "malignant"]


def _load(root: Path):  # type: ignore[no-untyped-def]
    return load_site_data(DatasetSpec.from_config({
        "name": "derm", "kind": "images", "path": str(root), "task": "binary",
        "classes": CLASSES, "val_fraction": 0.0, "image_size": 8}))


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_windows_and_macos_litter_is_ignored(
        tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "derm"
    base = root / "train" if layout == "split" else root
    _image(base / "benign" / "b0.png", 10)
    _image(base / "benign" / "b1.png", 20)
    (base / "benign" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnail cache")
    (base / "benign" / "desktop.ini").write_text("[.ShellClassInfo]\r\n")
    (base / "malignant").mkdir()
    (base / "malignant" / "THUMBS.DB").write_bytes(b"\xd0\xcf\x11\xe0")  # nothing else here
    for top in (root, base):  # a Mac's zip: __MACOSX/<class>/._x.png beside the folders
        (top / "__MACOSX" / "benign").mkdir(parents=True, exist_ok=True)
        (top / "__MACOSX" / "benign" / "._b0.png").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level(logging.WARNING, logger="fedge.train"):
        d = _load(root)
    assert d.train.y.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(d.train.x.reshape(2, -1).mean(axis=1), [10 / 255, 20 / 255],
                               rtol=1e-6)
    assert "skipped" not in caplog.text  # litter is not a skipped image worth a warning
