"""`fedge agent enrol` through the real command: where the state goes (the agent
config's state_dir, or --state-dir), and an enrolment for another site (or console)
is never installed over this appliance's own without --replace."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment, load_enrolled
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore


def fedge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def tree(state: Path) -> dict[str, bytes]:
    """Every file under `state`, by relative path: what 'nothing changed' compares."""
    return {p.relative_to(state).as_posix(): p.read_bytes()
            for p in sorted(state.rglob("*")) if p.is_file()}


@pytest.fixture
def console(tmp_path: Path) -> ConsoleStore:
    return ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")


def enrolment_file(console: ConsoleStore, site: str, tmp_path: Path) -> Path:
    path, _ = create_enrolment(console, site, valid_for=timedelta(days=1),
                               out=tmp_path / f"{site}.fedge-enrol")
    return path


def key_of(console: ConsoleStore) -> str:
    return console.roster_public_key().hex()[:16]


# --- where the state goes -------------------------------------------------------------

def test_enrol_with_the_agents_config_installs_into_its_state_dir(console, tmp_path):
    """`fedge agent --config h1/agent.toml enrol FILE` (the order the docs use for the
    agent's other actions) enrols into that config's state_dir, relative to the config
    as the agent reads it, not into /var/lib/fedge; `enrol --config` does the same."""
    file = enrolment_file(console, "h1", tmp_path)
    (tmp_path / "h1").mkdir()
    config = tmp_path / "h1" / "agent.toml"
    config.write_text('state_dir = "state"\nhealth = false\n')
    state = tmp_path / "h1" / "state"
    r = fedge("agent", "--config", str(config), "enrol", "--console-key", key_of(console),
              str(file))
    assert r.returncode == 0, r.stderr
    assert f"state in {state}" in r.stdout
    assert load_enrolled(state).site == "h1"

    other = tmp_path / "h1b.toml"
    other.write_text(f'state_dir = "{tmp_path / "h1b"}"\n')
    r = fedge("agent", "enrol", "--config", str(other), str(file))
    assert r.returncode == 0, r.stderr
    assert load_enrolled(tmp_path / "h1b").site == "h1"


def test_state_dir_and_config_naming_two_places_is_refused(console, tmp_path):
    file = enrolment_file(console, "h1", tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "from-config"}"\n')
    r = fedge("agent", "--config", str(config), "enrol", "--state-dir",
              str(tmp_path / "from-flag"), str(file))
    assert r.returncode == 2
    assert str(tmp_path / "from-config") in r.stderr and str(tmp_path / "from-flag") in r.stderr
    assert not (tmp_path / "from-config").exists() and not (tmp_path / "from-flag").exists()
    # both naming the same directory is no conflict
    r = fedge("agent", "--config", str(config), "enrol", "--state-dir",
              str(tmp_path / "from-config"), str(file))
    assert r.returncode == 0, r.stderr
    assert load_enrolled(tmp_path / "from-config").site == "h1"


def test_an_unreadable_config_is_refused_before_anything_is_written(console, tmp_path):
    file = enrolment_file(console, "h1", tmp_path)
    config = tmp_path / "agent.toml"
    config.write_text('state_dir = "s"\nno_such_key = 1\n')
    r = fedge("agent", "--config", str(config), "enrol", str(file))
    assert r.returncode == 2 and "no_such_key" in r.stderr
    assert not (tmp_path / "s").exists()


# --- another site over this one ---------------------------------------------------------

def test_another_sites_enrolment_is_refused_over_this_one_and_nothing_changes(console,
                                                                              tmp_path):
    """The ML engineer's slip: h2's file enrolled into h1's state dir. Before, rc 0 and
    the appliance silently became h2, carrying h1's privacy ledger and reveal log."""
    h1, h2 = enrolment_file(console, "h1", tmp_path), enrolment_file(console, "h2", tmp_path)
    state = tmp_path / "state"
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key_of(console),
              str(h1))
    assert r.returncode == 0, r.stderr
    before = tree(state)
    r = fedge("agent", "enrol", "--state-dir", str(state), str(h2))
    assert r.returncode == 2
    assert "'h1'" in r.stderr and "'h2'" in r.stderr and str(state) in r.stderr
    assert "--replace" in r.stderr
    assert tree(state) == before
    assert load_enrolled(state).site == "h1"
    with pytest.raises(EnrolmentError, match="already holds the enrolment of site 'h1'"):
        install_enrolment(h2, state)
    assert tree(state) == before


