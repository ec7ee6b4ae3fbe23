"""`fedge console init --coordinator` takes only an endpoint appliances can dial
(s17 endpoints M1, L3).

The console wrote the endpoint given into every enrolment file; a URL, a non-ASCII
name or an unbracketed IPv6 address was taken here and refused only by libzmq when
the appliance connected. A loopback endpoint (natural on the console's own machine)
sent every appliance to dial itself, without a word. The real CLI, each in a fresh
home.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def init(home: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "console", "--home", str(home),
                           "init", "--coordinator", endpoint], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("endpoint", "says"), [
    ("tcp://https://fl.hospital.example:7700", "without another scheme (https://)"),
    ("tcp://krankenhaus-münchen.example:7700", "xn--krankenhaus-mnchen-y6b.example"),
    ("tcp://::1:7700", "must be in brackets: tcp://[::1]:PORT"),
    ("tcp://fl coordinator.example:7700", "fl coordinator.example"),
])
def test_an_endpoint_no_appliance_could_dial_is_refused_and_nothing_made(
        tmp_path: Path, endpoint: str, says: str) -> None:
    done = init(tmp_path / "home", endpoint)
    assert done.returncode == 2, done
    assert "argument --coordinator" in done.stderr and says in done.stderr, done.stderr
    assert not (tmp_path / "home").exists()


def test_a_loopback_coordinator_is_warned_of_and_still_made(tmp_path: Path) -> None:
    done = init(tmp_path / "home", "tcp://localhost:7700")
    assert done.returncode == 0, done
    assert "warning: --coordinator tcp://localhost:7700 is a loopback address" in done.stderr
    assert (tmp_path / "home" / "coordinator-provision.json").is_file()


@pytest.mark.parametrize("endpoint", ["tcp://fl.hospital.example:7700",
                                      "tcp://[2001:db8::1]:7700", "tcp://192.0.2.7:7700"])
def test_an_address_appliances_can_reach_is_taken_without_a_word(
        tmp_path: Path, endpoint: str) -> None:
    done = init(tmp_path / "home", endpoint)
    assert done.returncode == 0 and done.stderr == "", done
