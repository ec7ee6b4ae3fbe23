"""The coordinator as systemd's watchdog sees it: WATCHDOG=1 at half of WatchdogSec from
its loop, whatever its configured pace (a real process, a bound NOTIFY_SOCKET)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify():
    """systemd's side of Type=notify: a bound datagram socket (short path: 108 bytes)."""
    tmp = tempfile.mkdtemp(prefix="fcw", dir="/tmp")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(tmp, "notify"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_slow_tick_does_not_slow_the_watchdog_pings(tmp_path, notify):
    """tick_s = 5 s: an idle loop turn waits that long for a message, longer than
    WatchdogSec (here 2 s). The pings still come every second, so systemd does not
    restart a coordinator that is merely idle."""
    _, secret = save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "coord"}"\nbind = "tcp://127.0.0.1:0"\n'
                   f'curve_key = "{secret}"\n'
                   f'roster_public_key = "{Identity.generate().public_bytes().hex()}"\n'
                   "tick_s = 5.0\n")
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "2000000",
           "PYTHONUNBUFFERED": "1"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    pings: list[float] = []
    ready = False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pings) < 6:
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
    assert len(pings) == 6, (pings, err)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) < 1.8, gaps
    assert proc.returncode == 0, err
