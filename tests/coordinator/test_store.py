"""The coordinator registry: SQLite WAL, one transaction per write, audit trail."""

from __future__ import annotations

import json
import sqlite3

import pytest

from fedge.coordinator.store import SCHEMA_VERSION, Store, StoreError

KEY_A = "A" * 40
KEY_B = "B" * 40
KEY_C = "C" * 40
ED = bytes(range(32))


def test_database_is_wal_and_versioned(tmp_path):
    store = Store(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path)


def test_enrol_revoke_and_allow_list(tmp_path):
    store = Store(tmp_path)
    store.enrol("site-a", KEY_A, ED, actor="alice")
    store.enrol("site-b", KEY_B, ED, actor="alice")
    assert store.allowed_keys() == {KEY_A, KEY_B}
    assert store.site_for_key(KEY_A) == "site-a"
    store.revoke("site-a", actor="bob")
    assert store.allowed_keys() == {KEY_B}
    assert store.site_for_key(KEY_A) is None
    assert store.appliance("site-a").status == "revoked"
    actions = [(e["actor"], e["action"]) for e in store.audit_log()]
    assert actions == [("alice", "enrol"), ("alice", "enrol"), ("bob", "revoke")]
    # the revoked key cannot come back; the site returns with a new identity
    with pytest.raises(StoreError, match="was revoked with this CURVE key"):
        store.enrol("site-a", KEY_A, ED, actor="alice")
    assert store.site_for_key(KEY_A) is None
    store.enrol("site-a", KEY_C, ED, actor="alice")
    assert store.site_for_key(KEY_C) == "site-a"
    assert store.site_for_key(KEY_A) is None


@pytest.mark.parametrize(
    ("site", "key", "ed", "match"),
    [
        ("", KEY_A, ED, "site id"),
        ("bad site!", KEY_A, ED, "site id"),
        ("s", "short", ED, "40"),
        ("s", KEY_A, b"x" * 31, "32"),
    ],
)
def test_enrol_rejects_bad_input_and_writes_nothing(tmp_path, site, key, ed, match):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match=match):
        store.enrol(site, key, ed, actor="a")
    assert store.appliances() == []
    assert store.audit_log() == []


def test_key_cannot_be_shared_by_two_sites(tmp_path):
    store = Store(tmp_path)
    store.enrol("site-a", KEY_A, ED, actor="a")
    with pytest.raises(StoreError, match="already enrolled for site 'site-a'"):
        store.enrol("site-b", KEY_A, ED, actor="a")
    assert [a.site_id for a in store.appliances()] == ["site-a"]


def test_revoke_unknown_site(tmp_path):
    with pytest.raises(StoreError, match="unknown site 'ghost'"):
        Store(tmp_path).revoke("ghost", actor="a")


def test_heartbeat_updates_fleet_view(tmp_path):
    store = Store(tmp_path, clock=lambda: 1234.0)
    store.enrol("site-a", KEY_A, ED, actor="a")
    store.record_heartbeat("site-a", version="0.1.0", health={"gpu": 0}, eligible=False,
                           reason="disk full", datasets=["b", "a"], current_task="job1/2")
    a = store.appliance("site-a")
    assert (a.version, a.last_seen, a.health, a.eligible, a.eligibility_reason) == (
        "0.1.0", 1234.0, {"gpu": 0}, False, "disk full")
    assert a.datasets == ["a", "b"]
    assert a.to_dict()["current_task"] == "job1/2"
    with pytest.raises(StoreError, match="unknown site"):
        store.record_heartbeat("x", version="", health={}, eligible=True, reason="",
                               datasets=[], current_task="")


def test_the_fleet_view_calls_no_site_eligible_before_its_first_report_or_once_revoked(
        tmp_path):
    """The registry's eligible column defaults to 1: a site enrolled offline and never
    heard from, and a revoked one, are shown not eligible, with why."""
    from fedge.console.fleet import fleet_rows

    store = Store(tmp_path, clock=lambda: 1234.0)
    store.enrol("site-a", KEY_A, ED, actor="a")
    view = store.appliance("site-a").to_dict()
    assert view["eligible"] is False
    assert view["eligibility_reason"] == "no health report yet (never connected)"
    assert fleet_rows([view], now=1234.0)[0][5] == (
        "no: no health report yet (never connected)")
    store.record_heartbeat("site-a", version="0.2.0", health={}, eligible=True, reason="",
                           datasets=[], current_task="")
    assert store.appliance("site-a").to_dict()["eligible"] is True
    store.revoke("site-a", actor="a")
    view = store.appliance("site-a").to_dict()
    assert (view["eligible"], view["eligibility_reason"]) == (False, "revoked")


