"""Revoking a site deletes what its heartbeats declared of its data sets (the
``declared_inputs`` table: tasks, input shapes) in the revocation's own transaction:
another process (`fedge coordinator submit`) reads no declaration of a site that is
not in the fleet, and a site enrolled again under the name (with a new key) declares
its own afresh, written at its first heartbeat even when it says the same as before.
Real SQLite store, read back through a second Store on the same database."""

from __future__ import annotations

import sqlite3

from fedge.coordinator.store import Store

ED = bytes(range(32))
DECLARED = {"tasks": {"fed_tcga_brca": "survival"}, "input_shapes": {"fed_tcga_brca": [39]}}


def beat(store: Store, site: str) -> None:
    store.record_heartbeat(site, version="0.3.0", health={}, eligible=True, reason="",
                           datasets=["fed_tcga_brca"], current_task="", inputs=DECLARED)
    store.flush_heartbeats(force=True)


def rows(store: Store) -> dict[str, str]:
    conn = sqlite3.connect(store.path)
    try:
        return dict(conn.execute("SELECT site_id, inputs_json FROM declared_inputs"))
    finally:
        conn.close()


def test_a_revoked_sites_declared_inputs_are_deleted_with_the_revocation(tmp_path):
    store = Store(tmp_path)
    try:
        store.enrol("site-a", "A" * 40, ED, actor="alice")
        store.enrol("site-b", "B" * 40, ED, actor="alice")
        beat(store, "site-a")
        beat(store, "site-b")
        assert set(rows(store)) == {"site-a", "site-b"}

        store.revoke("site-a", actor="alice")
        assert set(rows(store)) == {"site-b"}  # on disk, with the revocation
        assert store.declared_inputs() == {"site-b": DECLARED}
        other = Store(tmp_path)  # another process's view
        try:
            assert other.declared_inputs() == {"site-b": DECLARED}
        finally:
            other.close()

        # enrolled again (a new key): its first heartbeat declares the same as before,
        # and it is written again
        store.enrol("site-a", "C" * 40, ED, actor="alice")
        beat(store, "site-a")
        assert set(rows(store)) == {"site-a", "site-b"}
    finally:
        store.close()


def test_a_declaration_held_unflushed_is_not_written_after_the_revocation(tmp_path):
    store = Store(tmp_path)
    try:
        store.enrol("site-a", "A" * 40, ED, actor="alice")
        beat(store, "site-a")
        # a later declaration, held for the next flush, then the revocation
        store.record_heartbeat("site-a", version="0.3.0", health={}, eligible=True,
                               reason="", datasets=["fed_tcga_brca"], current_task="",
                               inputs={})
        store.revoke("site-a", actor="alice")
        store.flush_heartbeats(force=True)
        assert rows(store) == {}
        assert store.declared_inputs() == {}
    finally:
        store.close()
