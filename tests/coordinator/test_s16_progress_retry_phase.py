"""Between two attempts at a round, `jobs status` gives the phase as the word
"retrying" and says in ``retry`` when the next attempt opens, as a time of day
(``retry_at``, epoch seconds) and from now (``in_s``), and why the last failed (review
s16 progress L3: the phase was the sentence "retrying in 4.92078 s after: ...", whose
number was the pause's length, not a countdown). Real coordinator and agents in memory;
a wall clock apart from the monotonic one."""

from __future__ import annotations

import asyncio

from tests.coordinator.conftest import Clock, SteppingWall
from tests.coordinator.test_attempt_backoff import PLAN, broken_site, failed_attempts, settle


def test_the_pause_between_attempts_is_phase_retrying_with_its_time_in_retry(
        federation, tmp_path):
    mono = Clock()
    wall = SteppingWall(mono, start=1_800_000_000.0)
    fed = federation(["a", "b", "c"], clock=mono, wall=wall)
    broken_site(fed, "c", tmp_path)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN.format(min_clients=3), actor="test")
        await fed.pump(until=lambda: failed_attempts(fed, job), max_steps=400)
        await settle(fed)
        return job

    job = asyncio.run(go())
    runner = fed.coord.runner
    assert runner is not None and runner.round is None
    due = runner.retry_at  # on the monotonic clock
    mono.t += 1.0  # a second into the pause
    status = fed.coord.job_status(job)
    assert status["phase"] == "retrying"
    retry = status["retry"]
    assert retry["attempt"] == 1 and retry["max_failed_attempts"] == 3
    assert retry["in_s"] == round(due - mono.t, 1)
    assert abs(retry["retry_at"] - (wall() + due - mono.t)) < 1e-3
    assert retry["retry_at"] > 1_800_000_000.0  # a time of day, not a monotonic reading
    assert retry["summary"] == (f"next attempt in {due - mono.t:.0f} s after: "
                                + retry["summary"].split(" s after: ", 1)[1])
    assert "cannot record this update's privacy spend" in retry["summary"]
    assert "cannot record this update's privacy spend" in retry["after"]
