"""A site whose connection is lost during secure aggregation (the transport reports
it: peer_lost, as when a send finds it not connected) is dropped from the aggregation
at once, at its stage, naming why; the round goes on where t and min_clients allow, or
fails at once where they do not. Before, Round.lost ignored the aggregation phase and
the round waited for the stage deadline (60 s by default).

Real coordinator, agents, codec and SecAgg+; the pump of tests/coordinator/conftest
moves the messages."""

from __future__ import annotations

import asyncio

from fedge.secagg.messages import AdvertiseRequest
from tests.coordinator.test_secure_sum_min_clients import plan_min3


def test_site_whose_connection_closes_in_secure_aggregation_is_dropped_at_once(federation):
    """Four sites, min_clients 3, stage deadline 600 s: d's connection closes as its
    AdvertiseRequest is sent (the transport reports it lost: peer_lost); the round
    goes on over a, b, c at once, naming why."""
    fed = federation(["a", "b", "c", "d"])
    seen = {}

    def hook(site, body):
        if site == "d" and isinstance(body, AdvertiseRequest):
            seen["at"] = fed.clock.t
            fed.coord.peer_lost("d")
            return True
        return False

    fed.kill_hook = hook

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan_min3(stage_s=600), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status in
                       ("completed", "failed"), max_steps=400)
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (r,) = st.rounds(job)
    assert r.survivors == ["a", "b", "c"] and r.dropped == ["d"]
    assert r.dropped_reasons == {"d": "connection lost during secure aggregation"}
    took = fed.clock.t - seen["at"]
    assert took < 30, f"secure aggregation waited {took:.1f} s for a site it had lost"


def test_site_lost_in_secure_aggregation_below_min_clients_fails_at_once(federation):
    """Three sites, min_clients 3, stage deadline 600 s: c's connection closes at the key
    stage; the attempt fails at once, not after 600 s, naming min_clients."""
    fed = federation(["a", "b", "c"])
    seen = {}

    def hook(site, body):
        if site == "c" and isinstance(body, AdvertiseRequest):
            seen["at"] = fed.clock.t
            fed.coord.peer_lost("c")
            return True
        return False

    fed.kill_hook = hook

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan_min3(stage_s=600), actor="test")
        st = fed.coord.store
        await fed.pump(until=lambda: any(r.status == "failed" for r in st.rounds(job)),
                       max_steps=400)
        return job

    job = asyncio.run(go())
    first = fed.coord.store.rounds(job)[0]
    assert first.status == "failed"
    assert "fewer than the plan's min_clients 3" in first.reason, first.reason
    assert first.dropped_reasons.get("c") == "connection lost during secure aggregation"
    took = fed.clock.t - seen["at"]
    assert took < 30, f"the attempt waited {took:.1f} s for a site it had lost"
