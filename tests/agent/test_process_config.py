"""Agent configuration and enrolment state: checked at start, errors name the culprit."""

from __future__ import annotations

import json

import pytest

from fedge.agent.process import AgentConfigError, load_config, load_enrolled
from fedge.secagg.keys import Identity, Roster
from fedge.transport import CurveKeyPair


def write(tmp_path, text):
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_and_datasets(tmp_path):
    cfg = load_config(write(tmp_path, 'state_dir = "st"\nworkers = 2\n[[datasets]]\n'
                            'name = "x"\nkind = "numpy"\npath = "x.npz"\n'))
    assert cfg.state_dir == tmp_path / "st" and cfg.workers == 2
    assert cfg.datasets[0]["path"] == str(tmp_path / "x.npz")
    assert (cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s) == (1.0, 5.0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("colour = 1\n", "'colour' is unknown"),
        ("workers = 0\n", "workers"),
        ("[heartbeat]\ninterval_s = 3\ntimeout_s = 2\n", "must exceed"),
        ("[heartbeat]\nperiod = 3\n", "interval_s, timeout_s"),
        ("health = 'yes'\n", "true or false"),
        ("datasets = 3\n", "datasets"),
        ("[x\n", "not valid TOML"),
    ],
)
def test_invalid_config(tmp_path, text, match):
    with pytest.raises(AgentConfigError, match=match):
        load_config(write(tmp_path, text))


def enrolled_state(sd):
    console, me = Identity.generate(), Identity.generate()
    kp = CurveKeyPair.generate()
    (sd / "keys").mkdir(parents=True)
    (sd / "keys" / "curve.json").write_text(json.dumps({"public": kp.public,
                                                       "secret": kp.secret}))
    me.save(sd / "keys" / "identity.key")
    (sd / "keys" / "coordinator.json").write_text(json.dumps(
        {"endpoint": "tcp://127.0.0.1:1", "public_key": CurveKeyPair.generate().public}))
    (sd / "roster.json").write_bytes(Roster.build({"s1": me.public_bytes()}, console).to_bytes())
    (sd / "enrolment.json").write_text(json.dumps(
        {"site": "s1", "roster_public_key": console.public_bytes().hex()}))
    return kp, me


def test_enrolled_state_is_read(tmp_path):
    kp, me = enrolled_state(tmp_path)
    e = load_enrolled(tmp_path)
    assert e.site == "s1" and e.curve_public == kp.public
    assert e.identity.public_bytes() == me.public_bytes() and "s1" in e.roster


def test_credentials_directory_overrides_secrets(tmp_path, monkeypatch):
    enrolled_state(tmp_path / "st")
    other = CurveKeyPair.generate()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "fedge_curve.key").write_text(other.secret + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    e = load_enrolled(tmp_path / "st")
    assert (e.curve_public, e.curve_secret) == (other.public, other.secret)


def test_not_enrolled_and_corrupt(tmp_path):
    with pytest.raises(AgentConfigError, match="not enrolled"):
        load_enrolled(tmp_path)
    enrolled_state(tmp_path)
    (tmp_path / "roster.json").write_text("{}")
    with pytest.raises(AgentConfigError, match="corrupt"):
        load_enrolled(tmp_path)
