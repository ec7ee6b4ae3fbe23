"""`jobs status` says, for the round in flight, which sites have answered the phase
and which are still awaited, when the round started and when the phase's deadline
falls (review s16 progress M2): a bare "training" for up to train_s gave the engineer
no site to call. Real coordinator, agents, codec and SQLite store in memory
(tests/coordinator/conftest.py), on a monotonic clock and a wall clock that differ."""

from __future__ import annotations

import asyncio

from fedge.coordinator.rounds import Phase
from fedge.wire import messages as m
from tests.coordinator.conftest import Clock, SteppingWall
from tests.coordinator.test_federation_inproc import plan


def test_status_names_who_trained_and_who_is_awaited_with_epoch_times(federation):
    mono = Clock()
    wall = SteppingWall(mono, start=1_800_000_000.0)
    fed = federation(["a", "b", "c"], clock=mono, wall=wall)
    coord = fed.coord

    def two_trained() -> bool:
        rnd = coord.runner.round if coord.runner is not None else None
        return (rnd is not None and rnd.phase is Phase.TRAINING
                and sorted(rnd.trained) == ["a", "b"])

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        # c never answers its task: the round waits in training for it
        fed.kill_hook = lambda site, body: site == "c" and isinstance(body, m.TrainTask)
        await fed.pump(until=two_trained)
        return job

    job = asyncio.run(go())
    rnd = coord.runner.round
    status = coord.job_status(job)
    assert status["phase"] == "training" and status["current_round"] == 1
    assert status["cohort"] == ["a", "b", "c"]
    assert status["reported"] == ["a", "b"]
    assert status["waiting_for"] == ["c"]
    assert status["dropped_out"] == {}
    # times of day, as submitted_at is: the wall clock's, not the monotonic one
    assert status["round_started_at"] == rnd.started_at
    assert abs(status["round_started_at"] - status["submitted_at"]) < 60
    trained_since = rnd._training_since  # the monotonic reading the deadline counts from
    expected = wall() + (trained_since + 5.0 - mono())  # train_s = 5 in the plan
    assert abs(status["phase_deadline_at"] - expected) < 1e-3
    assert status["phase_deadline_at"] > wall()


def test_status_while_the_cohort_forms_gives_the_cohort_deadline(federation):
    mono = Clock()
    wall = SteppingWall(mono, start=1_800_000_000.0)
    fed = federation(["a", "b", "c"], clock=mono, wall=wall)
    coord = fed.coord

    async def go():
        await fed.heartbeats(sites=["a"])  # one candidate, min_clients 2: it waits
        job = coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: coord.runner is not None
                       and coord.runner.round is not None, advance=0.0)
        return job

    job = asyncio.run(go())
    rnd = coord.runner.round
    status = coord.job_status(job)
    assert status["phase"] == "waiting_cohort"
    assert (status["cohort"], status["reported"], status["waiting_for"]) == ([], [], [])
    assert status["round_started_at"] == rnd.started_at
    expected = wall() + (rnd.opened_at + 5.0 - mono())  # cohort_s = 5 in the plan
    assert abs(status["phase_deadline_at"] - expected) < 1e-3
