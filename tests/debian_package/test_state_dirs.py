"""Where the packaged configuration puts each role's state, read by the real loaders
the way the services (systemd sets $STATE_DIRECTORY) and an admin shell (it does
not) read it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"


def state_directory(unit: str) -> Path:
    (value,) = [line.split("=", 1)[1]
                for line in (PACKAGING / "systemd" / unit).read_text().splitlines()
                if line.startswith("StateDirectory=")]
    return Path("/var/lib") / value


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """/etc/fedge as installed, with the coordinator's provision file where the
    README puts it (from a real `fedge console init`)."""
    from fedge.console.store import ConsoleStore

    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    etc = tmp_path / "etc" / "fedge"
    (etc / "credentials" / "coordinator").mkdir(parents=True)
    for conf in ("agent.toml", "coordinator.toml"):
        shutil.copy(PACKAGING / "debian" / "etc" / conf, etc / conf)
    shutil.copy(console.home / "coordinator-provision.json",
                etc / "credentials" / "coordinator" / "coordinator-provision.json")
    return etc


@pytest.mark.parametrize("under_systemd", [True, False], ids=["service", "admin-shell"])
def test_agent_and_coordinator_never_share_a_state_directory(
        etc: Path, monkeypatch: pytest.MonkeyPatch, under_systemd: bool) -> None:
    """Both roles write roster.json and tuf/ in their state directory (finding 9): the
    coordinator has its own, and the service and an admin shell agree on which."""
    from fedge.agent.process import load_config as load_agent
    from fedge.coordinator.config import load_config as load_coordinator

    agent_dir = state_directory("fedge-agent.service")
    coordinator_dir = state_directory("fedge-coordinator.service")
    assert coordinator_dir == Path("/var/lib/fedge-coordinator")
    for unit_dir, load, conf in ((coordinator_dir, load_coordinator, "coordinator.toml"),
                                 (agent_dir, load_agent, "agent.toml")):
        if under_systemd:
            monkeypatch.setenv("STATE_DIRECTORY", str(unit_dir))
        else:
            monkeypatch.delenv("STATE_DIRECTORY", raising=False)
        assert load(etc / conf).state_dir == unit_dir, conf
    assert agent_dir == Path("/var/lib/fedge") != coordinator_dir
