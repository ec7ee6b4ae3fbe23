"""`fedge agent enrol` warns of a coordinator endpoint on loopback (s17 endpoints L3).

``fedge console init --coordinator tcp://localhost:P`` (or 127.x, or ::1), natural on
the console's own machine, ships enrolment files telling every appliance to dial
itself; they enrolled without a word and never connected. The enrolment still
installs (the coordinator may run on the appliance: a demo, a test), with a warning
saying what to do. The real command.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore


def enrol(tmp_path, coordinator: str) -> subprocess.CompletedProcess[str]:
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint=coordinator)
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    return subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol",
                           "--state-dir", str(tmp_path / "state"), str(file)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("coordinator", ["tcp://localhost:7000", "tcp://127.0.0.1:7000",
                                         "tcp://[::1]:7000"])
def test_a_loopback_coordinator_is_warned_of_at_enrol(tmp_path, coordinator) -> None:
    r = enrol(tmp_path, coordinator)
    assert r.returncode == 0, r.stderr
    assert "enrolled site h1" in r.stdout
    assert (f"fedge agent enrol: warning: the coordinator endpoint {coordinator} is a "
            "loopback address: the agent will dial this machine itself. Unless the "
            "coordinator runs here, the console must be initialised with the address the "
            "appliances reach the coordinator at (fedge console init --coordinator "
            "tcp://HOST:PORT)") in r.stderr, r.stderr


def test_a_coordinator_elsewhere_is_not(tmp_path) -> None:
    r = enrol(tmp_path, "tcp://fl-coordinator.invalid:7000")  # nothing is resolved
    assert r.returncode == 0, r.stderr
    assert "loopback" not in r.stderr and "warning" not in r.stderr.lower()


def test_agent_check_says_it_too() -> None:
    from fedge.agent.process import coordinator_endpoint_warnings

    (line,) = coordinator_endpoint_warnings("tcp://[::1]:7000")
    assert line.startswith("the coordinator endpoint tcp://[::1]:7000 is a loopback address")
    assert coordinator_endpoint_warnings("tcp://192.0.2.7:7000") == []
