"""The coordinator's heartbeats reach SQLite in batches: each site's latest is held in
memory and the fleet's are written in one transaction per store.HEARTBEAT_FLUSH_S,
not one fsync'd transaction per heartbeat on the event loop. Whatever reads the
registry in-process sees the latest at once; another process sees it at most one
flush old, and a clean stop writes what is held."""

from __future__ import annotations

import asyncio
import sqlite3

from fedge.coordinator.store import HEARTBEAT_FLUSH_S, Store
from fedge.health import collect
from fedge.secagg.keys import Identity

KEY_A = "A" * 40
ED = Identity.generate().public_bytes()


def _real_health(state_dir):
    """The agent's own probe (fedge.agent.process.health_probe, eligibility aside): a
    report stamped with the time it was collected, so every heartbeat differs."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return lambda: (collect(state_dir).to_dict(), True, "")


def test_a_fleets_heartbeats_cost_one_transaction_per_flush_not_one_each(
        federation, tmp_path):
    fed = federation(["a", "b", "c"])
    for site, agent in fed.agents.items():
        agent.health = _real_health(tmp_path / "agents" / site)
    store = fed.coord.store
    # what another process (`fedge coordinator status`) reads; data_version changes
    # with every transaction another connection commits
    other = sqlite3.connect(store.path)

    def version() -> int:
        return int(other.execute("PRAGMA data_version").fetchone()[0])

    async def beat(rounds: int) -> tuple[int, int, float]:
        """``rounds`` heartbeats from each site, one a second (the coordinator's
        clock); returns (transactions committed, heartbeats handled, seconds)."""
        commits = handled = 0
        last = version()
        began = fed.clock.t
        for _ in range(rounds):
            await fed.heartbeats()
            while fed.inbox:
                site, frames = fed.inbox.pop(0)
                fed.coord.handle_frames(site, frames)
                handled += 1
                now = version()
                commits += now != last
                last = now
            fed.clock.t += 1.0
        return commits, handled, fed.clock.t - began

    try:
        commits, handled, took = asyncio.run(beat(15))
        heartbeats = sum(1 for a in fed.coord.fleet() if a["last_seen"] is not None)
        assert heartbeats == 3
        assert handled >= 45  # 15 heartbeats from each of 3 sites
        # one transaction per HEARTBEAT_FLUSH_S at most, however many heartbeats came
        assert commits <= took / HEARTBEAT_FLUSH_S + 1, (commits, handled, took)

        # in-process readers see each site's latest heartbeat at once: its health
        # report, its last_seen (the coordinator's wall clock at its arrival)
        latest = {a["site_id"]: a for a in fed.coord.fleet()}
        for site in fed.agents:
            assert latest[site]["last_seen"] == fed.clock.t - 1.0
            assert latest[site]["connected"] and latest[site]["eligible"]
            assert latest[site]["datasets"] == ["synthetic"]
        newest = {s: a["health"]["time"] for s, a in latest.items()}

        # a clean stop writes what is held: a fresh Store (what the CLI opens) reads it
        fed.coord.close()
        reopened = Store(fed.coord.state_dir)
        try:
            written = {a.site_id: a for a in reopened.appliances()}
            assert {s: a.health["time"] for s, a in written.items()} == newest
            assert {s: a.last_seen for s, a in written.items()} == {
                s: fed.clock.t - 1.0 for s in fed.agents}
        finally:
            reopened.close()
    finally:
        other.close()


def test_a_held_heartbeat_is_read_in_process_at_once_and_written_by_its_flush(tmp_path):
    wall = [1000.0]
    mono = [50.0]
    store = Store(tmp_path, clock=lambda: wall[0], monotonic=lambda: mono[0])
    store.enrol("site-a", KEY_A, ED, actor="a")
    other = sqlite3.connect(store.path)

    def on_disk() -> tuple:
        return other.execute("SELECT last_seen, current_task, datasets_json FROM appliances"
                             " WHERE site_id='site-a'").fetchone()

    store.flush_heartbeats(force=True)  # nothing held: nothing to write
    for i in range(20):
        wall[0] = 1000.0 + i
        store.record_heartbeat("site-a", version="0.2.0", health={"n": i}, eligible=True,
                               reason="", datasets=["d"], current_task=f"train {i}")
    a = store.appliance("site-a")
    assert (a.last_seen, a.health, a.current_task) == (1019.0, {"n": 19}, "train 19")
    assert [x.last_seen for x in store.appliances(status="enrolled")] == [1019.0]
    assert on_disk() == (None, "", "[]")  # not due yet: nothing written
    assert store.flush_heartbeats() == 0
    assert store.flush_heartbeats(force=True) == 1
    assert on_disk() == (1019.0, "train 19", '["d"]')
    assert store.flush_heartbeats(force=True) == 0  # written: no longer held

    # HEARTBEAT_FLUSH_S after the last flush, the next heartbeat is written with it
    mono[0] += HEARTBEAT_FLUSH_S - 0.1
    store.record_heartbeat("site-a", version="0.2.0", health={}, eligible=True, reason="",
                           datasets=["d"], current_task="eval 2")
    assert on_disk()[1] == "train 19"
    mono[0] += 0.1
    store.record_heartbeat("site-a", version="0.2.0", health={}, eligible=True, reason="",
                           datasets=["d"], current_task="eval 3")
    assert on_disk()[1] == "eval 3"

    # a revocation is not undone by a heartbeat held before it: the heartbeat is
    # written first, the revocation's empty task after it
    store.record_heartbeat("site-a", version="0.2.0", health={}, eligible=True, reason="",
                           datasets=["d"], current_task="eval 4")
    store.revoke("site-a", actor="op")
    store.close()
    assert other.execute("SELECT status, current_task FROM appliances").fetchone() == (
        "revoked", "")
    other.close()
