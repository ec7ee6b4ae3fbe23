"""The console takes only site names the coordinator takes (one rule, `check_client_id`),
refusing before any state is written, and refuses a name that differs from an enrolled
site's only in case."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from fedge.cli import main
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleError, ConsoleStore
from fedge.secagg.keys import Identity, Roster


@pytest.mark.parametrize("site", ["a:b@c", "x@hospital", "hospital-a\n", "-x", "a" * 129])
def test_a_name_the_coordinator_refuses_is_refused_before_anything_is_written(
        console: ConsoleStore, site: str) -> None:
    before = (console.home / "console.json").read_bytes()
    with pytest.raises(ConsoleError, match=r"not a client id \(1-128 ASCII letters"):
        create_enrolment(console, site, valid_for=timedelta(days=1))
    assert (console.home / "console.json").read_bytes() == before
    assert not (console.home / "enrolments").exists() or not any(
        (console.home / "enrolments").iterdir())


def test_the_cli_refuses_a_colon_name_and_the_coordinator_never_hears_of_it(
        make_server, capsys) -> None:
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "enrol", "a:b@c"]) != 0
    assert "not a client id" in capsys.readouterr().err
    assert "a:b@c" not in ConsoleStore(server.console.home).sites()
    # nothing is left for sync to trip on: a later offline site goes through
    assert main([*base, "enrol", "--offline", "zz-hospital"]) == 0
    assert main([*base, "sync"]) == 0
    assert [a["site_id"] for a in server.coordinator.fleet()] == ["zz-hospital"]


def test_a_name_differing_from_an_enrolled_site_only_in_case_is_refused(
        console: ConsoleStore) -> None:
    create_enrolment(console, "hospital-a", valid_for=timedelta(days=1))
    serial = console.roster_serial
    with pytest.raises(ConsoleError, match="'Hospital-A' differs from the enrolled site "
                                           "'hospital-a' only in case"):
        create_enrolment(console, "Hospital-A", valid_for=timedelta(days=1))
    assert console.roster_serial == serial and "Hospital-A" not in console.sites()
    # a rename: revoke the old spelling first
    console.revoke_site("hospital-a")
    create_enrolment(console, "Hospital-A", valid_for=timedelta(days=1))
    assert console.active_sites() == ["Hospital-A"]


def test_a_console_holding_a_legacy_name_still_signs_rosters_and_enrols(
        console: ConsoleStore) -> None:
    """A console from before the rule may hold an active 'a:b@c': its roster still
    builds (the agents' signed rosters name it), and other sites still enrol."""
    legacy = Identity.generate().public_bytes()
    state = json.loads((console.home / "console.json").read_text())
    state["sites"]["a:b@c"] = {"curve_public": "A" * 40, "ed25519_public": legacy.hex(),
                               "enrolled": "2026-01-01T00:00:00+00:00", "revoked": False}
    (console.home / "console.json").write_text(json.dumps(state))
    console = ConsoleStore(console.home)
    create_enrolment(console, "site-b", valid_for=timedelta(days=1))
    roster = Roster.from_bytes(console.roster().to_bytes(), console.roster_public_key())
    assert set(roster.entries) == {"a:b@c", "site-b"}


def test_sync_sends_every_other_site_past_a_legacy_name_and_says_which_it_skipped(
        make_server, capsys) -> None:
    """`console sync` stopped at the first site the coordinator refused, so an offline
    site sorted after a legacy 'a:b@c' was never sent."""
    server = make_server()
    home = server.console.home
    base = ["console", "--home", str(home), "--timeout", "5"]
    assert main([*base, "enrol", "--offline", "zz-hospital"]) == 0
    state = json.loads((home / "console.json").read_text())
    legacy = Identity.generate().public_bytes()
    state["sites"]["a:b@c"] = {"curve_public": "A" * 40, "ed25519_public": legacy.hex(),
                               "enrolled": "2026-01-01T00:00:00+00:00", "revoked": False}
    (home / "console.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*base, "sync"]) == 1  # one site could not be sent
    got = capsys.readouterr()
    assert "'a:b@c' not sent" in got.err and "fedge console revoke a:b@c" in got.err
    assert "1 refused: 'a:b@c'" in got.out
    assert [a["site_id"] for a in server.coordinator.fleet()] == ["zz-hospital"]
