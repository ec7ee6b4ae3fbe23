"""Build a job's starting model in a child process: ``python -m fedge.coordinator.initmodel``.

The coordinator never imports torch itself: the initial weights of a plan's
model come from this short-lived process (``fedge.train`` under
``torch.manual_seed(plan.seed)``), so the coordinator's memory stays at its own
working set (the scale benchmark's target) and its event loop never stalls on
torch's import.

    python -m fedge.coordinator.initmodel PLAN.toml OUT.npy      exit 0, or 2 + reason

PLAN.toml ``-``: the plan is read from stdin; OUT.npy ``-``: the ``.npy`` is written
to stdout (anything else the child prints goes to stderr). The coordinator uses
both: the weights reach it through a pipe, so no file is written on the way and
the only write is its own, the round-0 checkpoint in the job's directory (a full
or read-only $TMPDIR, or one on the full disk, does not matter: fedge.coordinator.
process waits for the state directory's disk alone).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedge.coordinator.plan import Plan, PlanError, parse_plan


def initial_weights_subprocess(plan: Plan, *, timeout_s: float = 600.0) -> np.ndarray:
    """The plan's initial flat weights, computed in a child process (plan in on its
    stdin, weights out on its stdout: nothing written to disk).

    Raises:
        PlanError: the model cannot be built (the child's reason), or the child failed.
        subprocess.TimeoutExpired: the child ran past ``timeout_s`` (it is killed).
    """
    proc = subprocess.run([sys.executable, "-m", "fedge.coordinator.initmodel", "-", "-"],
                          input=plan.text.encode(), capture_output=True, timeout=timeout_s)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode == 0:
        try:
            return np.ascontiguousarray(np.load(io.BytesIO(proc.stdout)), dtype=np.float32)
        except (ValueError, OSError, EOFError) as exc:
            reason = f"its output is not a .npy array ({len(proc.stdout)} bytes): {exc}"
    else:
        reason = (err.strip().splitlines() or ["no output"])[-1]
    # The child's reason is usually a PlanError about this model already ("plan field
    # model = 'mlp': cannot be built: ..."): keep its rule, not the whole message
    # inside another.
    prefix = str(PlanError("model", plan.model_name, ""))
    rule = reason[len(prefix):] if reason.startswith(prefix) else f"cannot be built: {reason}"
    raise PlanError("model", plan.model_name, rule)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m fedge.coordinator.initmodel PLAN.toml OUT.npy "
              "('-': stdin, stdout)", file=sys.stderr)
        return 2
    out: BinaryIO | None = None
    if argv[1] == "-":
        # stdout carries the array alone: what anything else prints (torch's import,
        # a model's constructor) goes to stderr
        sys.stdout.flush()
        out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    try:
        return _build(argv[0], argv[1], out)
    finally:
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()


def _build(plan_arg: str, out_arg: str, out: BinaryIO | None) -> int:
    from fedge.coordinator.service import torch_initial_weights

    try:
        text = sys.stdin.read() if plan_arg == "-" else Path(plan_arg).read_text(
            encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        print(f"initmodel: cannot read plan {plan_arg}: {exc}", file=sys.stderr)
        return 2
    try:
        weights = torch_initial_weights(parse_plan(text))
    except PlanError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        if out is not None:  # a pipe: np.save asks a file for its position
            buf = io.BytesIO()
            np.save(buf, weights)
            out.write(buf.getbuffer())
            out.flush()
        else:
            with open(out_arg, "wb") as fh:  # np.save(path) would append .npy to the name
                np.save(fh, weights)
    except OSError as exc:
        print(f"initmodel: cannot write {out_arg}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
