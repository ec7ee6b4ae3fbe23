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

The pipe holds the weights once on each side: the child writes the ``.npy`` header
and then the array's own memory, and the coordinator reads the header and then the
array straight into the array it returns (collecting the child's whole output first
and loading it from there held the model twice: 792 MB at peak for a 381 MB model).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
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
    with subprocess.Popen([sys.executable, "-m", "fedge.coordinator.initmodel", "-", "-"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        # stdin and stderr on their own threads, stdout here: the child blocks on
        # none of its pipes, and its weights are read once, into the array itself
        stderr: list[bytes] = []
        helpers = [threading.Thread(target=_feed, args=(proc.stdin, plan.text.encode()),
                                    daemon=True),
                   threading.Thread(target=lambda: stderr.append(proc.stderr.read()),
                                    daemon=True)]
        timer = threading.Timer(timeout_s, kill)
        timer.start()
        for helper in helpers:
            helper.start()
        try:
            stdout = _Counted(proc.stdout)
            weights: np.ndarray | None = None
            try:
                weights = _read_npy(stdout)
            except ValueError as exc:
                failure = str(exc)
            while stdout.read(1 << 20):  # what is left (garbage, a child still writing)
                pass
            proc.wait()
            for helper in helpers:
                helper.join()
        finally:
            timer.cancel()
            if proc.returncode is None:  # interrupted on the way: the child goes too
                proc.kill()
    err = b"".join(stderr).decode(errors="replace")
    if timed_out.is_set() and proc.returncode != 0:
        raise subprocess.TimeoutExpired(proc.args, timeout_s, stderr=err)
    if proc.returncode == 0:
        if weights is not None:
            return np.ascontiguousarray(weights, dtype=np.float32)
        reason = f"its output is not a .npy array ({stdout.count} bytes): {failure}"
    else:
        reason = (err.strip().splitlines() or ["no output"])[-1]
    # The child's reason is usually a PlanError about this model already ("plan field
    # model = 'mlp': cannot be built: ..."): keep its rule, not the whole message
    # inside another.
    prefix = str(PlanError("model", plan.model_name, ""))
    rule = reason[len(prefix):] if reason.startswith(prefix) else f"cannot be built: {reason}"
    raise PlanError("model", plan.model_name, rule)


def _feed(pipe: BinaryIO, data: bytes) -> None:
    with contextlib.suppress(OSError), pipe:  # a child that died early: stderr says why
        pipe.write(data)


class _Counted:
    """A pipe's reader that counts what it gave (the child's output, in the error)."""

    def __init__(self, pipe: BinaryIO) -> None:
        self.pipe = pipe
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.pipe.read(size)
        self.count += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        got = self.pipe.readinto(buffer) or 0  # type: ignore[attr-defined]
        self.count += got
        return got


def _read_npy(stream: _Counted) -> np.ndarray:
    """The ``.npy`` array on ``stream``, its data read straight into the array.

    Raises:
        ValueError: not a ``.npy`` (the magic, the header, its version), an array of
            Python objects (a pickle: refused, as np.load refuses it), or truncated.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not 1.0 or 2.0")
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    flat = np.empty(math.prod(shape), dtype=dtype)
    data = memoryview(flat.view(np.uint8))
    got = 0
    while got < len(data):
        n = stream.readinto(data[got:])
        if n == 0:
            raise ValueError(f"EOF: reading array data, expected {len(data)} bytes "
                             f"got {got}")
        got += n
    return flat.reshape(shape, order="F" if fortran_order else "C")


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
        if out is not None:
            # a pipe: np.save asks a file for its position, and saving to memory first
            # would hold the model twice; the header, then the array's own memory
            weights = np.ascontiguousarray(weights)
            header = np.lib.format.header_data_from_array_1_0(weights)
            try:
                np.lib.format.write_array_header_1_0(out, header)
            except ValueError:  # a header past 64 KiB
                np.lib.format.write_array_header_2_0(out, header)
            out.write(memoryview(weights).cast("B"))
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
