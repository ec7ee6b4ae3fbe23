"""One agent per state directory: a second `fedge agent run` on an appliance's state
directory stops at once, exit 2, one line naming the directory and the running
agent's pid. The running one is started as the unit starts it, through the A/B
launcher's exec (the pid systemd sees is the agent's, and so is the lock's).
`fedge agent privacy` still reads the ledger meanwhile, and an agent killed with
SIGKILL leaves no lock behind: the restart runs. Real processes throughout; the
coordinator endpoint is one nobody listens on, so each agent just keeps connecting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def appliance(tmp_path: Path) -> tuple[Path, Path]:
    console = ConsoleStore.init(tmp_path / "console",
                                coordinator_endpoint=f"tcp://127.0.0.1:{free_port()}",
                                clock=lambda: datetime.now(UTC))
    file, _ = create_enrolment(console, "hospital-a", valid_for=timedelta(days=7))
    state = tmp_path / "state"
    install_enrolment(file, state)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\nhealth = false\n'
                      "[heartbeat]\ninterval_s = 0.2\ntimeout_s = 1.0\n")
    return state, config


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
        e.pop(name, None)
    return e


def wait_locked_by(lock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120  # torch's import
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"agent {proc.pid} did not take {lock} (rc {proc.poll()})")


def test_a_second_agent_on_the_same_state_dir_stops_and_a_killed_one_restarts(tmp_path):
    state, config = appliance(tmp_path)
    lock = state / "agent.lock"
    agent = [sys.executable, "-m", "fedge.cli", "agent", "run", "--config", str(config)]
    launcher = [sys.executable, "-m", "fedge.update.ab", "exec", "--root",
                str(state / "software"), "--", *agent]
    first = subprocess.Popen(launcher, env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    restarted = None
    try:
        wait_locked_by(lock, first)  # the launcher's pid: it exec'd into the agent
        second = subprocess.run(agent, env=env(), cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last == (f"fedge agent: another agent (pid {first.pid}) is running on state "
                        f"directory {state} (it holds {lock}); one agent per state "
                        "directory"), second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None

        privacy = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                                  "--config", str(config)], env=env(), cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
        assert privacy.returncode == 0, privacy.stderr

        first.send_signal(signal.SIGKILL)
        first.wait(30)
        restarted = subprocess.Popen(launcher, env=env(), cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_locked_by(lock, restarted)
        time.sleep(1.0)
        assert restarted.poll() is None, restarted.communicate(timeout=10)
    finally:
        for p in (first, restarted):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(30)
