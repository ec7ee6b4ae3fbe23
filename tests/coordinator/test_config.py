"""Coordinator configuration: checked when read, errors name the key."""

from __future__ import annotations

import json

import pytest

from fedge.coordinator.config import ConfigError, load_config
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair


def write(tmp_path, text):
    p = tmp_path / "coordinator.toml"
    p.write_text(text)
    return p


@pytest.fixture
def keyfile(tmp_path):
    save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    return tmp_path / "keys" / "coordinator.key_secret"


def test_explicit_keys(tmp_path, keyfile):
    console = Identity.generate()
    cfg = load_config(write(tmp_path, f'state_dir = "state"\ncurve_key = "{keyfile}"\n'
                            f'roster_public_key = "{console.public_bytes().hex()}"\n'
                            "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 2\n"))
    assert cfg.state_dir == tmp_path / "state"
    assert len(cfg.curve_public) == 40 and cfg.roster_public_key == console.public_bytes()
    assert (cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s) == (0.5, 2.0)
    assert cfg.bind == "tcp://0.0.0.0:7700"


def test_provision_file(tmp_path):
    kp = CurveKeyPair.generate()
    prov = {"curve_public": kp.public, "curve_secret": kp.secret, "roster": "",
            "roster_public_key": Identity.generate().public_bytes().hex(), "operators": {}}
    (tmp_path / "prov.json").write_text(json.dumps(prov))
    cfg = load_config(write(tmp_path, 'provision = "prov.json"\n[admin]\n'
                            'endpoint = "tcp://127.0.0.1:7701"\n'))
    assert cfg.curve_public == kp.public and cfg.admin["endpoint"].endswith("7701")


def test_provision_from_systemd_credentials(tmp_path, monkeypatch):
    kp = CurveKeyPair.generate()
    prov = {"curve_public": kp.public, "curve_secret": kp.secret,
            "roster_public_key": Identity.generate().public_bytes().hex()}
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "fedge_coordinator-provision.json").write_text(json.dumps(prov))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "st"))
    cfg = load_config(write(tmp_path, ""))
    assert cfg.curve_public == kp.public and cfg.state_dir == tmp_path / "st"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("bogus = 1\n", "'bogus' is unknown"),
        ("bind = 'nowhere'\n", "ZeroMQ endpoint"),
        ("[heartbeat]\ninterval_s = 2\ntimeout_s = 1\n", "must exceed"),
        ("[heartbeat]\ninterval_s = -1\n", "interval_s"),
        ("tick_s = 0\n", "tick_s"),
        ("[job\n", "not valid TOML"),
        ("", "needs 'curve_key'"),
        ('provision = "missing.json"\n', "provision file"),
    ],
)
def test_invalid_config_named(tmp_path, text, match, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text))


def test_bad_roster_key(tmp_path, keyfile):
    with pytest.raises(ConfigError, match="roster_public_key"):
        load_config(write(tmp_path, f'curve_key = "{keyfile}"\nroster_public_key = "zz"\n'))
    with pytest.raises(ConfigError, match="32"):
        load_config(write(tmp_path, f'curve_key = "{keyfile}"\nroster_public_key = "00"\n'))
