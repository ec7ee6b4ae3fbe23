"""Peak memory of the training paths whose memory once grew with the data: DP-SGD's
private gradient, and a survival split's evaluation, each against an anchor measured
in the same run.

  dp: one DP-SGD step's private gradient (`fedge.train.privacy.private_gradient`) of
      a Poisson batch of 256 64x64 images through resnet_small (width 16), computed,
      clipped and summed 32 examples at a time (the product's DP_CHUNK), against the
      same batch taken whole (chunk = 256: what the agent did before). Each in a fresh
      process; the figure is the growth of its peak resident size over the process's
      peak before the step (torch's CPU tensors are not seen by tracemalloc).
  cox: `fedge.train.api.evaluate` of a 20,000-row survival split (cox_linear), whose
      loss once built n x n matrices (~6.5 GiB there), against the same evaluation
      of 2,000 rows (the anchor: a linear evaluation grows 10x from it, a quadratic
      one 100x).

    python bench/train_memory.py

Ends with: RESULT dp_chunk_mb=... dp_whole_mb=... dp_chunk_vs_whole=...
cox_20k_mb=... cox_2k_mb=... cox_20k_vs_2k=...
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

DP = textwrap.dedent("""
    import json, resource, sys, torch
    from fedge.train.models import ModelSpec, build_model
    from fedge.train.privacy import private_gradient
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet_small", {"classes": 3, "width": 16}))
    x, y = torch.randn(256, 1, 64, 64), torch.randint(0, 3, (256,))
    terms = lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction="none")
    private_gradient(model, terms, x[:2], y[:2], coupled=False, max_grad_norm=1.0,
                     noise_multiplier=1.0, expected_batch=2.0, chunk=2)  # warm up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    private_gradient(model, terms, x, y, coupled=False, max_grad_norm=1.0,
                     noise_multiplier=1.0, expected_batch=256.0, chunk=int(sys.argv[1]))
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
""")

COX = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from fedge.train.api import ModelSpec, build_model, evaluate, flatten
    from fedge.train.data import SiteData, Split

    def site(n, seed):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(n, 39)).astype(np.float32)
        y = np.stack([rng.random(n) < 0.3, rng.integers(1, 400, size=n)], 1)
        return SiteData("big", "survival", [f"f{i}" for i in range(39)],
                        train=Split(x[:10], y[:10].astype(np.float32)),
                        val=Split(x, y.astype(np.float32)))

    spec = ModelSpec("cox_linear", {"in_features": 39})
    w = flatten(build_model(spec))
    evaluate(spec, w, site(200, 1), "val")  # warm up
    big = site(int(sys.argv[1]), 0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    evaluate(spec, w, big, "val")
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024))
""")


def peak_mb(script: str, arg: int) -> float:
    out = subprocess.run([sys.executable, "-c", script, str(arg)], capture_output=True,
                         text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise SystemExit(f"train_memory: a measurement failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


# An anchor below this is no measurement (a peak that did not move: e.g. a process
# whose earlier peak already covered the step); its ratio would read as a pass
MIN_ANCHOR_MB = 50.0


def main() -> int:
    dp_chunk, dp_whole = peak_mb(DP, 32), peak_mb(DP, 256)
    if dp_whole < MIN_ANCHOR_MB:
        raise SystemExit(f"train_memory: the whole-batch DP step raised the peak by "
                         f"{dp_whole:.0f} MiB only (under {MIN_ANCHOR_MB:g}): no anchor, "
                         "no ratio")
    print(f"DP-SGD step, 256 images 64x64, resnet_small: chunks of 32 +{dp_chunk:.0f} MiB, "
          f"whole batch +{dp_whole:.0f} MiB")
    cox_big, cox_small = peak_mb(COX, 20_000), peak_mb(COX, 2_000)
    print(f"survival evaluation: 20,000 rows +{cox_big:.0f} MiB, 2,000 rows "
          f"+{cox_small:.0f} MiB")
    print(f"RESULT dp_chunk_mb={dp_chunk:.0f} dp_whole_mb={dp_whole:.0f} "
          f"dp_chunk_vs_whole={dp_chunk / max(dp_whole, 1.0):.2f} "
          f"cox_20k_mb={cox_big:.0f} cox_2k_mb={cox_small:.0f} "
          f"cox_20k_vs_2k={cox_big / max(cox_small, 1.0):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
