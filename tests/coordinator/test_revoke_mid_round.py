"""A site the operator revokes while it trains is recorded in the round (and so in
`jobs watch` and the report) as revoked by that operator, not as a lost connection
(audit s14 L8). Real Coordinator, real SQLite, in-process agents."""

from __future__ import annotations

import asyncio

import pytest

from fedge.coordinator.rounds import Phase
from fedge.wire.messages import TrainTask
from tests.coordinator.test_federation_inproc import plan


@pytest.mark.parametrize("secure", ["false", "true"])
def test_a_site_revoked_during_training_is_dropped_as_revoked_by_the_operator(
        federation, secure):
    fed = federation(["a", "b", "c", "d"])

    async def go():
        await fed.heartbeats()
        # c never gets its TrainTask: it is still training when revoked
        fed.kill_hook = lambda site, body: site == "c" and isinstance(body, TrainTask)
        job = fed.coord.submit_job(plan(rounds=1, secure=secure), actor="test")
        await fed.pump(until=lambda: fed.coord.runner is not None
                       and fed.coord.runner.round is not None
                       and fed.coord.runner.round.phase is Phase.TRAINING)
        fed.coord.revoke("c", actor="operator:alice")
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed")
        return job

    job = asyncio.run(go())
    (r,) = fed.coord.store.rounds(job)
    assert r.cohort == ["a", "b", "c", "d"] and r.survivors == ["a", "b", "d"]
    assert r.dropped_reasons == {"c": "revoked by operator:alice"}
    watched = fed.coord.job_status(job)["rounds"][0]["dropped_reasons"]
    assert watched == {"c": "revoked by operator:alice"}
