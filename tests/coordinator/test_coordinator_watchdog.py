"""The coordinator as systemd's watchdog sees it: WATCHDOG=1 at half of WatchdogSec from
its loop, whatever its configured pace (a real process, a bound NOTIFY_SOCKET)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair
from tests.sdnotify import notify_socket, watchdog_gaps

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def notify():
    """systemd's side of Type=notify: a bound datagram socket."""
    with notify_socket() as sock:
        yield sock


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
    gaps = watchdog_gaps([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)], env, notify, cwd=REPO)
    assert max(gaps) < 1.8, gaps
