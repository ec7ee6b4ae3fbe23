"""A site still uploading its masked input is not dropped from secure aggregation as
"connection lost" because its heartbeats queue behind the upload on its one connection
past the heartbeat timeout: only the transport's own report of a lost peer (or the
stage deadline) drops it there. Real coordinator, agents, codec, SecAgg+ and SQLite
through the in-memory pump (heartbeat timeout 30 s, stage deadline 600 s)."""

from __future__ import annotations

import asyncio

from fedge.secagg.messages import MaskedInput
from fedge.wire import codec
from tests.coordinator.test_secure_sum_min_clients import plan_min3


def test_a_masked_input_in_transit_past_the_heartbeat_timeout_is_waited_for(federation):
    fed = federation(["a", "b", "c"])
    held: list[list[bytes]] = []
    send = fed.agents["c"].send_frames

    async def slow_send(frames):
        frames = [bytes(f) for f in frames]
        body = codec.decode(frames, max_bytes=1 << 30).body
        if isinstance(body, MaskedInput) or held:
            held.append(frames)  # the upload, and everything queued behind it
            return
        fed.inbox.append(("c", frames))

    fed.agents["c"].send_frames = slow_send

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan_min3(stage_s=600), actor="test")
        st = fed.coord.store
        await fed.pump(until=lambda: bool(held), max_steps=400)
        t0 = fed.clock.t
        await fed.pump_alive(  # past the 30 s heartbeat timeout; c's heartbeats queue
            until=lambda: fed.clock.t - t0 >= 40 or bool(st.rounds(job)), advance=1.0,
            sites=("a", "b"))
        assert not st.rounds(job), [(r.status, r.reason) for r in st.rounds(job)]
        for frames in held:  # the upload arrives, then c's queued heartbeats
            fed.inbox.append(("c", frames))
        held.clear()
        fed.agents["c"].send_frames = send
        await fed.pump_alive(until=lambda: bool(st.rounds(job)), max_steps=300)
        return job

    job = asyncio.run(go())
    (r, *_) = fed.coord.store.rounds(job)
    assert (r.status, r.survivors) == ("committed", ["a", "b", "c"]), (r.status, r.reason)


def test_a_site_the_transport_reports_lost_is_still_dropped_at_once(federation):
    """The other side: peer_lost (the transport's word) drops it without the deadline
    (tests/coordinator/test_lost_in_secure_aggregation.py has the full cases)."""
    fed = federation(["a", "b", "c", "d"])
    fed.coord.heartbeat_timeout_s = 30.0

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan_min3(stage_s=600), actor="test")
        st = fed.coord.store

        def in_aggregation():
            r = fed.coord.runner
            return r is not None and r.round is not None and r.round.phase.name == "AGGREGATING"

        await fed.pump(until=in_aggregation, max_steps=400)
        fed.dead.add("d")
        fed.coord.peer_lost("d")
        await fed.pump_alive(until=lambda: bool(st.rounds(job)), max_steps=400)
        return job

    job = asyncio.run(go())
    (r, *_) = fed.coord.store.rounds(job)
    assert r.status == "committed" and "d" not in r.survivors, (r.status, r.reason)
    assert fed.clock.t < 1e6 + 300  # long before the 600 s stage deadline
