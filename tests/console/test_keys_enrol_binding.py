"""The coordinator's allow-list follows the console, not an operator key: the admin
``enrol`` op takes a site's CURVE key only with the console-signed roster naming
the site's identity and the site's enrolment grant (signed with the roster key),
and an enrolled site is never re-keyed before it is revoked. Against a real
coordinator (SQLite) and its admin channel over CurveZMQ on loopback."""

from __future__ import annotations

import pytest

from fedge.cli import main
from fedge.console.client import AdminError
from fedge.console.store import ENROL_GRANT, ConsoleStore
from fedge.update.files import curve_keypair

ATTACKER_IDENTITY = "11" * 32


def console_of(server) -> ConsoleStore:
    """The console as the CLI left it (server.console was read before)."""
    return ConsoleStore(server.console.home)


def keys_of(server) -> dict[str, str]:
    return {a["site_id"]: a["curve_public_z85"] for a in server.coordinator.fleet()
            if a["status"] == "enrolled"}


def test_an_admin_key_alone_cannot_put_a_rogue_site_on_the_allow_list(make_server, capsys):
    """A stolen admin operator key, without the roster key: no roster, the console's
    roster (which does not name the rogue), or a grant of another site: all refused,
    and the rogue key is not let in (before: enrolled and connected)."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "enrol", "h1", "--out", str(server.console.home / "h1.x")]) == 0
    admin = server.client("admin")
    rogue, _ = curve_keypair()
    args = {"site": "rogue", "curve_public": rogue, "ed25519_public": ATTACKER_IDENTITY}
    with pytest.raises(AdminError, match="operator key alone cannot enrol") as refused:
        admin.call("enrol", args)
    # what an operator whose console predates the grant reads: upgrade it, then sync
    assert "a console of an earlier release sends no grant (upgrade it" in str(refused.value)
    roster = console_of(server).roster().to_bytes()
    with pytest.raises(AdminError, match="does not name site 'rogue'"):
        admin.call("enrol", args, {"roster": roster,
                                   ENROL_GRANT: console_of(server).enrol_grant("h1")})
    assert "rogue" not in keys_of(server)
    assert rogue not in server.coordinator.store.allowed_keys()


def test_an_enrolled_site_is_not_re_keyed_and_the_attempt_is_audited(make_server, capsys):
    """A new CURVE key for enrolled h3 (its identity and the console's roster taken
    from what every appliance holds) is refused naming the revoke-first rule and
    audited; h3 keeps its key (before: replaced, and the real h3 was refused)."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "enrol", "h3", "--out", str(server.console.home / "h3.x")]) == 0
    before = keys_of(server)["h3"]
    info = console_of(server).sites()["h3"]
    attacker, _ = curve_keypair()
    admin = server.client("admin")
    with pytest.raises(AdminError, match="not re-keyed while enrolled: revoke it first"):
        admin.call("enrol", {"site": "h3", "curve_public": attacker,
                             "ed25519_public": info["ed25519_public"]},
                   {"roster": console_of(server).roster().to_bytes()})
    assert keys_of(server)["h3"] == before
    alerts = server.coordinator.store.audit_log(action="admin.enrol.rekey_refused")
    assert alerts and attacker in alerts[-1]["detail"]
    # revoked by the stolen key alone, h3 still takes no key the console did not grant
    admin.call("revoke", {"site": "h3"})
    with pytest.raises(AdminError, match="grant names site 'h3' with CURVE key"):
        admin.call("enrol", {"site": "h3", "curve_public": attacker,
                             "ed25519_public": info["ed25519_public"]},
                   {"roster": console_of(server).roster().to_bytes(),
                    ENROL_GRANT: console_of(server).enrol_grant("h3")})
    assert attacker not in server.coordinator.store.allowed_keys()


def test_an_old_grant_is_not_replayed_after_the_site_was_enrolled_anew(make_server, capsys):
    """h1's first enrol request (roster and grant of its first key), replayed after the
    console revoked h1 and enrolled it anew, is refused: the roster it carries is
    older than the one in force, and the roster in force names h1's new identity."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    out = str(server.console.home / "h1.x")
    assert main([*base, "enrol", "h1", "--out", out]) == 0
    old_args, old_blobs = ConsoleStore(server.console.home).enrol_request("h1")
    assert main([*base, "revoke", "h1"]) == 0
    assert main([*base, "enrol", "h1", "--out", out]) == 0  # the console's flow still works
    new_key = keys_of(server)["h1"]
    assert new_key != old_args["curve_public"]
    admin = server.client("admin")
    admin.call("revoke", {"site": "h1"})  # the stolen key alone
    with pytest.raises(AdminError, match="older than the one in force"):
        admin.call("enrol", old_args, old_blobs)
    current = ConsoleStore(server.console.home).roster().to_bytes()
    with pytest.raises(AdminError, match="does not name site 'h1' with identity"):
        admin.call("enrol", old_args, {"roster": current, ENROL_GRANT: old_blobs[ENROL_GRANT]})
    assert old_args["curve_public"] not in server.coordinator.store.allowed_keys()


def test_sync_re_keys_a_site_revoked_and_enrolled_anew_while_the_coordinator_was_away(
        make_server, capsys):
    """Revoked and enrolled again offline, h1 is still enrolled with its old key at the
    coordinator: `console sync` revokes the old key, then enrols the new one."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    out = str(server.console.home / "h1.x")
    assert main([*base, "enrol", "h1", "--out", out]) == 0
    old_key = keys_of(server)["h1"]
    store = ConsoleStore(server.console.home)
    store.revoke_site("h1")  # the console's revoke, its call to the coordinator lost
    assert main([*base, "enrol", "h1", "--offline", "--out", out]) == 0
    assert keys_of(server)["h1"] == old_key
    assert main([*base, "sync"]) == 0
    said = capsys.readouterr().out
    assert "revoked h1's previous key" in said and "enrolled h1" in said
    assert keys_of(server)["h1"] == ConsoleStore(server.console.home).sites()["h1"][
        "curve_public"] != old_key
    assert old_key not in server.coordinator.store.allowed_keys()


def test_console_enrol_says_the_file_holds_secret_keys_and_revoke_removes_its_copy(
        make_server, capsys):
    """With no --out the file goes to the console home's enrolments/ (0700 even under
    umask 022); the operator is told it holds the site's secret keys and to destroy
    it; revoking the site removes it (its keys are dead)."""
    import os
    import stat

    server = make_server()
    home = server.console.home
    base = ["console", "--home", str(home), "--timeout", "5"]
    old = os.umask(0o022)
    try:
        assert main([*base, "enrol", "h1"]) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    file = home / "enrolments" / "h1.fedge-enrol"
    assert f"{file} holds h1's secret keys" in out and "destroy it" in out
    assert stat.S_IMODE((home / "enrolments").stat().st_mode) == 0o700
    assert main([*base, "revoke", "h1"]) == 0
    assert not file.exists()
