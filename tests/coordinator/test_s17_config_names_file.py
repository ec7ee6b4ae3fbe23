"""What the coordinator refuses at start names the configuration file, once: the bind
that failed said "cannot bind X: cannot bind X: ...", and a heartbeat timeout below its
interval named neither the file nor the table."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def coordinator(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_a_port_in_use_is_said_once_naming_the_config(tmp_path):
    provision(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "coordinator.toml"
        cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n'
                       f'bind = "tcp://127.0.0.1:{port}"\n')
        out = coordinator(["run", "--config", str(cfg)])
    assert out.returncode == 1, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if "cannot bind" in x]
    assert line.count("cannot bind") == 1, line
    assert f"cannot bind tcp://127.0.0.1:{port}: Address already in use" in line, line
    assert line.endswith(f" (bind in {cfg})"), line


def test_a_heartbeat_timeout_below_its_interval_names_the_file_and_table(tmp_path):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\n'
                   "[heartbeat]\ninterval_s = 2\ntimeout_s = 1\n")
    out = coordinator(["run", "--config", str(cfg)])
    assert out.returncode == 2
    assert out.stderr.strip() == (f"fedge coordinator: coordinator config {cfg}: [heartbeat] "
                                  "timeout_s = 1 must exceed interval_s = 2"), out.stderr
    assert not (tmp_path / "st").exists()
