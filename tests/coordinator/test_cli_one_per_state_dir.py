"""One coordinator per state directory: a second `fedge coordinator run` on the same
state_dir (another port, e.g. a copy of the config) stops at once, exit 2, with one
line naming the directory and the running one's pid; it writes nothing (the running
one's endpoint file stays). `coordinator status` still reads the database while the
service runs, and a coordinator killed with SIGKILL leaves no lock behind: its
restart runs. Real processes throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, name: str, state: Path) -> Path:
    keys = tmp_path / f"keys-{name}"
    _, secret = save_keypair(keys, "coordinator", CurveKeyPair.generate())
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'state_dir = "{state}"\nbind = "tcp://127.0.0.1:0"\n'
                   f'curve_key = "{secret}"\n'
                   f'roster_public_key = "{Identity.generate().public_bytes().hex()}"\n'
                   "tick_s = 0.02\n")
    return cfg


def start(cfg: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_listening(proc: subprocess.Popen[str], endpoint: Path, not_before: float) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if endpoint.exists() and endpoint.stat().st_mtime >= not_before:
            text = endpoint.read_text().strip()
            if text:
                return text
        time.sleep(0.05)
    raise AssertionError(f"coordinator did not start: {proc.communicate(timeout=10)}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_a_second_coordinator_on_the_same_state_dir_stops_and_a_killed_one_restarts(tmp_path):
    state = tmp_path / "coord"
    first_cfg, second_cfg = config(tmp_path, "a", state), config(tmp_path, "b", state)
    endpoint = state / "endpoint"
    a = start(first_cfg)
    try:
        listening = wait_listening(a, endpoint, 0.0)
        b = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                            "--config", str(second_cfg)], capture_output=True, text=True,
                           timeout=30, cwd=REPO)  # it stops at once: 30 s is slack
        assert b.returncode == 2, b.stderr
        (line,) = b.stderr.strip().splitlines()
        assert line == (f"fedge coordinator: another coordinator (pid {a.pid}) is running "
                        f"on state directory {state} (it holds {state / 'coordinator.lock'}); "
                        "one coordinator per state directory"), line
        assert endpoint.read_text().strip() == listening  # the second wrote nothing
        assert a.poll() is None

        # read-only commands work while it runs
        status = fedge("coordinator", "status", "--config", str(first_cfg))
        assert status.returncode == 0, status.stderr
        assert '"jobs"' in status.stdout

        killed_at = time.time()
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=30)
        time.sleep(0.05)
        c = start(second_cfg)  # the other config: a restart finds no stale lock
        try:
            wait_listening(c, endpoint, killed_at)
            assert (state / "coordinator.lock").read_text().strip() == str(c.pid)
        finally:
            c.terminate()
            _, err = c.communicate(timeout=60)
            assert c.returncode == 0, err
    finally:
        stop(a)
