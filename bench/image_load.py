"""Time and peak memory of loading a site's image folder through
`fedge.train.data.load_site_data` (what the agent's load_data calls), each against an
anchor measured in the same run: Pillow decoding the same files in a plain loop, one
after the other, into one preallocated array (what a serial loader costs at least).

Two folders, two classes each, loaded with val_fraction 0.2 at image_size 128:
5,000 grey 128x128 PNGs and 1,000 colour 512x512 JPEGs (quality 90). The loader
once decoded one file at a time, opening each twice, and held a list of the images,
their np.stack and the split copies: about 2.8x the arrays at its peak.

Each load runs in a fresh process; its memory figure is the growth of the process's
peak resident size over the peak after its imports, over the arrays it returns.

    python bench/image_load.py [png_count] [jpeg_count]

Ends with: RESULT img_per_s=... img_vs_pil_loop=... img_peak_x=... jpeg_img_per_s=...
jpeg_vs_pil_loop=... jpeg_peak_x=... workers=...  (img_ the PNG folder; _vs_pil_loop:
images per second, fedge over the plain loop's; _peak_x: peak growth over the arrays)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

SIZE = 128

MAKE = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from PIL import Image
    root, n, side, ext = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        scene = (np.sin(xx / (6 + i % 7)) + np.cos(yy / (9 + i % 5))) * 60 + 128
        pixels = (scene + rng.normal(0, 8, scene.shape)).clip(0, 255).astype(np.uint8)
        path = root / "ab"[i % 2] / f"img{i:06d}.{ext}"
        if ext == "png":
            Image.fromarray(pixels).save(path)
        else:
            Image.fromarray(pixels).convert("RGB").save(path, quality=90)
""")

FEDGE = textwrap.dedent("""
    import json, resource, sys, time
    import PIL.Image, PIL.PngImagePlugin, PIL.JpegImagePlugin  # imported by any image load
    import fedge.train.data as data
    if sys.argv[3] != "default":
        data.IMAGE_DECODE_WORKERS = int(sys.argv[3])
    spec = data.DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": sys.argv[1], "task": "binary",
        "classes": ["a", "b"], "image_size": int(sys.argv[2]), "val_fraction": 0.2})
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    site = data.load_site_data(spec)
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    parts = [s for s in (site.train, site.val, site.test) if s is not None]
    print(json.dumps({"s": seconds, "n": sum(len(s) for s in parts), "peak": peak,
                      "arrays": sum(s.x.nbytes + s.y.nbytes for s in parts),
                      "workers": getattr(data, "IMAGE_DECODE_WORKERS", 1)}))
""")

PIL_LOOP = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import numpy as np
    from PIL import Image
    import PIL.PngImagePlugin, PIL.JpegImagePlugin
    root, size = Path(sys.argv[1]), int(sys.argv[2])
    files = sorted((root / "a").iterdir()) + sorted((root / "b").iterdir())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    x = np.empty((len(files), 1, size, size), dtype=np.float32)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            x[i, 0] = np.asarray(im.convert("L").resize((size, size)), np.float32) / 255.0
    seconds = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    print(json.dumps({"s": seconds, "n": len(files), "peak": peak, "arrays": x.nbytes}))
""")


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], check=True,
                         capture_output=True, text=True, timeout=1800).stdout
    return json.loads(out.strip().splitlines()[-1])


def _folder(tmp: str, name: str, n: int, side: int, ext: str) -> dict[str, dict]:
    root = Path(tmp) / name
    subprocess.run([sys.executable, "-c", MAKE, str(root), str(n), str(side), ext],
                   check=True, timeout=1800)
    plain = _run(PIL_LOOP, str(root), str(SIZE))
    one = _run(FEDGE, str(root), str(SIZE), "1")
    fedge = _run(FEDGE, str(root), str(SIZE), "default")
    for what, got in (("Pillow loop", plain), ("fedge, 1 worker", one),
                      (f"fedge, {fedge['workers']} workers", fedge)):
        print(f"{name:5s} {n:,} {side}x{side} {ext.upper()} -> {SIZE}x{SIZE}, {what:17s}: "
              f"{got['n'] / got['s']:7.0f} images/s, peak +{got['peak'] / 2**20:5.0f} MiB "
              f"({got['peak'] / got['arrays']:.2f}x its {got['arrays'] / 2**20:.0f} MiB of "
              "arrays)")
    return {"plain": plain, "fedge": fedge}


def main() -> None:
    pngs = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    jpegs = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with tempfile.TemporaryDirectory(prefix="fedge-image-load-") as tmp:
        png = _folder(tmp, "png", pngs, 128, "png")
        jpeg = _folder(tmp, "jpeg", jpegs, 512, "jpg")

    def rate(got: dict) -> float:
        return got["n"] / got["s"]

    print(f"RESULT img_per_s={rate(png['fedge']):.0f} "
          f"img_vs_pil_loop={rate(png['fedge']) / rate(png['plain']):.2f} "
          f"img_peak_x={png['fedge']['peak'] / png['fedge']['arrays']:.2f} "
          f"jpeg_img_per_s={rate(jpeg['fedge']):.0f} "
          f"jpeg_vs_pil_loop={rate(jpeg['fedge']) / rate(jpeg['plain']):.2f} "
          f"jpeg_peak_x={jpeg['fedge']['peak'] / jpeg['fedge']['arrays']:.2f} "
          f"workers={png['fedge']['workers']}")


if __name__ == "__main__":
    main()
