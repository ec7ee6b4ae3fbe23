"""With secure aggregation on, `jobs status` says, in every stage of the secure
aggregation, who has answered that stage and who it still waits for, with the
stage's deadline (review s16 diffreview2 M1): it used to count a site in once its
masked input was in the sum, so a site silent in AdvertiseKeys was listed with those
that had answered ("0 of 4 in"), and one silent in ConsistencyCheck or Unmasking was
hidden ("4 of 4 in", no name, no deadline). Real coordinator, agents, SecAgg+
sessions, codec and SQLite store in memory (tests/coordinator/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest

from fedge.coordinator.rounds import Phase
from tests.coordinator.conftest import Clock, SteppingWall
from tests.coordinator.test_federation_inproc import plan

# the message to d that d never answers -> the server stage left waiting for d
STALLS = {
    "AdvertiseRequest": "AdvertiseKeys",
    "AdvertisedKeys": "ShareKeys",
    "RelayedShares": "MaskedInput",
    "ConsistencyRequest": "ConsistencyCheck",
    "UnmaskRequest": "Unmasking",
}


def _names(body) -> set[str]:
    inner = getattr(body, "message", None) or getattr(body, "body", None)
    return {type(body).__name__} | ({type(inner).__name__} if inner is not None else set())


@pytest.mark.parametrize("silent_at", list(STALLS))
def test_a_site_silent_in_a_secure_aggregation_stage_is_the_one_awaited(federation,
                                                                        silent_at):
    stage = STALLS[silent_at]
    mono = Clock()
    wall = SteppingWall(mono, start=1_800_000_000.0)
    fed = federation(["a", "b", "c", "d"], clock=mono, wall=wall)
    coord = fed.coord
    fed.kill_hook = lambda site, body: site == "d" and silent_at in _names(body)

    def others_answered_the_stage() -> bool:
        rnd = coord.runner.round if coord.runner is not None else None
        session = getattr(getattr(rnd, "_aggregation", None), "session", None)
        return (rnd is not None and rnd.phase is Phase.AGGREGATING and session is not None
                and session.stage == stage and session._replied == {"a", "b", "c"})

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(plan(rounds=1, secure="true"), actor="test")
        await fed.pump(until=others_answered_the_stage)
        return job

    job = asyncio.run(go())
    status = coord.job_status(job)
    assert status["phase"] == "aggregating" and status["stage"] == stage
    assert status["reported"] == ["a", "b", "c"]
    assert status["waiting_for"] == ["d"]
    assert status["dropped_out"] == {}
    session = coord.runner.round._aggregation.session
    expected = wall() + (session.deadline - mono())  # the stage's own deadline
    assert status["phase_deadline_at"] is not None
    assert abs(status["phase_deadline_at"] - expected) < 1e-3
    assert status["phase_deadline_at"] > wall()


def test_after_a_site_drops_out_of_a_stage_the_next_stage_counts_the_others(federation):
    """d silent in AdvertiseKeys is dropped at that stage's deadline: in the next stage
    it is no longer awaited but dropped out, and nobody has answered that stage yet."""
    mono = Clock()
    wall = SteppingWall(mono, start=1_800_000_000.0)
    fed = federation(["a", "b", "c", "d"], clock=mono, wall=wall)
    coord = fed.coord
    fed.kill_hook = lambda site, body: site == "d" and "AdvertiseRequest" in _names(body)

    def in_share_keys() -> bool:
        rnd = coord.runner.round if coord.runner is not None else None
        session = getattr(getattr(rnd, "_aggregation", None), "session", None)
        return session is not None and session.stage == "ShareKeys"

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(plan(rounds=1, secure="true"), actor="test")
        await fed.pump(until=in_share_keys)
        return job

    job = asyncio.run(go())
    status = coord.job_status(job)
    assert status["stage"] == "ShareKeys"
    assert status["reported"] == []
    assert status["waiting_for"] == ["a", "b", "c"]
    assert list(status["dropped_out"]) == ["d"]
    assert "AdvertiseKeys" in status["dropped_out"]["d"]
