"""Loading an image folder holds about the arrays it returns, not a list of the images,
their stack and a copy of each split besides (bigsite review H3: 2.8x the arrays at
the peak, 3.5 GB for 20k images at 128x128).

The figure is tracemalloc's peak (Python and numpy allocations: every array the loader
makes; Pillow's own buffers are one image per worker) over one `load_site_data` in a
fresh process, against the bytes of the splits it returns. 2,000 PNGs at 64x64, a
flat folder with val_fraction 0.2 (the validation images are interleaved with the
training ones, so the old loader copied both splits out of the stack):

  before: 2.0x (the list and the stack, then the stack and the split copies)
  after:  about 1.0x (one array, written as the images are decoded; the splits views)
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES, SIDE = 2000, 64
# One float32 array of the images plus the labels and the split indices; the pool's
# in-flight images are a few KiB each. 1.6x leaves room for allocator and library
# differences; the list-stack-copy loader was at 2.0x here (2.8x with bigger images).
BOUND = 1.6

MEASURE = textwrap.dedent("""
    import json, sys, tracemalloc
    import PIL.Image, PIL.PngImagePlugin
    from fedge.train.data import DatasetSpec, load_site_data
    spec = DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": sys.argv[1], "task": "binary",
        "classes": ["benign", "malignant"], "image_size": int(sys.argv[2]),
        "val_fraction": 0.2})
    tracemalloc.start()
    site = load_site_data(spec)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    parts = [s for s in (site.train, site.val, site.test) if s is not None]
    print(json.dumps({"peak": peak, "arrays": sum(s.x.nbytes + s.y.nbytes for s in parts),
                      "rows": [len(s) for s in parts]}))
""")


def test_loading_an_image_folder_holds_about_its_arrays_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8)
    for name in ("benign", "malignant"):
        (tmp_path / name).mkdir()
    for i in range(IMAGES):
        Image.fromarray(np.roll(scene, i, axis=i % 2)).save(
            tmp_path / ("benign", "malignant")[i % 2] / f"{i:05d}.png")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path), str(SIDE)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["rows"] == [IMAGES * 4 // 5, IMAGES // 5]
    assert got["arrays"] == IMAGES * (SIDE * SIDE + 1) * 4
    ratio = got["peak"] / got["arrays"]
    assert ratio < BOUND, (
        f"loading {IMAGES} images of {SIDE}x{SIDE} peaked at {got['peak'] / 2**20:.1f} MiB, "
        f"{ratio:.2f}x its {got['arrays'] / 2**20:.1f} MiB of arrays (bound {BOUND}x)")