def test_replace_enrols_another_site_and_keeps_the_ledger_and_reveal_log(console, tmp_path):
    """--replace makes the appliance h2. Its privacy ledger and reveal log describe its
    data, not its name: the budget spent stays spent, and an update revealed under h1
    cannot be revealed again over another survivor set under h2."""
    h1, h2 = enrolment_file(console, "h1", tmp_path), enrolment_file(console, "h2", tmp_path)
    state = tmp_path / "state"
    install_enrolment(h1, state)
    ledger = state / "privacy" / "ledger.json"
    reveals = state / "secagg" / "revealed.jsonl"
    for path, text in ((ledger, '{"entries": []}\n'), (reveals, '{"digest": "ab"}\n')):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    kept = {p: p.read_bytes() for p in (ledger, reveals)}
    r = fedge("agent", "enrol", "--state-dir", str(state), "--replace", str(h2))
    assert r.returncode == 0, r.stderr
    assert "replaced site 'h1'" in r.stdout and "privacy ledger" in r.stdout
    assert json.loads((state / "enrolment.json").read_text())["site"] == "h2"
    assert load_enrolled(state).site == "h2"
    assert {p: p.read_bytes() for p in kept} == kept


def test_the_same_site_enrols_again_as_before(console, tmp_path):
    """Running the command twice, or a renewed file for the same site (revoked and
    enrolled again at the console: a new identity), needs no --replace."""
    state = tmp_path / "state"
    first = enrolment_file(console, "h1", tmp_path)
    for _ in range(2):
        r = fedge("agent", "enrol", "--state-dir", str(state), str(first))
        assert r.returncode == 0, r.stderr
        assert "replaced" not in r.stdout
    old_identity = (state / "keys" / "identity.key").read_bytes()
    console.revoke_site("h1")
    renewed, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                                  out=tmp_path / "h1-renewed.fedge-enrol")
    r = fedge("agent", "enrol", "--state-dir", str(state), str(renewed))
    assert r.returncode == 0, r.stderr
    assert (state / "keys" / "identity.key").read_bytes() != old_identity
    assert load_enrolled(state).site == "h1"


def test_a_site_of_another_console_is_another_site(console, tmp_path):
    """Site names are a console's own: h1 of another console (trusted with
    --console-key) is not this appliance's h1, so it too needs --replace."""
    theirs = ConsoleStore.init(tmp_path / "theirs", coordinator_endpoint="tcp://127.0.0.1:7001")
    state = tmp_path / "state"
    install_enrolment(enrolment_file(console, "h1", tmp_path), state)
    before = tree(state)
    foreign, _ = create_enrolment(theirs, "h1", valid_for=timedelta(days=1),
                                  out=tmp_path / "theirs-h1.fedge-enrol")
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key_of(theirs),
              str(foreign))
    assert r.returncode == 2
    assert key_of(console) in r.stderr and key_of(theirs) in r.stderr
    assert tree(state) == before
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key_of(theirs),
              "--replace", str(foreign))
    assert r.returncode == 0, r.stderr
    assert load_enrolled(state).roster_public_key == theirs.roster_public_key()


def test_a_corrupt_enrolment_state_is_replaced_only_when_asked(console, tmp_path):
    state = tmp_path / "state"
    file = enrolment_file(console, "h1", tmp_path)
    state.mkdir()
    (state / "enrolment.json").write_text("{not json")
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key_of(console),
              str(file))
    assert r.returncode == 2 and "corrupt" in r.stderr and "--replace" in r.stderr
    assert (state / "enrolment.json").read_text() == "{not json"
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key_of(console),
              "--replace", str(file))
    assert r.returncode == 0, r.stderr
    assert load_enrolled(state).site == "h1"


def test_an_expired_file_on_a_fast_appliance_points_at_its_clock(console, tmp_path):
    """A fresh file (valid a day) on an appliance whose clock is 8 days fast reads as
    expired: the refusal says to check this appliance's clock and what it reads."""
    from datetime import UTC, datetime

    path = enrolment_file(console, "h1", tmp_path)
    fast = datetime.now(UTC).replace(microsecond=0) + timedelta(days=8)
    with pytest.raises(EnrolmentError) as err:
        install_enrolment(path, tmp_path / "state", now=fast)
    assert str(err.value).endswith(
        f"ask the console for a new one, or check this appliance's clock (it reads "
        f"{fast.isoformat()}): one that is fast makes a file expire early")
    assert not (tmp_path / "state").exists()
