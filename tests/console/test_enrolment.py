"""Console key store and enrolment: one signed file per site, installed 0600."""

import base64
import json
import os
import stat
from datetime import timedelta
from pathlib import Path

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


def test_the_fingerprint_the_console_prints_is_what_the_appliance_checks(tmp_path):
    """Hospital IT reads the fingerprint off the console operator's screen and passes
    it to `fedge agent enrol --console-key`: it is accepted, another console's file is
    refused as foreign, and a too-short or non-hex value is refused by name."""
    import re
    import subprocess
    import sys

    def fedge(*argv):
        return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                              text=True, timeout=120)

    files = {}
    prints = {}
    for name in ("ours", "theirs"):
        home = tmp_path / name
        assert fedge("console", "--home", str(home), "init", "--coordinator",
                     "tcp://127.0.0.1:7009").returncode == 0
        r = fedge("console", "--home", str(home), "enrol", "h1", "--offline",
                  "--out", str(tmp_path / f"{name}.enrol"))
        assert r.returncode == 0, r.stderr
        prints[name] = re.search(r"console key fingerprint: ([0-9a-f]+)", r.stdout).group(1)
        files[name] = tmp_path / f"{name}.enrol"
    assert len(prints["ours"]) == 16 and prints["ours"] != prints["theirs"]
    r = fedge("agent", "enrol", str(files["theirs"]), "--state-dir", str(tmp_path / "a"),
              "--console-key", prints["ours"])
    assert r.returncode == 2 and "is foreign" in r.stderr and prints["theirs"] in r.stderr
    assert not (tmp_path / "a" / "enrolment.json").exists()
    for bad in ("1f67b44c", "not-hex-at-all-but-long"):
        r = fedge("agent", "enrol", str(files["ours"]), "--state-dir", str(tmp_path / "a"),
                  "--console-key", bad)
        assert r.returncode == 2 and "neither a console key fingerprint" in r.stderr
    r = fedge("agent", "enrol", str(files["ours"]), "--state-dir", str(tmp_path / "a"),
              "--console-key", prints["ours"].upper())
    assert r.returncode == 0, r.stderr
    assert f"with console key {prints['ours']}" in r.stdout
    assert load_enrolled(tmp_path / "a").site == "h1"


def test_the_console_key_fingerprint_has_one_name_and_the_wrong_one_is_named(tmp_path):
    """`console init` printed the console id beside the roster key's fingerprint and
    `console enrol` called the fingerprint something else; an operator gave the id to
    `agent enrol --console-key` and was told "this appliance trusts console <id>", which
    only echoed what was typed. Now init and enrol print the one value under one name,
    and the refusal says what signed the file, what was given, and where the right
    value is printed."""
    import re
    import subprocess
    import sys

    def fedge(*argv):
        return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                              text=True, timeout=120)

    home = tmp_path / "console"
    init = fedge("console", "--home", str(home), "init", "--coordinator",
                 "tcp://127.0.0.1:7009")
    assert init.returncode == 0, init.stderr
    enrol = fedge("console", "--home", str(home), "enrol", "h1", "--offline",
                  "--out", str(tmp_path / "h1.fedge-enrol"))
    assert enrol.returncode == 0, enrol.stderr
    named = re.compile(r"console key fingerprint: ([0-9a-f]{16}) \(give it to "
                       r"`fedge agent enrol --console-key`")
    [key] = named.findall(init.stdout)
    assert named.findall(enrol.stdout) == [key]
    assert key == ConsoleStore(home).roster_public_key().hex()[:16]
    for out in (init.stdout, enrol.stdout):  # no other name for it
        assert "roster key fingerprint" not in out and "console fingerprint" not in out
    [console_id] = re.findall(r"console id ([0-9a-f]+)", init.stdout)
    assert console_id != key

    r = fedge("agent", "enrol", "--state-dir", str(tmp_path / "a"), "--console-key",
              console_id, str(tmp_path / "h1.fedge-enrol"))
    assert r.returncode == 2
    assert (f"signed by console key {key}, not the {console_id} given with --console-key"
            in r.stderr)
    assert "printed by `fedge console init` and `fedge console enrol`" in r.stderr
    assert f"{console_id} is the console id" in r.stderr
    assert "trusts console" not in r.stderr
    assert not (tmp_path / "a").exists()