def test_rounds_commit_in_order_and_survive_reopen(tmp_path):
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    with pytest.raises(StoreError, match="already exists"):
        store.create_job("j1", "plan", actor="op")
    with pytest.raises(StoreError, match=r"round 2 .* after round 0"):
        store.commit_round("j1", 2, started_at=0, cohort=[], survivors=[], dropped=[],
                           model_digest="d", metrics=[])
    assert store.fail_round("j1", 1, started_at=0, cohort=["a"], reason="cohort too small") == 1
    store.commit_round("j1", 1, started_at=0, cohort=["a", "b"], survivors=["a"],
                       dropped=["b"], model_digest="d1",
                       metrics=[("a", "val", "cindex", 0.7, 10)])
    store.close()
    again = Store(tmp_path)
    job = again.job("j1")
    assert job.committed_round == 1
    assert job.failed_attempts == 0
    rounds = again.rounds("j1")
    assert [(r.round, r.attempt, r.status) for r in rounds] == [
        (1, 1, "failed"), (1, 2, "committed")]
    assert rounds[1].dropped == ["b"]
    assert again.metrics("j1") == [
        {"round": 1, "site": "a", "split": "val", "name": "cindex", "value": 0.7,
         "n_examples": 10}]


def test_failed_transaction_leaves_no_trace(tmp_path):
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    with pytest.raises(StoreError):
        store.commit_round("j1", 5, started_at=0, cohort=[], survivors=[], dropped=[],
                           model_digest="", metrics=[("a", "val", "x", 1.0, 1)])
    assert store.metrics("j1") == []
    assert store.rounds("j1") == []


def test_job_status_and_operators(tmp_path):
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    store.set_job_status("j1", "running", actor="coordinator")
    store.set_job_status("j1", "completed", actor="coordinator", final_digest="abc")
    assert store.job("j1").status == "completed"
    assert store.job("j1").final_digest == "abc"
    with pytest.raises(StoreError, match="not one of"):
        store.set_job_status("j1", "exploded", actor="x")
    store.add_operator("alice", ED, "admin", actor="root")
    with pytest.raises(StoreError, match="already exists"):
        store.add_operator("alice", ED, "admin", actor="root")
    assert store.operators()[0]["role"] == "admin"


def test_a_version_1_database_is_migrated_at_open_and_keeps_its_rows(tmp_path):
    """A database written before unmask_sets existed (schema 1) opens, gains the table
    and its version, and keeps what it held; the step is audited."""
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    store.close()
    conn = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    conn.execute("DROP TABLE unmask_sets")
    conn.execute("DROP TABLE ledger_marks")
    conn.execute("DROP TABLE revoked_keys")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    again = Store(tmp_path)
    assert again.schema_version() == SCHEMA_VERSION == 3
    tables = {row[0] for row in again._conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"unmask_sets", "ledger_marks", "revoked_keys"} <= tables
    assert again.job("j1").plan_toml == "plan"
    again.record_unmask_set("j1", 1, ["b", "a"])
    assert again.unmask_set("j1", 1) == ["a", "b"]
    (migrated,) = again.audit_log(action="schema_migrated")
    assert migrated["detail"] == '{"from": 1, "to": 3}'
    again.close()
    assert Store(tmp_path).audit_log(action="schema_migrated") == [migrated]  # once


def test_an_unmask_set_is_recorded_once_refuses_another_and_ends_with_its_round(tmp_path):
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    assert store.unmask_set("j1", 1) is None
    store.record_unmask_set("j1", 1, ["c", "a", "b"])
    store.record_unmask_set("j1", 1, ["a", "b", "c"])  # the same set again: nothing new
    with pytest.raises(StoreError, match=r"already unmasked over \['a', 'b', 'c'\]; asking "
                                         r"to unmask it over \['a', 'b'\]"):
        store.record_unmask_set("j1", 1, ["a", "b"])
    assert store.unmask_set("j1", 1) == ["a", "b", "c"]
    assert len(store.audit_log(action="unmask_set_recorded")) == 1
    store.fail_round("j1", 1, started_at=0, cohort=["a", "b"], reason="x")
    assert store.unmask_set("j1", 1) == ["a", "b", "c"]  # a failed attempt keeps it
    store.commit_round("j1", 1, started_at=0, cohort=["a", "b", "c"],
                       survivors=["a", "b", "c"], dropped=[], model_digest="d", metrics=[])
    assert store.unmask_set("j1", 1) is None  # the round cannot run again
    assert store.unmask_set("j1", 2) is None


