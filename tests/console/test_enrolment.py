"""Console key store and enrolment: one signed file per site, installed 0600."""

import base64
import json
import stat
from datetime import timedelta

import pytest

from fedge.agent.enrol import install_enrolment, load_enrolled
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleError, ConsoleStore
from fedge.secagg.keys import Identity, Roster


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_init_creates_every_key_owner_only(console):
    keys = console.home / "keys"
    names = {p.name for p in keys.iterdir()}
    assert {"roster.key", "tuf-root.pem", "tuf-targets.pem", "tuf-snapshot.pem",
            "tuf-timestamp.pem", "coordinator.curve.json", "operator-admin.curve.json",
            "operator-viewer.curve.json"} <= names
    for p in [*keys.iterdir(), console.home / "console.json",
              console.home / "coordinator-provision.json"]:
        assert _mode(p) == 0o600, p
    assert _mode(console.home) == 0o700
    assert console.operator_keys("viewer")["role"] == "viewer"


def test_provision_file_holds_only_online_tuf_keys(console):
    prov = json.loads((console.home / "coordinator-provision.json").read_text())
    assert set(prov["tuf_online_keys"]) == {"snapshot", "timestamp"}
    text = json.dumps(prov)
    for offline in ("tuf-root.pem", "tuf-targets.pem"):
        pem = (console.home / "keys" / offline).read_bytes()
        assert pem.splitlines()[1].decode() not in text
        assert base64.b64encode(pem).decode() not in text
    roster_secret = (console.home / "keys" / "roster.key").read_bytes()
    assert roster_secret.hex() not in text and base64.b64encode(roster_secret).decode() not in text
    online = base64.b64decode(prov["tuf_online_keys"]["snapshot"])
    assert online == (console.home / "keys" / "tuf-snapshot.pem").read_bytes()


def test_init_refuses_to_overwrite_and_validates_inputs(console, tmp_path):
    with pytest.raises(ConsoleError, match="already holds a console"):
        ConsoleStore.init(console.home, coordinator_endpoint="tcp://127.0.0.1:1")
    with pytest.raises(ConsoleError, match="endpoint 'localhost:1'"):
        ConsoleStore.init(tmp_path / "x", coordinator_endpoint="localhost:1")
    with pytest.raises(ConsoleError, match="role 'root'"):
        ConsoleStore.init(tmp_path / "y", coordinator_endpoint="tcp://h:1",
                          operators=[("bob", "root")])


def test_enrol_then_install_writes_state_0600_and_roster(console, tmp_path, clock):
    path, _ = create_enrolment(console, "hospital-a", valid_for=timedelta(days=7))
    assert _mode(path) == 0o600
    state = tmp_path / "agent"
    site = install_enrolment(path, state, now=clock())
    assert site.site == "hospital-a"
    assert site.coordinator_public_key == console.coordinator_public_key
    for p in [state / "keys" / "curve.json", state / "keys" / "identity.key",
              state / "enrolment.json", state / "tuf" / "metadata" / "root.json"]:
        assert _mode(p) == 0o600, p
    assert _mode(state / "keys") == 0o700
    # the identity in the file is the one the console entered into the signed roster
    roster = Roster.from_bytes((state / "roster.json").read_bytes(), console.roster_public_key())
    identity = Identity.load(state / "keys" / "identity.key")
    assert roster.public_key("hospital-a") == identity.public_bytes()
    assert load_enrolled(state).curve_secret == site.curve_secret


def test_enrolling_a_site_twice_is_refused_until_revoked(console):
    create_enrolment(console, "h1", valid_for=timedelta(days=1))
    with pytest.raises(ConsoleError, match="already enrolled"):
        create_enrolment(console, "h1", valid_for=timedelta(days=1))
    console.revoke_site("h1")
    assert "h1" not in console.roster().entries
    create_enrolment(console, "h1", valid_for=timedelta(days=1))
    assert "h1" in console.roster().entries