def test_a_file_of_another_console_names_the_console_key_the_appliance_is_enrolled_with(
        console, tmp_path, clock):
    other = ConsoleStore.init(tmp_path / "other", coordinator_endpoint="tcp://10.0.0.9:1",
                              clock=clock)
    state = tmp_path / "agent"
    install_enrolment(create_enrolment(console, "h1", valid_for=timedelta(days=1))[0], state,
                      now=clock())
    foreign, _ = create_enrolment(other, "h1", valid_for=timedelta(days=1))
    mine, theirs = (c.roster_public_key().hex()[:16] for c in (console, other))
    with pytest.raises(EnrolmentError) as err:
        install_enrolment(foreign, state, now=clock())
    assert (f"signed by console key {theirs}, not console key {mine} that this appliance "
            f"is enrolled with ({state / 'enrolment.json'})") in str(err.value)


def test_an_enrolment_whose_dates_have_no_time_zone_is_refused_as_corrupt(console, tmp_path,
                                                                         clock):
    """Validly signed, but `expires` without a zone cannot be compared with now."""
    path, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1))
    outer = json.loads(path.read_text())
    payload = json.loads(base64.b64decode(outer["payload"]))
    payload["expires"] = "2030-01-01T00:00:00"
    raw = json.dumps(payload, sort_keys=True).encode()
    outer["payload"] = base64.b64encode(raw).decode()
    outer["signature"] = console.roster_identity().sign(raw).hex()
    path.write_text(json.dumps(outer))
    with pytest.raises(EnrolmentError, match="corrupt: expires 2030-01-01T00:00:00 has no "
                                             "time zone"):
        install_enrolment(path, tmp_path / "agent", now=clock())
    assert not (tmp_path / "agent").exists()


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


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to enrol as root for another user, as hospital IT does")
def test_enrolled_as_root_into_the_service_users_state_dir_the_agent_can_read_it(tmp_path):
    """`sudo fedge agent enrol FILE` writes into /var/lib/fedge, which the package made
    the fedge user's; the agent then runs as that user. Here the state dir belongs to
    nobody (65534): after enrolling as root, every file under it is nobody's (modes
    kept), and nobody can load the enrolment. A state dir left root's own is named,
    with the fix, when the service user cannot read it."""
    import subprocess
    import sys
    import tempfile

    live = ConsoleStore.init(tmp_path / "live", coordinator_endpoint="tcp://127.0.0.1:7001")
    path, _ = create_enrolment(live, "h3", valid_for=timedelta(days=1))
    base = Path(tempfile.mkdtemp(prefix="fedge-owner-"))  # reachable by nobody
    try:
        os.chmod(base, 0o755)
        os.chmod(path, 0o644)
        state = base / "state"
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
        r = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", str(path),
                            "--state-dir", str(state)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        owners = {(p.relative_to(state).as_posix(), p.stat().st_uid) for p in state.rglob("*")}
        assert owners and {uid for _, uid in owners} == {65534}, owners
        assert _mode(state / "keys" / "identity.key") == 0o600
        load = ("from fedge.agent.process import load_enrolled; import sys; "
                "print(load_enrolled(sys.argv[1]).site)")
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     sys.executable, "-c", load]
        r = subprocess.run([*as_nobody, str(state)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "h3", r.stderr
        # before the hand-over existed: root's files in a dir nobody may enter
        other = base / "root-owned"
        install_enrolment(path, other)
        os.chmod(other, 0o755)
        r = subprocess.run([*as_nobody, str(other)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode != 0
        assert "cannot be read as user nobody: Permission denied" in r.stderr
        assert f"chown -R fedge: {other}" in r.stderr and "corrupt" not in r.stderr
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
