"""`fedge console audit`: the security officer reads the coordinator's audit log over
the admin channel (a viewer key will do), filtered by action, job, site, actor and
time, as a table whose site-supplied text cannot drive the terminal, or as JSON
lines. Before it, the audit log was readable only with sqlite3 on the coordinator
host. A real coordinator and admin channel on loopback throughout."""

from __future__ import annotations

import json

import pytest

from fedge.cli import main
from fedge.console.client import AdminError
from tests.console.test_console_cli import two_sites_enrolled

HOSTILE = "GPU\x1b[2J\x1b]0;pwned\x07 hot\x9b"


def plant(server, actor, action, detail) -> None:
    server.call_in_loop(server.coordinator.store.audit, actor, action, detail)


@pytest.fixture
def audited(tmp_path, port, admin_port, make_server, capsys):
    """Two sites enrolled from the CLI, hospital-b revoked, and three entries a round
    would write: an accusation (with terminal escapes in the site's reason), a
    late message and a plain-text detail with a newline."""
    base, server = two_sites_enrolled(tmp_path, port, admin_port, make_server)
    assert main([*base, "revoke", "hospital-b"]) == 0
    plant(server, "coordinator", "share_accusation",
          {"job": "job-1", "round": 2, "site": "hospital-a", "accused": "hospital-b",
           "reason": HOSTILE})
    plant(server, "coordinator", "late_message",
          {"job": "job-2", "round": 1, "site": "hospital-a", "type": "MaskedInput"})
    plant(server, "hospital-a", "task_refused", "line one\nline two\x1b[31m")
    capsys.readouterr()
    return base, server


def test_a_viewer_reads_the_audit_table_with_escapes_shown_not_obeyed(audited, capsys):
    base, _ = audited
    assert main([*base, "--operator", "viewer", "audit"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "ACTOR", "ACTION", "DETAIL"]
    actions = [line.split()[2] for line in lines[1:]]
    # oldest first; the enrolments, the revocation, then the planted three
    assert actions[-4:] == ["admin.revoke", "share_accusation", "late_message",
                            "task_refused"], actions
    assert "enrol" in actions and "revoke" in actions
    accusation = next(line for line in lines if "share_accusation" in line)
    assert accusation.split()[0].endswith("Z") and "\\u001b[2J" in accusation
    assert "\\x9b" in accusation
    refused = lines[-1]
    assert refused.split()[1] == "hospital-a"
    assert "line one\\nline two\\x1b[31m" in refused  # one line, escapes shown


def test_filters_and_json_lines(audited, capsys):
    base, _ = audited
    viewer = [*base, "--operator", "viewer", "audit"]

    def entries(*args: str) -> list[dict]:
        assert main([*viewer, "--json", *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    (revoke,) = entries("--action", "revoke")
    assert revoke["detail"] == {"site": "hospital-b"} and revoke["actor"] == "operator:admin"
    assert revoke["utc"].endswith("Z")
    both = entries("--action", "revoke,late_message", "--action", "share_accusation")
    assert [e["action"] for e in both] == ["revoke", "share_accusation", "late_message"]
    assert [e["action"] for e in entries("--job", "job-1")] == ["share_accusation"]
    # a site: its own entries and those about it (the accused, its revocation)
    about_b = {e["action"] for e in entries("--site", "hospital-b")}
    assert {"enrol", "revoke", "share_accusation"} <= about_b
    assert "late_message" not in about_b and "task_refused" not in about_b
    assert [e["detail"] for e in entries("--actor", "hospital-a")] == [
        "line one\nline two\x1b[31m"]  # not JSON: the text as is (escaped by json)
    assert entries("--since", "2999-01-01") == []
    assert len(entries("--since", "2000-01-01T00:00Z")) >= 6
    # --limit: the newest N, oldest first, and a note that more match
    assert main([*viewer, "--limit", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert [json.loads(x)["action"] for x in out.out.splitlines()] == [
        "late_message", "task_refused"]
    assert "more entries match" in out.err
    # edge checks: one line, nothing sent
    assert main([*viewer, "--since", "yesterday"]) == 2
    assert "--since 'yesterday' is neither a UTC date" in capsys.readouterr().err
    assert main([*viewer, "--limit", "0"]) == 2
    assert "--limit '0' is not a whole number from 1 to 10000" in capsys.readouterr().err


def test_the_admin_op_checks_its_arguments_and_parses_details(audited):
    _, server = audited
    viewer = server.client("viewer")
    result, _ = viewer.call("audit", {"action": ["late_message", "share_accusation"],
                                      "since": "2000-01-01", "limit": 10})
    assert [e["action"] for e in result["entries"]] == ["share_accusation", "late_message"]
    assert result["entries"][0]["detail"]["reason"] == HOSTILE  # parsed JSON
    assert result["more"] is False and result["older_unread"] is False
    assert set(result["entries"][0]) == {"id", "time", "actor", "action", "detail"}
    for bad, said in [({"limit": 0}, "limit 0 is not a whole number"),
                      ({"limit": 10_001}, "limit 10001 is not"),
                      ({"limit": True}, "limit True is not"),
                      ({"since": "soon"}, "--since 'soon' is neither"),
                      ({"action": 3}, "action 3 is not a name"),
                      ({"job": ["x"]}, "job ['x'] is not text")]:
        with pytest.raises(AdminError, match="audit: ") as err:
            viewer.call("audit", bad)
        assert said in str(err.value), (bad, str(err.value))
    # reading the log writes nothing to it
    before = server.coordinator.store.audit_id_span()
    viewer.call("audit", {})
    assert server.coordinator.store.audit_id_span() == before


def test_only_the_newest_entries_are_looked_at_and_the_console_says_so(
        audited, monkeypatch, capsys):
    """The query runs on the coordinator's event loop: it looks at the newest
    AUDIT_SCAN_ENTRIES entries only, and says when older ones were left unread."""
    import fedge.coordinator.admin as admin

    base, server = audited
    monkeypatch.setattr(admin, "AUDIT_SCAN_ENTRIES", 3)
    result, _ = server.client("viewer").call("audit", {"action": "revoke"})
    assert result["entries"] == [] and result["older_unread"] is True
    assert main([*base, "audit", "--action", "late_message"]) == 0
    out = capsys.readouterr()
    assert "late_message" in out.out
    assert ("only the newest 3 audit entries were looked at; for older ones run "
            "`fedge coordinator audit` on the coordinator host") in out.err


def test_a_coordinator_without_the_op_is_named_as_older(audited, monkeypatch, capsys):
    """A coordinator of an earlier release answers "unknown op 'audit'" (as this one
    does without the op in its table): the console says what to do."""
    from fedge.console import protocol

    base, _ = audited
    monkeypatch.delitem(protocol.OPS, "audit")
    assert main([*base, "audit"]) == 1
    err = capsys.readouterr().err
    assert "the coordinator predates `audit`" in err
    assert "upgrade it, or read its audit log on the coordinator host with `fedge " \
           "coordinator audit --config FILE`" in err