def test_expired_enrolment_is_refused_and_nothing_written(console, tmp_path, clock):
    path, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1))
    clock.now += timedelta(days=2)
    with pytest.raises(EnrolmentError, match="expired"):
        install_enrolment(path, tmp_path / "agent", now=clock())
    assert not (tmp_path / "agent").exists()


def test_corrupt_enrolment_is_refused(console, tmp_path, clock):
    path, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1))
    doc = json.loads(path.read_text())
    sig = bytearray.fromhex(doc["signature"])
    sig[0] ^= 1
    doc["signature"] = sig.hex()
    bad = tmp_path / "bad.fedge-enrol"
    bad.write_text(json.dumps(doc))
    with pytest.raises(EnrolmentError, match="signature does not verify"):
        install_enrolment(bad, tmp_path / "agent", now=clock())
    bad.write_text("{not json")
    with pytest.raises(EnrolmentError, match="corrupt"):
        install_enrolment(bad, tmp_path / "agent", now=clock())
    bad.write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(EnrolmentError, match="format 'something-else/9'"):
        install_enrolment(bad, tmp_path / "agent", now=clock())


def test_foreign_console_file_is_refused_once_enrolled(console, tmp_path, clock):
    other = ConsoleStore.init(tmp_path / "other", coordinator_endpoint="tcp://10.0.0.9:1",
                              clock=clock)
    mine, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1))
    foreign, _ = create_enrolment(other, "h1", valid_for=timedelta(days=1))
    state = tmp_path / "agent"
    install_enrolment(mine, state, now=clock())
    before = (state / "keys" / "curve.json").read_bytes()
    with pytest.raises(EnrolmentError, match="foreign"):
        install_enrolment(foreign, state, now=clock())
    assert (state / "keys" / "curve.json").read_bytes() == before
    # an explicit expected console key refuses a foreign file on a fresh appliance too
    with pytest.raises(EnrolmentError, match="foreign"):
        install_enrolment(foreign, tmp_path / "fresh", now=clock(),
                          expected_console=console.roster_public_key())


def test_agent_cli_enrol_installs_and_reports_errors_with_exit_code(tmp_path, capsys):
    import argparse

    from fedge.agent.enrol import register_enrol

    live = ConsoleStore.init(tmp_path / "live", coordinator_endpoint="tcp://127.0.0.1:7001")
    parser = argparse.ArgumentParser()
    register_enrol(parser.add_subparsers())
    path, _ = create_enrolment(live, "h2", valid_for=timedelta(days=1))
    args = parser.parse_args(["enrol", str(path), "--state-dir", str(tmp_path / "s")])
    assert args.func(args) == 0
    assert "enrolled site h2" in capsys.readouterr().out
    assert load_enrolled(tmp_path / "s").site == "h2"
    args = parser.parse_args(["enrol", str(tmp_path / "missing"), "--state-dir",
                              str(tmp_path / "s")])
    assert args.func(args) == 2
    assert "cannot read" in capsys.readouterr().err


def test_every_enrolment_and_revocation_signs_a_roster_with_a_higher_serial(console):
    key = console.roster_public_key()
    serials = [Roster.from_bytes(console.roster().to_bytes(), key).serial]
    for site in ("h1", "h2"):
        create_enrolment(console, site, valid_for=timedelta(days=1))
        serials.append(Roster.from_bytes(console.roster().to_bytes(), key).serial)
    console.revoke_site("h1")
    roster = Roster.from_bytes(console.roster().to_bytes(), key)
    assert [*serials, roster.serial] == [0, 1, 2, 3] and list(roster.entries) == ["h2"]
    # a console home from before serials counts its history (2 sites + 1 revocation)
    state = json.loads((console.home / "console.json").read_text())
    del state["roster_serial"]
    (console.home / "console.json").write_text(json.dumps(state))
    assert ConsoleStore(console.home).roster_serial == 3
