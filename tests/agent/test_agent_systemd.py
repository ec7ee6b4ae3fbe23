"""The agent as systemd sees it while the coordinator is unreachable: READY once it
has loaded its enrolment and is connecting, watchdog pings while it retries, and a
software update in trial left unconfirmed (only a heartbeat ack confirms it).

Everything is real: the unit's launcher and preflight, the agent process, a bound
NOTIFY_SOCKET, an enrolment from a console, and a coordinator port nobody listens on.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from fedge.update.ab import SelfUpdate
from tests.sdnotify import notify_socket, watchdog_gaps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def notify():
    """systemd's side of Type=notify: a bound datagram socket."""
    with notify_socket() as sock:
        yield sock


def agent_bundle(tmp_path: Path, version: str, config: Path) -> Path:
    """A software update whose entry point is this tree's agent (as a wheel slot's is)."""
    data = json.dumps({"version": version, "exec": ["{python}", "-m", "fedge.cli", "agent",
                                                    "run", "--config", str(config)]}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("fedge-bundle.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path = tmp_path / f"fedge-{version}.tar.gz"
    path.write_bytes(buf.getvalue())
    return path


def appliance_in_trial(tmp_path: Path, config_extra: str = "") -> tuple[str, Path]:
    """An appliance enrolled with a console whose coordinator endpoint nobody listens
    on, with software 90.0.0 (this tree's agent) staged for trial. Returns the endpoint
    and the software root."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: coordinator down
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint=endpoint,
                                clock=lambda: datetime.now(UTC))
    file, _ = create_enrolment(console, "hospital-a", valid_for=timedelta(days=7))
    state = tmp_path / "state"
    install_enrolment(file, state)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\nhealth = false\n{config_extra}'
                      "[heartbeat]\ninterval_s = 0.2\ntimeout_s = 1.0\n")
    software = state / "software"
    SelfUpdate(software).stage("90.0.0", agent_bundle(tmp_path, "90.0.0", config),
                               rollout_id="r1")
    return endpoint, software


def test_with_the_coordinator_down_the_agent_is_ready_alive_and_its_update_unconfirmed(
        tmp_path, notify):
    endpoint, software = appliance_in_trial(tmp_path)
    # ExecStartPre, then ExecStart, as in packaging/systemd/fedge-agent.service
    pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                          str(software)], capture_output=True, text=True, timeout=60)
    assert pre.stdout.strip() == "trial", pre.stderr
    # WatchdogSec=2s: pings every second (half of it), so five come in seconds
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "2000000",
           "PYTHONUNBUFFERED": "1"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    proc = subprocess.Popen([sys.executable, "-m", "fedge.update.ab", "exec", "--root",
                             str(software), "--", "/bin/false"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 90  # TimeoutStartSec=120s in the unit
        while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in got) < 5:
            notify.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                got.append(notify.recv(4096).decode())
            except TimeoutError:
                break
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    lines = [line for m in got for line in m.splitlines()]
    assert "READY=1" in lines, (got, err)
    assert f"STATUS=connecting to {endpoint}" in lines
    assert sum(line == "WATCHDOG=1" for line in lines[lines.index("READY=1"):]) >= 5
    assert not any(line.startswith("STATUS=connected") for line in lines)
    assert proc.returncode == 0, err
    # No heartbeat ack, so no confirmation: the trial is still pending, no outcome yet.
    pending = SelfUpdate(software).pending()
    assert pending is not None and pending["version"] == "90.0.0"
    assert SelfUpdate(software).take_outcome() is None


def test_a_trial_no_coordinator_confirms_is_given_up_and_rolled_back_after_three_starts(
        tmp_path):
    """The other side of READY-before-connected: a new version that never reaches the
    coordinator (broken, or the coordinator gone) must not stay in trial for ever. After
    update_trial_s without a heartbeat ack the agent exits 75, the unit's
    RestartForceExitStatus, and systemd starts it again; preflight rolls back on the
    fourth start. Here systemd's loop is played by hand: preflight, then the launcher."""
    _, software = appliance_in_trial(tmp_path, "update_trial_s = 1.0\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET")}
    for start in (1, 2, 3):
        pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                              str(software)], capture_output=True, text=True, timeout=60)
        assert pre.stdout.strip() == "trial", pre.stderr
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "fedge.update.ab", "exec", "--root",
                              str(software), "--", "/bin/false"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 75, run.stderr
        assert "software 90.0.0 in trial: no heartbeat ack from the coordinator" in run.stderr
        assert time.monotonic() - t0 < 60
        assert SelfUpdate(software).pending()["attempts"] == start
    pre = subprocess.run([sys.executable, "-m", "fedge.update.ab", "preflight", "--root",
                          str(software)], capture_output=True, text=True, timeout=60)
    assert pre.stdout.strip() == "rolled_back", pre.stderr
    outcome = SelfUpdate(software).take_outcome()
    assert outcome["version"] == "90.0.0" and outcome["rolled_back"] and not outcome["ok"]
    assert not (software / "current").exists()  # the packaged install runs next


def test_a_slow_heartbeat_does_not_slow_the_watchdog_pings(tmp_path, notify):
    """agent.toml may set heartbeat.interval_s past WatchdogSec (here 90 s against 2 s):
    the pings come from the agent's loop at half of WatchdogSec all the same, so systemd
    does not restart a healthy agent in a loop."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens: coordinator down
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint=endpoint,
                                clock=lambda: datetime.now(UTC))
    file, _ = create_enrolment(console, "hospital-a", valid_for=timedelta(days=7))
    state = tmp_path / "state"
    install_enrolment(file, state)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\nhealth = false\n'
                      "[heartbeat]\ninterval_s = 90.0\ntimeout_s = 180.0\n")
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "2000000",
           "PYTHONUNBUFFERED": "1"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    gaps = watchdog_gaps([sys.executable, "-m", "fedge.cli", "agent", "run", "--config",
                          str(config)], env, notify)
    assert max(gaps) < 1.8, gaps  # 1 s apart; a WatchdogSec of 2 s is never missed
