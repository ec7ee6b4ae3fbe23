"""`fedge console revoke` while the coordinator does not answer: the console records
the revocation, but the coordinator still lets the key in, and the command says so
and how to finish it (audit s14 M2). Real console CLI, real admin channel over
loopback CurveZMQ, real SQLite."""

from __future__ import annotations

import json

from fedge.cli import main


def test_revoke_with_the_coordinator_down_says_the_key_is_still_accepted_and_a_rerun_revokes(
        tmp_path, port, admin_port, make_server, capsys):
    home = tmp_path / "c"
    base = ["console", "--home", str(home), "--timeout", "1"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    server = make_server(home)
    assert main([*base, "enrol", "h2"]) == 0
    server.close()  # the coordinator goes away
    capsys.readouterr()

    assert main([*base, "revoke", "h2"]) == 1
    err = capsys.readouterr().err
    assert "no reply from the coordinator" in err
    assert ("h2 is revoked in this console but NOT on the coordinator: its key is still "
            "accepted there") in err
    assert "run `fedge console revoke h2` (or `fedge console sync`) again" in err
    record = json.loads((home / "console.json").read_text())
    assert record["sites"]["h2"]["revoked"] is True
    serial, revoked_at = record["roster_serial"], record["sites"]["h2"]["revoked_at"]

    # the coordinator is back (same database): it still has h2 enrolled, as said
    server = make_server(home)
    assert {a["site_id"]: a["status"] for a in server.coordinator.fleet()} == {
        "h2": "enrolled"}
    assert main([*base, "revoke", "h2"]) == 0  # the console already marked it revoked
    assert "revoked h2: connection dropped" in capsys.readouterr().out
    assert {a["site_id"]: a["status"] for a in server.coordinator.fleet()} == {
        "h2": "revoked"}
    # the console's record is the first revocation's, not a second one
    record = json.loads((home / "console.json").read_text())
    assert record["roster_serial"] == serial
    assert record["sites"]["h2"]["revoked_at"] == revoked_at


def test_revoking_a_site_the_coordinator_never_had_says_so_and_succeeds(
        tmp_path, port, admin_port, make_server, capsys):
    home = tmp_path / "c"
    base = ["console", "--home", str(home), "--timeout", "5"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    server = make_server(home)
    assert main([*base, "enrol", "h3", "--offline"]) == 0
    capsys.readouterr()
    assert main([*base, "revoke", "h3"]) == 0
    assert "the coordinator never had it" in capsys.readouterr().out
    assert server.coordinator.fleet() == []
