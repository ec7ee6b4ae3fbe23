"""A site name (client id) is one rule everywhere: ASCII letters, digits, '-', '_', '.',
the whole string. Rosters an older console signed with names the old rule let in
(':' '@', a trailing newline) still load."""

from __future__ import annotations

import pytest

from fedge.secagg.errors import SecAggConfigError
from fedge.secagg.keys import Identity, Roster, case_twin, check_client_id


@pytest.mark.parametrize("name", ["site-a", "h1", "Hospital.A_1", "9", "a" * 128])
def test_site_names_of_the_rule_are_client_ids(name: str) -> None:
    assert check_client_id(name) == name


@pytest.mark.parametrize("name", [
    "a:b@c", "x@hospital", "hospital-a\n", "hospital-a\r", "\nhospital-a", "a" * 129,
    "", ".", "..", "-rf", ".hidden", "caf\u00e9", "h\u0663", "site a", "a/b",
    "hospit\u0430l",  # Cyrillic a
])
def test_names_outside_the_rule_are_refused_naming_the_rule(name: str) -> None:
    with pytest.raises(SecAggConfigError, match=r"not a client id \(1-128 ASCII letters"):
        check_client_id(name, what="site")


def test_a_roster_an_older_console_signed_with_legacy_names_still_loads() -> None:
    console = Identity.generate()
    entries = {"a:b@c": Identity.generate().public_bytes(),
               "hospital-a\n": Identity.generate().public_bytes(),
               "site-b": Identity.generate().public_bytes()}
    roster = Roster.build(entries, console, serial=3)
    again = Roster.from_bytes(roster.to_bytes(), console.public_bytes())
    assert dict(again.entries) == entries and again.serial == 3
    with pytest.raises(SecAggConfigError, match="not a client id"):
        Roster.build({"caf\u00e9": bytes(32)}, console)


def test_case_twin_names_the_existing_name_that_differs_only_in_case() -> None:
    assert case_twin("Hospital-A", ["hospital-b", "hospital-a"]) == "hospital-a"
    assert case_twin("hospital-a", ["hospital-a", "hospital-b"]) is None
    assert case_twin("hospital-c", ["hospital-a"]) is None
