"""Run a module as a child that dies with the coordinator.

    python -m fedge.coordinator.child PARENT_PID MODULE [ARGS...]

A coordinator killed with SIGKILL cannot stop its children. Its ONNX export
(torch, up to minutes for a large model) would run on, unowned, writing into the
job directory that the next coordinator finishes again. So on Linux the child
asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), then
checks that the parent has not died before the request (it would have been
re-parented by then), and only then runs ``MODULE`` as ``__main__``.

The signal follows the thread that started the child: the coordinator starts
its export from the event loop's thread, which lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Ask for SIGKILL when the parent dies; exit at once if it already has.

    Raises:
        OSError: prctl refused the request.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        sys.exit(f"parent {parent_pid} has exited; not running")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m fedge.coordinator.child PARENT_PID MODULE [ARGS...]")
    die_with_parent(int(argv[0]))
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
