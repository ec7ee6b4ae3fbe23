"""The operator's path with nothing but the real commands, each its own process:
`fedge console init` → `fedge coordinator` (provisioned from the console's file)
→ `fedge console enrol` → `fedge agent enrol FILE` → `fedge agent` →
`fedge console fleet` shows it connected, with its version and health."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from fedge import __version__
from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_operator_enrols_an_appliance_and_sees_it_in_the_fleet(tmp_path):
    home = tmp_path / "console"
    port, admin_port = free_port(), free_port()
    console = ["console", "--home", str(home), "--timeout", "30"]
    r = fedge(*console, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
              "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}")
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "coord"}"\nbind = "tcp://127.0.0.1:{port}"\n'
                   f'provision = "{home / "coordinator-provision.json"}"\n'
                   "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n"
                   f'[admin]\nendpoint = "tcp://127.0.0.1:{admin_port}"\n')
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = []
    try:
        with open(tmp_path / "coordinator.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator",
                                           "--config", str(cfg)], stdout=log,
                                          stderr=subprocess.STDOUT, env=env))
        r = fedge(*console, "enrol", "hospital-a", "--out", str(tmp_path / "a.fedge-enrol"))
        assert r.returncode == 0, r.stderr + (tmp_path / "coordinator.log").read_text()
        assert "coordinator accepts hospital-a" in r.stdout

        state = tmp_path / "appliance"
        r = fedge("agent", "enrol", str(tmp_path / "a.fedge-enrol"), "--state-dir", str(state))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE((state / "keys" / "curve.json").stat().st_mode) == 0o600
        (tmp_path / "agent.toml").write_text(
            f'state_dir = "{state}"\n[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n')
        with open(tmp_path / "agent.log", "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "fedge.cli", "agent",
                                           "--config", str(tmp_path / "agent.toml")],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        viewer = AdminClient.from_store(ConsoleStore(home), "viewer", timeout_s=10)
        end = time.monotonic() + 60
        while time.monotonic() < end:  # polled in-process: a CLI start per poll is slow
            fleet, _ = viewer.call("fleet")
            if fleet and fleet[0]["connected"] and fleet[0]["version"]:
                break
            time.sleep(0.3)
        r = fedge(*console, "--operator", "viewer", "fleet", "--json")
        assert r.returncode == 0, r.stderr
        [a] = json.loads(r.stdout)
        assert (a["site_id"], a["connected"], a["version"]) == ("hospital-a", True, __version__)
        assert "host" in a["health"]  # the agent's real health report reached the console
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
