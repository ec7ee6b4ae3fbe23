"""Kernels split over threads still finish when the system refuses threads.

A process may start fewer threads than a call asks for (a cgroup's pids.max,
RLIMIT_NPROC, or, as here, no address space left for another 256 MiB stack).
The parts that got no thread run on the calling thread: same result, no abort.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

_CHILD = """
import numpy as np
from fedge import core

v = np.arange(1 << 20, dtype=np.uint32)  # 2^18 blocks: up to 32 threads
want = v.copy()
core.apply_masks(want, [bytes(16)], [1], threads=1)
core.apply_masks(v, [bytes(16)], [1], threads=32)
print("apply_masks", bool((v == want).all()))
x = np.linspace(-2, 2, 1 << 22, dtype=np.float32)  # up to 64 threads
q1 = core.quantise(x, clip=1.0, bits=8, seed=bytes(16), threads=1)
q64 = core.quantise(x, clip=1.0, bits=8, seed=bytes(16), threads=64)
print("quantise", bool((q1 == q64).all()))
"""

STACK = 256 << 20  # each new thread reserves this much address space
ADDRESS_SPACE = 2_000_000 << 10  # room for the interpreter and a few stacks, not 32


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_STACK, (STACK, STACK))
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer reserves terabytes of shadow memory: no address-space limit fits",
)
def test_threads_the_system_refuses_run_on_the_calling_thread() -> None:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD],
        preexec_fn=_limits, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stderr[-2000:]}"
    assert proc.stdout.split() == ["apply_masks", "True", "quantise", "True"]
