"""A site whose privacy ledger went back (its disk restored from an older backup) is
caught by the coordinator, which keeps the most released runs each site reported:
real Coordinator, real SQLite, heartbeats through the real codec."""

from __future__ import annotations

import json
import sqlite3

import numpy as np

from fedge import __version__
from fedge.console.fleet import fleet_rows
from fedge.console.protocol import AdminRequest
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.cohort import LEDGER_RELEASED, select_cohort
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import SCHEMA_VERSION, Store
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.conftest import Clock

SITES = ("site-a", "site-b")


def coordinator(state_dir, clock):
    coord = Coordinator(state_dir, heartbeat_timeout_s=30.0, clock=clock,
                        initial_weights=lambda plan: np.zeros(4, np.float32))
    return coord


def enrol(coord):
    for i, s in enumerate(SITES):
        coord.enrol(s, f"{i:040d}", bytes([i + 1]) * 32, actor="test")


def beat(coord, site, released):
    health = {} if released is None else {LEDGER_RELEASED: released}
    coord.handle_frames(site, codec.encode(m.Heartbeat(
        site=site, version=__version__, health_json=json.dumps(health), eligible=True,
        reason="", datasets=["d"], current_task=""), sender=site))


def told(coord, site):
    """The Rejected notices sent to ``site`` (and empties the outbox)."""
    out = [o.body.reason for o in coord.outbox
           if o.site == site and isinstance(o.body, m.Rejected)]
    coord.outbox.clear()
    return out


def cohort(coord):
    return select_cohort(coord.store.appliances(), connected=coord.connected_sites(),
                         dataset="d")


def fleet(coord):
    return {a["site_id"]: a for a in coord.fleet()}


def test_a_site_reporting_fewer_released_runs_is_flagged_told_and_left_out_until_accepted(
        tmp_path, caplog):
    clock = Clock()
    coord = coordinator(tmp_path, clock)
    enrol(coord)
    beat(coord, "site-a", 4)
    beat(coord, "site-b", 3)
    assert told(coord, "site-a") == []
    assert cohort(coord).candidates == ["site-a", "site-b"]

    caplog.set_level("WARNING", logger="fedge.coordinator")
    beat(coord, "site-a", 2)  # its disk restored: two released runs fewer
    (row,) = coord.store.audit_log(action="privacy_ledger_rolled_back")
    assert (row["actor"], json.loads(row["detail"])) == (
        "coordinator", {"site": "site-a", "was": 4, "now": 2})
    warned = [r.getMessage() for r in caplog.records if "privacy ledger" in r.getMessage()]
    assert len(warned) == 1 and "site-a's privacy ledger holds 2 released runs, fewer " \
        "than the 4 it reported before" in warned[0], warned
    (notice,) = told(coord, "site-a")
    assert "site-a's privacy ledger holds 2 released runs, fewer than the 4" in notice
    assert "fedge console ledger-ack site-a" in notice
    assert len(notice) <= 300  # an agent's journal shows 300 characters of a Rejected

    sel = cohort(coord)
    assert sel.candidates == ["site-b"]
    assert sel.excluded["site-a"] == (
        "site-a's privacy ledger holds 2 released runs, fewer than the 4 it reported "
        "before (restored from a backup?): its privacy budget cannot be trusted; the "
        "site's operator must restore the newer ledger, or the coordinator's operator "
        "runs `fedge console ledger-ack site-a` to accept the lower count")
    a = fleet(coord)["site-a"]
    assert a["eligible"] is False and a["eligibility_reason"] == sel.excluded["site-a"]
    assert a["privacy_ledger"] == {"released_mark": 4, "released_now": 2,
                                   "rolled_back": True}
    (row_a,) = [r for r in fleet_rows(list(fleet(coord).values())) if r[0] == "site-a"]
    assert row_a[5].startswith("no: PRIVACY LEDGER ROLLED BACK (2 released runs, 4 before)")

    # said once: the next heartbeats add no row, no warning, no notice
    beat(coord, "site-a", 2)
    beat(coord, "site-a", 3)  # a run it released meanwhile: still behind
    assert len(coord.store.audit_log(action="privacy_ledger_rolled_back")) == 1
    assert len([r for r in caplog.records if "privacy ledger" in r.getMessage()]) == 1
    assert told(coord, "site-a") == []
    assert "holds 3 released runs, fewer than the 4" in cohort(coord).excluded["site-a"]

    # the flag outlives the coordinator (SQLite), and the site is told again on return
    coord.store.close()
    coord = coordinator(tmp_path, clock)
    assert "fewer than the 4" in fleet(coord)["site-a"]["eligibility_reason"]
    beat(coord, "site-a", 3)
    beat(coord, "site-b", 3)
    assert cohort(coord).candidates == ["site-b"]
    assert len(told(coord, "site-a")) == 1

    # a viewer may not accept it; an admin (the role that may revoke) may, audited
    service = AdminService(coord, {"kv": Operator("vic", "viewer"),
                                   "ka": Operator("alice", "admin")})
    denied = service.handle("kv", AdminRequest("ledger_ack", '{"site": "site-a"}', {}))
    assert not denied.ok and "needs role admin" in denied.error
    ok = service.handle("ka", AdminRequest("ledger_ack", '{"site": "site-a"}', {}))
    assert ok.ok, ok.error
    assert json.loads(ok.result_json) == {"site": "site-a", "was": 4, "now": 3}
    (accepted,) = coord.store.audit_log(action="privacy_ledger_accepted")
    assert (accepted["actor"], json.loads(accepted["detail"])) == (
        "operator:alice", {"site": "site-a", "was": 4, "now": 3})
    assert cohort(coord).candidates == ["site-a", "site-b"]
    assert fleet(coord)["site-a"]["eligible"] is True
    again = service.handle("ka", AdminRequest("ledger_ack", '{"site": "site-a"}', {}))
    assert not again.ok and "not flagged as rolled back" in again.error
    # the accepted count is the new mark: fewer than it is caught again
    beat(coord, "site-a", 2)
    assert "fewer than the 3" in cohort(coord).excluded["site-a"]
    coord.store.close()


