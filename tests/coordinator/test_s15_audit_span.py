"""`fedge console audit` asks the store for the audit log's id span on every call, on
the coordinator's event loop: the query must read one row per end, not the whole
log (a review timed min(id), max(id) in one SELECT at 97 ms on 1M rows, growing with
the log, which is never pruned)."""

from __future__ import annotations

from fedge.coordinator.store import Store


def _plan(store: Store, sql: str) -> str:
    with store._lock:
        rows = store._conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
    return " | ".join(str(r[-1]) for r in rows)


def test_the_audit_id_span_reads_no_more_than_the_two_ends(tmp_path) -> None:
    store = Store(tmp_path / "c.sqlite3")
    try:
        assert store.audit_id_span() is None
        for i in range(50):
            store.audit("transport", "connection_refused", {"n": i})
        ran: list[str] = []
        store._conn.set_trace_callback(ran.append)  # the statement the span runs
        try:
            first, last = store.audit_id_span()
        finally:
            store._conn.set_trace_callback(None)
        assert last - first == 49
        [sql] = [q for q in ran if "audit" in q]
        plan = _plan(store, sql)
        assert "SCAN audit" not in plan, plan  # SQLite's min/max quick path, per end
    finally:
        store.close()
