"""The coordinator's ``[admin]`` table is checked when the config is read: a misspelt
``endpiont`` was ignored (the provision file's admin_endpoint was bound instead),
``enabled = false`` turned the channel ON (any table did), and an endpoint equal to bind
or not a string left the coordinator running while the admin channel failed with a
traceback and "starting it again" every 5 s."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.coordinator.config import ConfigError, load_config
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair
from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]
BIND = 'bind = "tcp://127.0.0.1:27710"\n'


def config(tmp_path, text, *, prov=True):
    if prov:
        provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\n' + ('provision = "prov.json"\n' if prov else "")
                   + text)
    return cfg


@pytest.mark.parametrize(("admin", "error"), [
    ('endpiont = "tcp://127.0.0.1:27799"',
     "[admin] key 'endpiont' is unknown; known: endpoint, enabled"),
    ('enabled = "no"', "[admin] enabled = 'no' must be true or false"),
    ("endpoint = 27711", "[admin] endpoint = 27711 must be a ZeroMQ endpoint"),
    ('endpoint = "tcp://127.0.0.1:70000"', "[admin] endpoint = 'tcp://127.0.0.1:70000' "
                                           "must be a ZeroMQ endpoint"),
    ('endpoint = "tcp://127.0.0.1:27710"', "[admin] endpoint tcp://127.0.0.1:27710 takes the "
                                           "port of bind = 'tcp://127.0.0.1:27710'"),
    ('endpoint = "tcp://0.0.0.0:27710"', "[admin] endpoint tcp://0.0.0.0:27710 takes the "
                                         "port of bind"),
])
def test_a_bad_admin_table_is_refused_naming_file_and_key(tmp_path, admin, error):
    cfg = config(tmp_path, f"{BIND}[admin]\n{admin}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(err.value).startswith(f"coordinator config {cfg}: {error}"), err.value


def test_an_admin_table_without_a_provision_file_is_refused(tmp_path):
    save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    cfg = config(tmp_path, f'curve_key = "keys/coordinator.key_secret"\nroster_public_key = '
                 f'"{Identity.generate().public_bytes().hex()}"\n[admin]\n', prov=False)
    with pytest.raises(ConfigError, match=r"\[admin\] needs a provision file"):
        load_config(cfg)


def test_a_bad_admin_endpoint_in_the_provision_file_is_named(tmp_path):
    cfg = config(tmp_path, f"{BIND}[admin]\n")
    prov = tmp_path / "prov.json"
    prov.write_text(json.dumps(json.loads(prov.read_text())
                               | {"admin_endpoint": "tcp://127.0.0.1:99999"}))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert (f"admin_endpoint in provision file {prov} (for [admin], which names no "
            "endpoint) = 'tcp://127.0.0.1:99999' must be") in str(err.value)


def test_the_admin_endpoint_defaults_to_the_provision_files_and_enabled_false_is_off(
        tmp_path):
    assert load_config(config(tmp_path, f"{BIND}[admin]\n")).admin == {
        "enabled": True, "endpoint": "tcp://127.0.0.1:7701"}
    assert load_config(config(tmp_path, f"{BIND}[admin]\nenabled = true\n"
                              'endpoint = "tcp://127.0.0.1:27711"\n')).admin == {
        "enabled": True, "endpoint": "tcp://127.0.0.1:27711"}
    assert load_config(config(tmp_path, f"{BIND}[admin]\nenabled = false\n")).admin == {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_coordinator_with_admin_enabled_false_opens_no_admin_port(tmp_path):
    admin_port = free_port()
    cfg = config(tmp_path, 'bind = "tcp://127.0.0.1:0"\n[admin]\nenabled = false\n')
    prov = tmp_path / "prov.json"
    prov.write_text(json.dumps(json.loads(prov.read_text())
                               | {"admin_endpoint": f"tcp://127.0.0.1:{admin_port}"}))
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "st" / "endpoint").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the coordinator did not start"
            time.sleep(0.05)
        time.sleep(0.5)  # the admin channel, were it on, binds as the loop starts
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", admin_port))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "admin" not in err, err
