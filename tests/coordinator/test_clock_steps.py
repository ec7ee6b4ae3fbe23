"""A step of the wall clock (NTP correcting a drifted clock, a VM resumed with its old
time) moves no deadline: the coordinator measures time on its monotonic clock and
only dates its records by the wall clock (fedge.coordinator.service, module doc).
In memory, real agents and SecAgg+; the two clocks are fakes the test steps apart."""

from __future__ import annotations

import asyncio

import pytest

from fedge.coordinator.rounds import FINAL_TEST_SPLIT, Phase
from fedge.wire import messages as m
from tests.coordinator.conftest import Clock, SteppingWall
from tests.coordinator.test_federation_inproc import plan

# test_federation_inproc's plan, SecAgg+ on its defaults, deadlines long enough that
# only a clock step could end one early
PLAN = (plan(rounds=2).replace("alpha = 0.1\ndelta = 0.25\nclip = 1.0\n", "")
        .replace("seed = 11\n", "seed = 11\nmax_failed_attempts = 3\n")
        .replace("cohort_s = 5\ntrain_s = 5\nsecagg_stage_s = 3\neval_s = 3",
                 "cohort_s = 60\ntrain_s = 20\nsecagg_stage_s = 20\neval_s = 20"))
SITES = ["a", "b", "c"]
WALL_START = 1_800_000_000.0  # the wall clock's time at the start; Clock starts at 1e6
HEARTBEAT_TIMEOUT_S = 5.0  # the production default (fedge.coordinator.config)


def stepping(federation, sites=SITES):
    mono = Clock()
    wall = SteppingWall(mono, WALL_START)
    fed = federation(sites, clock=mono, wall=wall)
    fed.coord.heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S
    return fed, wall


def at(fed, rnd: int, phase: Phase):
    def check():
        r = fed.coord.runner
        return r is not None and r.round is not None and r.round.round == rnd \
            and r.round.phase is phase
    return check


def history(fed, job):
    return [(r.round, r.status, r.survivors) for r in fed.coord.store.rounds(job)]


@pytest.mark.parametrize(("rnd", "phase"), [(1, Phase.TRAINING), (1, Phase.AGGREGATING),
                                            (2, Phase.EVALUATING)])
def test_a_step_forward_loses_no_site_and_fails_no_round(federation, rnd, phase):
    """The wall clock jumps 10 minutes ahead in the middle of a phase, past every site's
    heartbeat timeout and every deadline as the wall clock counts. No site is lost,
    no attempt fails, and the last round's final test keeps every site's metrics;
    the records carry the wall clock's times, the step included."""
    fed, wall = stepping(federation)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN, actor="test")
        await fed.pump(until=at(fed, rnd, phase), advance=0.05)
        before = wall()
        wall.step(600.0)
        fed.coord.tick()  # the loop's next turn, the step just taken
        current = fed.coord.runner.round
        assert current.phase is phase and not current.refused, current.refused
        assert fed.coord.connected_sites() == set(SITES)
        await fed.pump(until=lambda: fed.coord.store.job(job).status != "running"
                       and fed.coord.runner is None, advance=0.05)
        return job, before

    job, before = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert history(fed, job) == [(1, "committed", SITES), (2, "committed", SITES)]
    final = fed.coord.job_status(job)["final_test"]
    assert final is not None and final["missing"] == {}
    assert {s for s in final["metrics"]["loss"]["sites"]} == set(SITES)
    assert any(r["split"] == FINAL_TEST_SPLIT and r["site"] == "*" for r in st.metrics(job))
    rows = st.rounds(job)
    stepped = rows[rnd - 1]
    assert stepped.started_at <= before and stepped.ended_at >= before + 600.0
    assert all(WALL_START <= r.started_at <= r.ended_at for r in rows)


def test_a_step_backward_stretches_no_deadline(federation):
    """The wall clock goes back an hour while round 1 trains, and site c has died:
    the train deadline still passes 20 s (monotonic) after training began, not an
    hour and 20 s, and c is dropped as silent; the round and the job go on."""
    fed, wall = stepping(federation)
    fed.kill_hook = lambda site, body: site == "c" and isinstance(body, m.TrainTask)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN.replace("rounds = 2", "rounds = 1"), actor="test")
        await fed.pump(until=at(fed, 1, Phase.TRAINING), advance=0.05)
        began = fed.clock.t
        wall.step(-3600.0)
        # 20 s of train deadline at 1 s a quiet turn: ~20 turns; the stretched
        # deadline would need 3600 more. a and b heartbeat while they wait, as live
        # agents do: one silent past the heartbeat timeout is lost, in secure
        # aggregation too
        await fed.pump_alive(until=lambda: not at(fed, 1, Phase.TRAINING)(), advance=1.0,
                             max_steps=200)
        assert fed.clock.t - began <= 20.0 + 2.0
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status != "running",
                             advance=0.05)
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (r,) = st.rounds(job)
    assert (r.status, r.survivors, r.dropped) == ("committed", ["a", "b"], ["c"])


def test_records_are_dated_by_the_wall_clock_and_sites_timed_by_the_monotonic_one(
        federation):
    """What is written down (last_seen, the job id, the audit log, HeartbeatAck's time)
    reads the wall clock; whether a site is connected reads the monotonic one, in
    agreement with the process loop's own measure (not_listening)."""
    fed, wall = stepping(federation, ["a"])
    asyncio.run(fed.heartbeats())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))
    (ack,) = [o.body for o in fed.coord.outbox if isinstance(o.body, m.HeartbeatAck)]
    assert ack.time == pytest.approx(WALL_START)
    (row,) = fed.coord.fleet()
    assert row["last_seen"] == pytest.approx(WALL_START) and row["connected"]
    wall.step(3600.0)  # forward: still connected; the job's id and row are dated after
    assert fed.coord.fleet()[0]["connected"]
    job = fed.coord.submit_job(PLAN, actor="test")
    assert job.startswith("job-20270115")  # 1_800_003_600 is 2027-01-15T09:00:00Z
    assert fed.coord.store.job(job).submitted_at == pytest.approx(WALL_START + 3600)
    wall.step(-7200.0)  # backward: the site still times out on time
    fed.clock.t += HEARTBEAT_TIMEOUT_S + 0.5
    assert not fed.coord.fleet()[0]["connected"]
    fed.coord.not_listening(1.0)  # a 1 s deafness gives back 1 s of the silence
    assert fed.coord.fleet()[0]["connected"]


def test_the_queue_runs_jobs_in_the_order_they_were_submitted(federation):
    """A job submitted after the wall clock went back an hour has the earlier
    submitted_at, yet waits behind the job submitted before it (insertion order)."""
    fed = federation(["a"])  # one clock for both: the step moves the records' dates
    first = fed.coord.submit_job(PLAN, actor="test")
    fed.clock.t -= 3600.0
    second = fed.coord.submit_job(PLAN, actor="test")
    assert fed.coord.store.job(second).submitted_at < fed.coord.store.job(first).submitted_at
    assert [j.job_id for j in fed.coord.store.jobs(status="queued")] == [first, second]
    assert [j["job_id"] for j in fed.coord.list_jobs()] == [first, second]
    fed.coord.tick()
    assert fed.coord.runner is not None and fed.coord.runner.job_id == first
