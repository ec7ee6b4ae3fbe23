"""An image whose EXIF Orientation says its pixels are stored turned (a phone's or a
dermatoscope's JPEG) is trained on as a viewer shows it, the same as an upright copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.train.data import DatasetSpec, load_site_data

SIZE = 16
ORIENTATION = 0x0112
# stored pixels -> upright, as the EXIF tag value says (TIFF 6.0's Orientation)
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _upright() -> Image.Image:
    """Bright top-left quarter, dark elsewhere: every turn and flip of it differs."""
    a = np.zeros((SIZE, SIZE), np.uint8)
    a[: SIZE // 2, : SIZE // 2] = 255
    a[0, :] = 128  # and a grey top row, so a transpose differs from a rotation
    return Image.fromarray(a)


def _load(root: Path) -> np.ndarray:
    d = load_site_data(DatasetSpec.from_config({
        "name": "derm", "kind": "images", "path": str(root), "task": "binary",
        "classes": ["benign", "malignant"], "val_fraction": 0.0, "image_size": SIZE}))
    return d.train.x[0, 0]


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_image_stored_turned_is_loaded_upright(tmp_path: Path, orientation: int,
                                                  suffix: str) -> None:
    upright = _upright()
    stored = upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    for name, image, tag in (("upright", upright, None), ("turned", stored, exif)):
        (tmp_path / name / "benign").mkdir(parents=True)
        kw = {"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}
        image.save(tmp_path / name / "benign" / f"x{suffix}",
                   **({"exif": tag} if tag is not None else {}), **kw)
    want, got = _load(tmp_path / "upright"), _load(tmp_path / "turned")
    if suffix == ".png":
        np.testing.assert_array_equal(got, want)
    else:  # JPEG's blocks round differently once turned: close, and far from any other turn
        np.testing.assert_allclose(got, want, atol=0.08)
    assert not np.allclose(np.asarray(stored, np.float32) / 255, want, atol=0.08)
