"""``[admin]`` without its own endpoint listens on the provision file's admin port at
the host of ``bind`` (s17 endpoints M2).

It bound the provision file's ``admin_endpoint`` as it was: its host is the name the
console dials, which on the coordinator's own host may not resolve or be no address of
it (split DNS, NAT). The admin channel then failed to bind, logged a traceback and
started again every 20 s, while `fedge coordinator check` said ok. A loopback
admin_endpoint (console and coordinator on one host) is still bound as it is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore
from fedge.coordinator.config import load_config
from tests.coordinator.test_s17_config_bom import provision

REPO = Path(__file__).resolve().parents[2]
NAME = "fl-coordinator.invalid"  # resolves nowhere (RFC 6761)


def config(tmp_path: Path, admin_endpoint: str, text: str) -> Path:
    prov = provision(tmp_path)
    prov.write_text(json.dumps(json.loads(prov.read_text())
                               | {"admin_endpoint": admin_endpoint}))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\n' + text)
    return cfg


@pytest.mark.parametrize(("told", "bind", "bound"), [
    (f"tcp://{NAME}:7701", 'bind = "tcp://127.0.0.1:7700"\n', "tcp://127.0.0.1:7701"),
    (f"tcp://{NAME}:7701", "", "tcp://0.0.0.0:7701"),  # bind's default
    (f"tcp://{NAME}:7701", 'bind = "tcp://*:0"\n', "tcp://*:7701"),
    ("tcp://203.0.113.7:7701", 'bind = "tcp://[::]:7700"\n', "tcp://[::]:7701"),  # NAT
    # the console on this host: the channel stays on loopback
    ("tcp://localhost:7701", "", "tcp://localhost:7701"),
    ("tcp://127.0.0.1:7701", 'bind = "tcp://0.0.0.0:7700"\n', "tcp://127.0.0.1:7701"),
    ("tcp://[::1]:7701", 'bind = "tcp://*:7700"\n', "tcp://[::1]:7701"),
])
def test_the_admin_channel_listens_at_binds_host_on_the_provisions_port(
        tmp_path, told, bind, bound):
    cfg = load_config(config(tmp_path, told, bind + "[admin]\n"))
    assert cfg.admin == {"enabled": True, "endpoint": bound}
    assert not cfg.warnings


def test_an_admin_endpoint_of_its_own_is_bound_as_written(tmp_path):
    cfg = load_config(config(tmp_path, f"tcp://{NAME}:7701", 'bind = "tcp://*:7700"\n'
                             '[admin]\nendpoint = "tcp://127.0.0.1:7701"\n'))
    assert cfg.admin["endpoint"] == "tcp://127.0.0.1:7701"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_coordinator_whose_name_does_not_resolve_on_itself_serves_the_console(tmp_path):
    port, admin_port = free_port(), free_port()
    console = ConsoleStore.init(tmp_path / "console",
                                coordinator_endpoint=f"tcp://{NAME}:{port}",
                                admin_endpoint=f"tcp://{NAME}:{admin_port}")
    (tmp_path / "prov.json").write_text(json.dumps(console.provision()))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n'
                   f'bind = "tcp://127.0.0.1:{port}"\ntick_s = 0.05\n[admin]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "st" / "endpoint").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
            time.sleep(0.05)
        # the console's network resolves NAME to the coordinator; here, 127.0.0.1 does
        client = dataclasses.replace(AdminClient.from_store(console, "admin", timeout_s=15),
                                     endpoint=f"tcp://127.0.0.1:{admin_port}")
        who, _ = client.call("whoami")
        assert who["name"] == "admin"
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "admin channel stopped" not in err and "Traceback" not in err, err
