"""A site on the coordinator that this console did not enrol (enrolled from a leaked
copy of the console home): `sync` names it with its keys and the command to revoke it,
and `revoke` expels it, roster included (audit s14 M1). Real console CLI, real admin
channel over loopback CurveZMQ, real SQLite."""

from __future__ import annotations

import json
import shutil

from fedge.cli import main
from fedge.secagg.keys import Roster


def test_sync_names_a_site_from_a_leaked_console_copy_and_revoke_expels_it(
        tmp_path, port, admin_port, make_server, capsys):
    home, leaked = tmp_path / "c", tmp_path / "leaked"
    base = ["console", "--home", str(home), "--timeout", "5"]
    thief = ["console", "--home", str(leaked), "--timeout", "5"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    server = make_server(home)
    assert main([*base, "enrol", "h1"]) == 0
    shutil.copytree(home, leaked)
    # two rogue sites: the thief's roster serial (3) is above the hospital's (1)
    assert main([*thief, "enrol", "sybil"]) == 0
    assert main([*thief, "enrol", "sybil2"]) == 0
    fleet = {a["site_id"]: a for a in server.coordinator.fleet()}
    assert {s: a["status"] for s, a in fleet.items()} == {
        "h1": "enrolled", "sybil": "enrolled", "sybil2": "enrolled"}
    capsys.readouterr()

    assert main([*base, "sync"]) == 0
    out, err = capsys.readouterr()
    assert "in sync: 1 active" not in out
    assert "NOT in sync" in out and "sybil, sybil2" in out
    for site in ("sybil", "sybil2"):
        assert (f"the coordinator has site {site} enrolled, which this console did not "
                f"enrol (CURVE key {fleet[site]['curve_public_z85']}, identity "
                f"{fleet[site]['ed25519_public'][:16]})") in err
        assert f"`fedge console revoke {site}`" in err
    # a warning only: sync revokes nothing it did not enrol
    assert server.coordinator.fleet()[1]["status"] == "enrolled"

    assert main([*base, "revoke", "sybil"]) == 0
    out, err = capsys.readouterr()
    assert "sybil was not enrolled by this console" in out
    assert "revoked sybil: connection dropped" in out
    assert "warning" not in err
    statuses = {a["site_id"]: a["status"] for a in server.coordinator.fleet()}
    assert statuses == {"h1": "enrolled", "sybil": "revoked", "sybil2": "enrolled"}
    # the roster in force no longer names it, though the thief's was numbered higher
    key = server.console.roster_public_key()
    assert "sybil" not in Roster.from_bytes(server.coordinator.roster, key).entries
    record = json.loads((home / "console.json").read_text())["sites"]["sybil"]
    assert record["revoked"] is True and record["not_enrolled_here"] is True
    assert record["curve_public"] == fleet["sybil"]["curve_public_z85"]

    assert main([*base, "sync"]) == 0  # sybil2 is still named; sybil no longer
    out, err = capsys.readouterr()
    assert "site sybil2 enrolled" in err and "site sybil " not in err
    assert main([*base, "revoke", "sybil2"]) == 0
    assert main([*base, "sync"]) == 0
    assert "coordinator in sync: 1 active site(s)" in capsys.readouterr().out
    roster = Roster.from_bytes(server.coordinator.roster, key)
    assert set(roster.entries) == {"h1"}

    # a name neither has: nothing to revoke anywhere
    assert main([*base, "revoke", "nobody"]) == 1
    assert ("site 'nobody' is not enrolled in this console (enrolled: h1, sybil, sybil2) "
            "nor on the coordinator") in capsys.readouterr().err


def test_rotate_keys_says_sites_enrolled_by_a_copy_stay_enrolled(
        tmp_path, port, admin_port, make_server, capsys):
    home = tmp_path / "c"
    base = ["console", "--home", str(home), "--timeout", "5"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    make_server(home)
    capsys.readouterr()
    assert main([*base, "rotate-keys", "--role", "targets"]) == 0
    out = capsys.readouterr().out
    assert "refused by every appliance" in out
    assert "sites enrolled meanwhile by a copy of this console's home stay enrolled" in out
    assert "`fedge console sync`" in out and "`fedge console revoke SITE`" in out
