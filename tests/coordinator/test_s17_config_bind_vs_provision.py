"""A coordinator bound on another port than the provision file's endpoint (the one the
appliances were enrolled to connect to) says so when it starts: the packaged config
leaves bind at its default, port 7700, whatever port the console was initialised with.
A warning, not a refusal: behind NAT or a port forward the two may differ."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from fedge.coordinator.config import load_config
from tests.coordinator.test_s17_config_admin import free_port
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def config(tmp_path, text, endpoint="tcp://coord.example:27700",
           admin_endpoint="tcp://coord.example:27701"):
    prov = provision(tmp_path)
    prov.write_text(json.dumps(json.loads(prov.read_text()) | {
        "endpoint": endpoint, "admin_endpoint": admin_endpoint}))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n{text}')
    return cfg, prov


def test_the_default_bind_on_another_port_than_the_appliances_dial_is_warned(tmp_path):
    cfg, prov = config(tmp_path, "")
    (warning,) = load_config(cfg).warnings
    assert warning == (
        f"bind is not set in {cfg}, so it is tcp://0.0.0.0:7700, port 7700; but "
        "tcp://coord.example:27700, the endpoint the appliances were enrolled to connect to "
        f"(provision file {prov}), has port 27700. Unless a NAT or port forward maps port "
        "27700 to 7700, the appliances will not reach it: set bind = 'tcp://0.0.0.0:27700'")


def test_an_admin_endpoint_on_another_port_than_the_console_dials_is_warned(tmp_path):
    cfg, _ = config(tmp_path, 'bind = "tcp://0.0.0.0:27700"\n[admin]\n'
                              'endpoint = "tcp://0.0.0.0:7701"\n')
    (warning,) = load_config(cfg).warnings
    assert warning.startswith(f"[admin] endpoint = 'tcp://0.0.0.0:7701' in {cfg}, port 7701; "
                              "but tcp://coord.example:27701, the endpoint the console "
                              "connects to"), warning


def test_the_same_ports_or_any_free_port_are_not_warned(tmp_path):
    # (an [admin] without an endpoint would listen at tcp://coord.example:27701, which
    # does not resolve here: refused, test_s17_net_admin_default)
    assert load_config(config(tmp_path, 'bind = "tcp://10.0.0.1:27700"\n[admin]\n'
                              'endpoint = "tcp://0.0.0.0:27701"\n')[0]).warnings == ()
    assert load_config(config(tmp_path, 'bind = "tcp://127.0.0.1:0"\n')[0]).warnings == ()


def test_the_coordinator_warns_at_start_and_runs(tmp_path):
    port = free_port()
    cfg, _ = config(tmp_path, f'bind = "tcp://127.0.0.1:{port}"\n',
                    endpoint=f"tcp://127.0.0.1:{port + 1}")
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "st" / "endpoint").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    (line,) = [x for x in err.splitlines() if "WARNING" in x]
    assert line.endswith(f"WARNING fedge.coordinator: bind = 'tcp://127.0.0.1:{port}' in {cfg}, "
                         f"port {port}; but tcp://127.0.0.1:{port + 1}, the endpoint the "
                         "appliances were enrolled to connect to (provision file "
                         f"{tmp_path / 'prov.json'}), has port {port + 1}. Unless a NAT or "
                         f"port forward maps port {port + 1} to {port}, the appliances will "
                         f"not reach it: set bind = 'tcp://127.0.0.1:{port + 1}'"), line
