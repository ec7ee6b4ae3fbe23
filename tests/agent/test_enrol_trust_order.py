"""`fedge agent enrol` never moves an appliance's trust backwards: a file whose
roster is older (by serial) than the roster in force here is refused, even with
--replace (it can name a site the console revoked since), and a file of the same
site issued before the enrolment installed here (its keys revoked since) is refused
unless --replace. Nothing is written when refused. Real console, real signed
enrolment files, the real command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore
from fedge.secagg.keys import Roster


def fedge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def held_roster(state: Path) -> tuple[int, list[str]]:
    key = bytes.fromhex(json.loads((state / "enrolment.json").read_text())["roster_public_key"])
    roster = Roster.from_bytes((state / "roster.json").read_bytes(), key)
    return roster.serial, sorted(roster.entries)


def console_at(home: Path, when: datetime) -> ConsoleStore:
    """The console home opened with its clock at `when` (the file's issue date)."""
    return ConsoleStore(home, clock=lambda: when)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    return tmp_path / "console"


def test_a_sites_own_file_run_again_does_not_bring_back_a_revoked_site(home, tmp_path):
    """inc1f: h1's roster went from serial 3 {h1} back to serial 2 {h1, h3}."""
    console = ConsoleStore(home)
    create_enrolment(console, "h3", valid_for=timedelta(days=1), out=tmp_path / "h3.fedge-enrol")
    h1_file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                                  out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "h1"
    r = fedge("agent", "enrol", "--state-dir", str(state), str(h1_file))
    assert r.returncode == 0, r.stderr
    assert held_roster(state) == (2, ["h1", "h3"])
    console.revoke_site("h3")
    # the RosterUpdate the coordinator sends on connect, kept as the runtime keeps it
    (state / "roster.json").write_bytes(console.roster().to_bytes())
    assert held_roster(state) == (3, ["h1"])
    before = {p.name: p.read_bytes() for p in (state / "keys").iterdir()}

    for extra in ([], ["--replace"]):
        r = fedge("agent", "enrol", "--state-dir", str(state), *extra, str(h1_file))
        assert r.returncode == 2, (extra, r.stdout)
        assert "roster serial 2, older than the roster serial 3" in r.stderr, r.stderr
        assert "nothing changed" in r.stderr
    assert held_roster(state) == (3, ["h1"])
    assert {p.name: p.read_bytes() for p in (state / "keys").iterdir()} == before


def test_an_older_file_of_the_same_site_does_not_replace_the_newer_enrolment(home, tmp_path):
    """inc1b step E: the pre-revocation file of h2 over its re-enrolment."""
    t_old = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    t_new = t_old + timedelta(hours=1)
    old_file, _ = create_enrolment(console_at(home, t_old), "h2", valid_for=timedelta(days=1),
                                   out=tmp_path / "h2-old.fedge-enrol")
    console_at(home, t_new).revoke_site("h2")
    new_file, _ = create_enrolment(console_at(home, t_new), "h2", valid_for=timedelta(days=1),
                                   out=tmp_path / "h2-new.fedge-enrol")
    state = tmp_path / "h2"
    r = fedge("agent", "enrol", "--state-dir", str(state), str(new_file))
    assert r.returncode == 0, r.stderr
    keys = (state / "keys" / "curve.json").read_bytes()
    enrolment = (state / "enrolment.json").read_bytes()

    r = fedge("agent", "enrol", "--state-dir", str(state), str(old_file))
    assert r.returncode == 2, r.stdout
    assert "roster serial 1, older than the roster serial 3" in r.stderr, r.stderr
    assert (f"was issued {t_old.isoformat()}, before the enrolment of site 'h2' installed "
            f"here (issued {t_new.isoformat()})") in r.stderr
    assert (state / "keys" / "curve.json").read_bytes() == keys
    assert (state / "enrolment.json").read_bytes() == enrolment
    assert len((state / "enrolment-history.jsonl").read_text().splitlines()) == 1


def test_where_the_rosters_cannot_be_compared_the_issue_dates_still_are(home, tmp_path):
    """A held roster that is gone (or does not verify) is not compared: the older
    file is then refused by its issue date alone, and --replace installs it."""
    t_old = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    t_new = t_old + timedelta(hours=1)
    old_file, _ = create_enrolment(console_at(home, t_old), "h2", valid_for=timedelta(days=1),
                                   out=tmp_path / "h2-old.fedge-enrol")
    console_at(home, t_new).revoke_site("h2")
    new_file, _ = create_enrolment(console_at(home, t_new), "h2", valid_for=timedelta(days=1),
                                   out=tmp_path / "h2-new.fedge-enrol")
    state = tmp_path / "h2"
    install_enrolment(new_file, state)
    (state / "roster.json").unlink()
    with pytest.raises(EnrolmentError, match=r"issued .* before the enrolment of site 'h2'"):
        install_enrolment(old_file, state)
    assert not (state / "roster.json").exists()
    site = install_enrolment(old_file, state, replace=True)
    assert site.site == "h2" and held_roster(state)[0] == 1


def test_the_same_file_again_and_a_newer_one_are_still_taken(home, tmp_path):
    console = ConsoleStore(home)
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "h1"
    install_enrolment(file, state)
    install_enrolment(file, state)  # the command run twice
    console.revoke_site("h1")
    newer, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                                out=tmp_path / "h1-new.fedge-enrol")
    install_enrolment(newer, state)
    assert held_roster(state) == (3, ["h1"])
