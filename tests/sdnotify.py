"""systemd's side of Type=notify for tests that run a real daemon: a bound datagram
socket, and the WATCHDOG=1 pings a process sends to it."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def notify_socket() -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket under /tmp (its path must stay under 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="fsd", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(tmp, "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def watchdog_gaps(argv: Sequence[str], env: dict[str, str], notify: socket.socket, *,
                  count: int = 6, cwd: Path | None = None) -> list[float]:
    """Run ``argv`` with NOTIFY_SOCKET set to ``notify``, collect ``count`` WATCHDOG=1
    pings after READY=1 (60 s at most), stop it with SIGTERM and return the gaps
    between the pings. Asserts it kept running, pinged ``count`` times and exited 0."""
    env = {**env, "NOTIFY_SOCKET": notify.getsockname()}
    proc = subprocess.Popen(list(argv), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    pings: list[float] = []
    ready = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pings) < count:
            notify.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                lines = notify.recv(4096).decode().splitlines()
            except TimeoutError:
                break
            ready = ready or "READY=1" in lines
            if ready and "WATCHDOG=1" in lines:
                pings.append(time.monotonic())
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert len(pings) == count, (pings, err)
    assert proc.returncode == 0, err
    return [b - a for a, b in itertools.pairwise(pings)]
