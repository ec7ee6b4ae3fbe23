"""What the image loader ignores is no new version of an image set: Windows' Thumbs.db
and desktop.ini and a Mac zip's __MACOSX folder, like dot-files (README.Debian: such
a file appearing on a share must not make the next job re-read 500k images)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fedge.agent.trainer import source_version


def _image_set(root):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")


def test_files_the_loader_ignores_are_no_new_version(tmp_path) -> None:
    root = tmp_path / "scans"
    _image_set(root)
    v0 = source_version(root)
    (root / "train" / "a" / "Thumbs.db").write_bytes(b"thumbnails")
    (root / "train" / "b" / "DESKTOP.INI").write_bytes(b"[.ShellClassInfo]")
    (root / "__MACOSX" / "train" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "a" / "._0.png").write_bytes(b"fork")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"x")
    assert source_version(root) == v0


def test_an_image_added_is_still_a_new_version(tmp_path) -> None:
    root = tmp_path / "scans"
    _image_set(root)
    v0 = source_version(root)
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(root / "train" / "a" / "9.png")
    assert source_version(root) != v0
