"""Coordinator configuration: checked when read, errors name the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedge.coordinator.config import DEFAULT_STATE_DIR, ConfigError, load_config
from fedge.secagg.keys import Identity
from fedge.serve import cli as serve_cli
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
    # an empty [admin] turns the channel on (at the provision file's endpoint); none, off
    assert load_config(write(tmp_path, 'provision = "prov.json"\n[admin]\n')).admin
    assert not load_config(write(tmp_path, 'provision = "prov.json"\n')).admin


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


PACKAGED_CONFFILE = Path(__file__).resolve().parents[2] / "packaging/debian/etc/coordinator.toml"


def packaged_etc(tmp_path):
    """/etc/fedge as the .deb leaves it, with the provision file where the conffile
    says (credentials/coordinator/, the unit's LoadCredential= source)."""
    etc = tmp_path / "etc" / "fedge"
    (etc / "credentials" / "coordinator").mkdir(parents=True)
    shutil.copy(PACKAGED_CONFFILE, etc / "coordinator.toml")
    kp = CurveKeyPair.generate()
    prov = {"curve_public": kp.public, "curve_secret": kp.secret,
            "roster_public_key": Identity.generate().public_bytes().hex()}
    (etc / "credentials" / "coordinator" / "coordinator-provision.json").write_text(
        json.dumps(prov))
    return etc, kp


def test_the_packaged_config_gives_the_service_and_an_admin_shell_one_database(
        tmp_path, monkeypatch):
    etc, kp = packaged_etc(tmp_path)
    # Under the unit: systemd sets both directories and copies the credential.
    creds = tmp_path / "run-credentials"
    creds.mkdir()
    shutil.copy(etc / "credentials/coordinator/coordinator-provision.json",
                creds / "fedge_coordinator-provision.json")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/fedge-coordinator")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    service = load_config(etc / "coordinator.toml")
    # From a root shell: neither is set.
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    shell = load_config(etc / "coordinator.toml")
    assert service.state_dir == shell.state_dir == Path("/var/lib/fedge-coordinator")
    assert service.curve_public == shell.curve_public == kp.public
    assert DEFAULT_STATE_DIR == serve_cli.DEFAULT_STATE_DIR == "/var/lib/fedge-coordinator"
    unit = (PACKAGED_CONFFILE.parents[2] / "systemd/fedge-coordinator.service").read_text()
    assert "StateDirectory=fedge-coordinator" in unit.splitlines()


def test_without_credentials_the_provision_file_in_the_state_dir_is_used(tmp_path, monkeypatch):
    etc, _ = packaged_etc(tmp_path)
    conf = etc / "coordinator.toml"  # its state_dir left to $STATE_DIRECTORY
    conf.write_text("\n".join(line for line in conf.read_text().splitlines()
                              if not line.startswith("state_dir")) + "\n")
    (etc / "credentials" / "coordinator" / "coordinator-provision.json").unlink()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    with pytest.raises(ConfigError) as err:
        load_config(etc / "coordinator.toml")
    assert "needs 'curve_key'" in str(err.value)
    assert str(state / "coordinator-provision.json") in str(err.value)
    assert str(etc / "credentials/coordinator/coordinator-provision.json") in str(err.value)
    kp = CurveKeyPair.generate()
    (state / "coordinator-provision.json").write_text(json.dumps(
        {"curve_public": kp.public, "curve_secret": kp.secret,
         "roster_public_key": Identity.generate().public_bytes().hex()}))
    cfg = load_config(etc / "coordinator.toml")
    assert cfg.curve_public == kp.public and cfg.state_dir == state


def test_a_tick_longer_than_a_stop_may_wait_is_refused(tmp_path):
    from fedge.coordinator.config import MAX_TICK_S

    cfg = tmp_path / "coordinator.toml"
    for tick in (90, MAX_TICK_S * 2):
        cfg.write_text(f'state_dir = "{tmp_path}"\ncurve_key = "k"\ntick_s = {tick}\n')
        with pytest.raises(ConfigError, match=r"tick_s = .* must be at most 5"):
            load_config(cfg)


def test_a_relative_config_path_finds_the_provision_file_beside_it(tmp_path, monkeypatch):
    """`fedge coordinator --config etc/coordinator.toml` from the directory above:
    the credentials/coordinator/ provision file beside it is read where it is, not
    under etc/ twice."""
    kp = CurveKeyPair.generate()
    creds = tmp_path / "etc" / "credentials" / "coordinator"
    creds.mkdir(parents=True)
    (creds / "coordinator-provision.json").write_text(json.dumps(
        {"curve_public": kp.public, "curve_secret": kp.secret,
         "roster_public_key": Identity.generate().public_bytes().hex()}))
    (tmp_path / "etc" / "coordinator.toml").write_text('state_dir = "state"\n')
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("etc/coordinator.toml"))
    assert cfg.curve_public == kp.public
