"""A coordinator stopped while a round is in flight leaves that attempt in the job's
records (review s16 progress L1): the restarted coordinator, resuming the job, records
it as "interrupted", with its cohort and the phase it was in, since its sites may have
trained and released an update (and spent privacy budget) in it. Before, the rounds
table, `jobs status` and report.md showed the round again as attempt 1, committed.
Real coordinator, agents, codec and SQLite store in memory (tests/coordinator/
conftest.py); the restart drops everything in memory and in flight."""

from __future__ import annotations

import asyncio

from fedge.coordinator.report import write_job_report
from fedge.coordinator.rounds import Phase
from tests.coordinator.test_federation_inproc import plan


def run_into_round_2(fed, phase: Phase, *, secure: str) -> str:
    """A 2-round job submitted and run until its round 2 is in ``phase`` (a kill_hook
    set beforehand holds it there). Its id."""
    def there() -> bool:
        rnd = fed.coord.runner.round if fed.coord.runner is not None else None
        return rnd is not None and rnd.round == 2 and rnd.phase is phase

    async def first():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=2, secure=secure), actor="test")
        await fed.pump(until=there)
        return job

    return asyncio.run(first())


def test_an_attempt_cut_short_by_a_restart_is_recorded_as_interrupted(federation,
                                                                      tmp_path):
    fed = federation(["a", "b", "c"])

    job = run_into_round_2(fed, Phase.AGGREGATING, secure="false")
    started = fed.coord.runner.round.started_at
    fed.clock.t += 3.0  # the coordinator is down a while
    coord = fed.restart()
    st = coord.store

    async def second():
        await fed.heartbeats()
        await fed.pump(until=lambda: st.job(job).status in ("completed", "failed"))

    asyncio.run(second())
    assert st.job(job).status == "completed", st.job(job).error
    attempts = st.rounds(job)
    assert [(a.round, a.attempt, a.status) for a in attempts] == \
        [(1, 1, "committed"), (2, 1, "interrupted"), (2, 2, "committed")]
    cut = attempts[1]
    assert cut.cohort == ["a", "b", "c"] and cut.survivors == []
    assert cut.started_at == started
    assert started <= cut.ended_at < started + 3.0  # before the restart, not at it
    assert cut.reason.startswith("the coordinator stopped (restarted) while the round "
                                 "was being summed; 3 of 3 site(s) had trained (a, b, c): "
                                 "the round is started again")
    assert "charged in its own privacy ledger" in cut.reason
    # not one of the job's failed attempts: the next attempt took no pause for it
    assert st.job(job).failed_attempts == 0
    assert [e["detail"] for e in st.audit_log(action="round_interrupted", job=job)]

    status = coord.job_status(job)  # what `jobs status` shows
    assert [(r["round"], r["attempt"], r["status"]) for r in status["rounds"]] == \
        [(1, 1, "committed"), (2, 1, "interrupted"), (2, 2, "committed")]
    write_job_report(tmp_path, status, st.job(job).plan_toml)
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines()
               if line.startswith("| 2 | 1 | interrupted |"))
    assert "| 3 | 0 |" in row and "coordinator stopped (restarted)" in row


def test_a_restart_before_the_cohort_formed_or_between_rounds_records_nothing(federation):
    fed = federation(["a", "b", "c"])

    async def first():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=2, secure="false"), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).committed_round >= 1)
        return job

    job = asyncio.run(first())
    coord = fed.restart()  # round 2 had opened, not formed its cohort (no heartbeats)

    async def second():
        await fed.heartbeats()
        await fed.pump(until=lambda: coord.store.job(job).status == "completed")

    asyncio.run(second())
    assert [(a.round, a.attempt, a.status) for a in coord.store.rounds(job)] == \
        [(1, 1, "committed"), (2, 1, "committed")]
