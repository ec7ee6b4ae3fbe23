"""The interrupted attempt's end is the last the database heard before the coordinator
stopped, not an entry the restarted coordinator wrote itself (review s16 diffreview2
L1): a checkpoint that could not be read at the restart (job_resume_failed, audited by
the new process) moved the attempt's end to the resume, and `jobs watch` and report.md
told a 1.5 s attempt as 7.8 s long. Real coordinator, agents, codec and SQLite store
in memory (tests/coordinator/conftest.py); the restart drops everything in memory."""

from __future__ import annotations

import asyncio
import os

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.rounds import Phase
from tests.coordinator.test_federation_inproc import plan


def test_the_interrupted_attempt_ends_before_the_restart_not_at_the_resume(federation):
    fed = federation(["a", "b", "c"])

    def in_round_2_training() -> bool:
        rnd = fed.coord.runner.round if fed.coord.runner is not None else None
        return rnd is not None and rnd.round == 2 and rnd.phase is Phase.TRAINING

    async def first():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=2, secure="false"), actor="test")
        await fed.pump(until=in_round_2_training)
        return job

    job = asyncio.run(first())
    started = fed.coord.runner.round.started_at
    last_heard = fed.coord.store.audit_log(limit=1)[-1]["time"]
    saved = ck.round_path(fed.coord.state_dir, job, 1)
    aside = saved.with_name(saved.name + ".aside")
    os.replace(saved, aside)  # the round-1 checkpoint cannot be read at the restart
    fed.clock.t += 3.0  # the coordinator is down a while
    restarted_at = fed.clock.t
    coord = fed.restart()
    st = coord.store

    async def second():
        await fed.heartbeats()
        await fed.pump(until=lambda: bool(st.audit_log(action="job_resume_failed",
                                                        job=job)))
        fed.clock.t += 20.0  # hours, in the field, before someone restores the file
        os.replace(aside, saved)
        await fed.heartbeats()
        await fed.pump(until=lambda: st.job(job).status in ("completed", "failed"))

    asyncio.run(second())
    assert st.job(job).status == "completed", st.job(job).error
    resume_failed = st.audit_log(action="job_resume_failed", job=job)
    assert resume_failed and resume_failed[-1]["time"] >= restarted_at
    attempts = st.rounds(job)
    assert [(a.round, a.attempt, a.status) for a in attempts] == \
        [(1, 1, "committed"), (2, 1, "interrupted"), (2, 2, "committed")]
    cut = attempts[1]
    assert cut.started_at == started
    # the last entry the stopped coordinator wrote, not one the new one did
    assert cut.ended_at == last_heard
    assert cut.ended_at < restarted_at