def test_the_last_allowed_failed_attempt_fails_the_job_in_the_same_transaction(tmp_path):
    store = Store(tmp_path)
    store.create_job("j1", "plan", actor="op")
    assert store.fail_round("j1", 1, started_at=0, cohort=[], reason="one",
                            max_attempts=2) == 1
    assert store.job("j1").status == "queued"
    assert store.fail_round("j1", 1, started_at=0, cohort=[], reason="two",
                            max_attempts=2) == 2
    job = store.job("j1")
    assert (job.status, job.error) == ("failed", "round 1 failed 2 times; last: two")
    assert store.audit_log(action="job_failed")


def test_a_write_waits_briefly_for_a_lock_held_elsewhere_then_tries_without_waiting(
        tmp_path):
    """The running coordinator's writes wait busy_timeout_s for another process's lock
    (an operator's sqlite3 shell in BEGIN IMMEDIATE), once; while the lock stays held
    the next ones fail at once, and the first write after it is free succeeds."""
    import time

    from fedge.coordinator.store import is_locked

    store = Store(tmp_path, busy_timeout_s=0.3)
    shell = sqlite3.connect(tmp_path / "coordinator.sqlite3", isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError) as first:
        store.audit("t", "x")
    waited = time.monotonic() - t0
    assert is_locked(first.value) and 0.25 <= waited < 2.0
    since = store.locked_since
    assert store.lock_waits == 1 and since is not None
    t0 = time.monotonic()
    with pytest.raises(sqlite3.OperationalError) as second:
        store.audit("t", "y")
    assert is_locked(second.value) and time.monotonic() - t0 < 0.1
    assert store.lock_waits == 1 and store.locked_since == since  # failed, without waiting
    assert not store.writable()
    assert store.appliances() == []  # reads go on (WAL)
    shell.execute("ROLLBACK")
    assert store.writable() and store.locked_since is None
    store.audit("t", "z")
    assert [a["action"] for a in store.audit_log()] == ["z"]


def test_audit_log_selects_a_jobs_entries_however_many_came_after(tmp_path):
    """A job's audit entries are found by its id among any number of later jobs' (the
    final test's missing sites are read this way), and a detail that is not JSON is
    passed over, not an error."""
    store = Store(tmp_path)
    try:
        store.audit("coordinator", "final_test", {"job": "job-0", "missing": {"a": "x"}})
        store.audit("site-a", "final_test", "not json")
        for i in range(1, 80):
            store.audit("coordinator", "final_test", {"job": f"job-{i}", "missing": {}})
        (entry,) = store.audit_log(action="final_test", job="job-0", limit=50)
        assert json.loads(entry["detail"])["missing"] == {"a": "x"}
        assert len(store.audit_log(action="final_test", limit=50)) == 50
    finally:
        store.close()


def test_a_jobs_audit_entries_are_found_at_a_cost_that_does_not_grow_with_the_log(tmp_path):
    """`jobs status` reads the job's final_test entry on every call, on the coordinator's
    event loop: the lookup is indexed, also in a database written before the index
    (it is made at open), so it reads the same few rows however much was audited."""
    Store(tmp_path).close()
    path = tmp_path / "coordinator.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("DROP INDEX audit_by_action_job")  # as written before it existed

    def audit_rounds(n: int) -> None:
        conn.executemany("INSERT INTO audit(time, actor, action, detail) VALUES (0, 'c', ?, ?)",
                         [("round_committed", json.dumps({"job": f"job-{i}", "round": 1}))
                          for i in range(n)])
        conn.commit()

    audit_rounds(100)
    store = Store(tmp_path)
    try:
        store.audit("coordinator", "final_test", {"job": "job-7", "missing": {"a": "x"}})

        def steps_to_find() -> int:
            steps = 0

            def count() -> int:
                nonlocal steps
                steps += 1
                return 0

            store._conn.set_progress_handler(count, 1)  # one call per VM instruction
            try:
                (entry,) = store.audit_log(action="final_test", job="job-7")
            finally:
                store._conn.set_progress_handler(None, 1)
            assert json.loads(entry["detail"])["missing"] == {"a": "x"}
            return steps

        few = steps_to_find()
        audit_rounds(20_000)
        assert steps_to_find() < 2 * few
    finally:
        store.close()
        conn.close()
