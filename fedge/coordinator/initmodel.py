"""Build a job's starting model in a child process: ``python -m fedge.coordinator.initmodel``.

The coordinator never imports torch itself: the initial weights of a plan's
model come from this short-lived process (``fedge.train`` under
``torch.manual_seed(plan.seed)``), so the coordinator's memory stays at its own
working set (the scale benchmark's target) and its event loop never stalls on
torch's import.

    python -m fedge.coordinator.initmodel PLAN.toml OUT.npy      exit 0, or 2 + reason
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedge.coordinator.plan import Plan, PlanError, parse_plan


def initial_weights_subprocess(plan: Plan, *, timeout_s: float = 600.0) -> np.ndarray:
    """The plan's initial flat weights, computed in a child process.

    Raises:
        PlanError: the model cannot be built (the child's reason), or the child failed.
    """
    with tempfile.TemporaryDirectory(prefix="fedge-init-") as tmp:
        plan_path, out = Path(tmp) / "plan.toml", Path(tmp) / "w.npy"
        plan_path.write_text(plan.text)
        proc = subprocess.run([sys.executable, "-m", "fedge.coordinator.initmodel",
                               str(plan_path), str(out)], capture_output=True, text=True,
                              timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            # The child's reason is usually a PlanError about this model already
            # ("plan field model = 'mlp': cannot be built: ..."): keep its rule, not
            # the whole message inside another.
            prefix = str(PlanError("model", plan.model_name, ""))
            rule = reason[len(prefix):] if reason.startswith(prefix) else \
                f"cannot be built: {reason}"
            raise PlanError("model", plan.model_name, rule)
        return np.ascontiguousarray(np.load(out), dtype=np.float32)


def main(argv: list[str]) -> int:
    from fedge.coordinator.service import torch_initial_weights

    if len(argv) != 2:
        print("usage: python -m fedge.coordinator.initmodel PLAN.toml OUT.npy", file=sys.stderr)
        return 2
    try:
        text = Path(argv[0]).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"initmodel: cannot read plan {argv[0]}: {exc}", file=sys.stderr)
        return 2
    try:
        weights = torch_initial_weights(parse_plan(text))
    except PlanError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        with open(argv[1], "wb") as fh:  # np.save(path) would append .npy to the name
            np.save(fh, weights)
    except OSError as exc:
        print(f"initmodel: cannot write {argv[1]}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