def test_a_site_whose_newer_ledger_is_restored_is_a_candidate_again_by_itself(tmp_path):
    clock = Clock()
    coord = coordinator(tmp_path, clock)
    enrol(coord)
    beat(coord, "site-b", 0)
    beat(coord, "site-a", 5)
    beat(coord, "site-a", 1)
    assert cohort(coord).candidates == ["site-b"]
    beat(coord, "site-a", 5)  # the newer privacy/ and secagg/ put back
    beat(coord, "site-a", 5)
    assert cohort(coord).candidates == ["site-b"]  # once it holds: three reports in a row
    assert coord.store.audit_log(action="privacy_ledger_caught_up") == []
    beat(coord, "site-a", 5)
    (row,) = coord.store.audit_log(action="privacy_ledger_caught_up")
    assert json.loads(row["detail"]) == {"site": "site-a", "was": 5, "now": 5}
    assert cohort(coord).candidates == ["site-a", "site-b"]
    assert "privacy_ledger" in fleet(coord)["site-a"]
    assert fleet(coord)["site-a"]["privacy_ledger"]["rolled_back"] is False
    # a heartbeat without the field (an agent before it) changes nothing
    beat(coord, "site-a", None)
    beat(coord, "site-a", True)  # not a count
    assert cohort(coord).candidates == ["site-a", "site-b"]
    coord.store.close()


def test_a_version_2_database_gains_the_ledger_marks_at_open(tmp_path):
    store = Store(tmp_path)
    store.enrol("site-a", "0" * 40, b"\x01" * 32, actor="test")
    store.close()
    conn = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    conn.execute("DROP TABLE ledger_marks")
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    again = Store(tmp_path)
    assert again.schema_version() == SCHEMA_VERSION == 3
    (migrated,) = again.audit_log(action="schema_migrated")
    assert json.loads(migrated["detail"]) == {"from": 2, "to": 3}
    assert again.appliance("site-a").ledger_mark is None
    assert again.note_ledger_released("site-a", 2) == []
    (event,) = again.note_ledger_released("site-a", 1)
    assert (event.action, event.was, event.now) == ("privacy_ledger_rolled_back", 2, 1)
    again.close()
    reopened = Store(tmp_path)
    a = reopened.appliance("site-a")
    assert (a.ledger_mark, a.ledger_rolled_back_to) == (2, 1)
    reopened.close()


def _stored_marks(state_dir) -> dict[str, tuple[int, int | None]]:
    with sqlite3.connect(state_dir / "coordinator.sqlite3") as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT site_id, released, rolled_back_to FROM ledger_marks")}


def test_a_mark_that_only_rises_is_written_with_the_heartbeats_not_per_report(tmp_path):
    """Each site's count rises once a round: a synchronous transaction each (500 sites:
    500 fsyncs a round on the event loop) is what the heartbeat batching removed. A
    rise waits for the next heartbeat flush; a flag is written at once."""
    clock = Clock()
    coord = coordinator(tmp_path, clock)
    enrol(coord)
    coord.store.flush_heartbeats(force=True)
    for released in (1, 2, 3):
        beat(coord, "site-a", released)
    assert _stored_marks(tmp_path) == {}  # held: no transaction per report
    assert coord.store.ledger_flag("site-a") is None
    coord.store.flush_heartbeats(force=True)
    assert _stored_marks(tmp_path) == {"site-a": (3, None)}
    beat(coord, "site-a", 4)
    beat(coord, "site-a", 2)  # rolled back: flagged and written at once, mark and all
    assert _stored_marks(tmp_path) == {"site-a": (4, 2)}
    assert coord.store.ledger_flag("site-a") == (4, 2)
    beat(coord, "site-b", 7)
    coord.store.close()  # a rise still held is written at close
    assert _stored_marks(tmp_path) == {"site-a": (4, 2), "site-b": (7, None)}
    again = coordinator(tmp_path, clock)
    assert again.store.ledger_flag("site-a") == (4, 2)
    beat(again, "site-a", 2)
    beat(again, "site-b", 7)
    assert cohort(again).candidates == ["site-b"]  # site-a still flagged after a restart
    again.store.close()


def test_a_count_that_alternates_stays_flagged_and_writes_nothing_more(tmp_path):
    """Two machines holding one site's keys (or a clone left running) report 5, 3, 5,
    3, ...: flagged once, and not flipped back and forth, an audit row and a log line
    each time."""
    clock = Clock()
    coord = coordinator(tmp_path, clock)
    enrol(coord)
    beat(coord, "site-b", 0)
    for _ in range(50):
        beat(coord, "site-a", 5)
        beat(coord, "site-a", 3)
    assert len(coord.store.audit_log(action="privacy_ledger_rolled_back")) == 1
    assert coord.store.audit_log(action="privacy_ledger_caught_up") == []
    assert coord.store.ledger_flag("site-a") == (5, 3)
    assert cohort(coord).candidates == ["site-b"]
    coord.store.close()
