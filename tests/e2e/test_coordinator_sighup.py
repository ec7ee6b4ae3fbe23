"""SIGHUP to a running `fedge coordinator`: an operator's habitual `kill -HUP` to
"reload". It used to end the process at once, without a log line, and systemd counts
a death by SIGHUP as clean (Restart=on-failure does not restart it). Now it is
logged, and the coordinator goes on serving; SIGTERM still stops it."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.e2e


def test_sighup_is_logged_as_unsupported_and_the_coordinator_keeps_running(federation):
    fed = federation()
    fed.add_site("a", [])
    fed.enrol_in_store()
    proc = fed.start_coordinator()
    wait_for(lambda: "coordinator listening on" in proc.output(), 30, "the coordinator loop")
    proc.p.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload is not supported" in proc.output(), 10, "the SIGHUP warning")
    time.sleep(1.0)
    assert proc.p.poll() is None, proc.output()
    assert "use systemctl restart" in proc.output()
    # still serving: its loop goes on (a second SIGHUP is logged again), and SIGTERM
    # stops it cleanly
    proc.p.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.output().count("reload is not supported") == 2, 10,
             "the second SIGHUP warning")
    assert proc.stop(30) == 0, proc.output()
