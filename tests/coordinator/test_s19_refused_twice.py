"""A plan that every site refuses for the same reason fails its job after two attempts,
not after max_failed_attempts backoffs (fedge.coordinator.service,
Coordinator._refused_twice): the ML engineer is told at once, the reason said once with
the sites that gave it. A refusal that changes between attempts, or one site that
trains, keeps today's retries. And `jobs watch` says a reason several sites gave once,
with their names together (fedge.coordinator.rounds.grouped_reasons, the console's
dropped lines).

Real coordinator, agents, SecAgg+ and SQLite in memory (tests/coordinator/conftest.py);
each refusing site's trainer raises TaskRefusal, as a real trainer does for a data set
it cannot use, and the agent sends it as its TaskRefused."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fedge.agent.trainer import LocalResult, SyntheticTrainer, TaskRefusal
from fedge.console.cli import watch_job
from tests.coordinator.test_attempt_backoff import PLAN

NO_COLUMN = "data set 'synthetic': column 'age' is missing from its table (line 1)"


class Refuses(SyntheticTrainer):
    """SyntheticTrainer that refuses its n-th task (from 0) with ``reason_of(n)``, or
    trains when that is None."""

    def __init__(self, site: str, n_examples: int,
                 reason_of: Callable[[int], str | None]) -> None:
        super().__init__(site, n_examples=n_examples)
        self.reason_of = reason_of
        self.tasks = 0

    def train(self, *args, **kwargs) -> LocalResult:  # type: ignore[no-untyped-def]
        n, self.tasks = self.tasks, self.tasks + 1
        why = self.reason_of(n)
        if why is not None:
            raise TaskRefusal(why)
        return super().train(*args, **kwargs)


def refusing(fed, sites, reason_of) -> None:
    for s in sites:
        agent = fed.agents[s]
        agent.trainer = Refuses(s, agent.trainer.n_examples, reason_of)


def run(fed, *, max_failed_attempts: int = 5, rounds: int = 1) -> str:
    """Submit the plan (secure, min_clients 2) and run the job to its end; its id."""
    text = PLAN.format(min_clients=2).replace("max_failed_attempts = 3",
                                              f"max_failed_attempts = {max_failed_attempts}")
    text = text.replace("rounds = 3", f"rounds = {rounds}")

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(text, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=6000)
        return job
    return asyncio.run(go())


def failed(fed, job):
    return [r for r in fed.coord.store.rounds(job) if r.status == "failed"]


def watched(fed, job) -> list[str]:
    """What `fedge console jobs watch` prints of the ended job."""
    lines: list[str] = []
    watch_job(lambda op, args: (fed.coord.job_status(job), {}), job, interval_s=0,
              out=lines.append, results_wait_s=0)
    return lines


def test_every_site_refusing_alike_twice_fails_the_job_after_two_attempts(federation):
    fed = federation(["a", "b", "c"])
    refusing(fed, ["a", "b", "c"], lambda n: NO_COLUMN)
    job = run(fed, max_failed_attempts=5)
    st = fed.coord.store
    row = st.job(job)
    assert row.status == "failed"
    attempts = failed(fed, job)
    assert [(r.round, r.attempt) for r in attempts] == [(1, 1), (1, 2)]
    assert row.failed_attempts == 2
    # the reason once, the sites, and why it was not retried
    assert row.error.count(NO_COLUMN) == 1, row.error
    assert "(a, b, c)" in row.error
    assert "in attempts 1 and 2" in row.error
    assert "not retried further (max_failed_attempts is 5)" in row.error
    assert row.error.endswith("every site refused it twice in the same words")
    # the job's end is audited with that error
    ends = [e for e in st.audit_log(job=job) if e["action"] == "job_failed"]
    assert len(ends) == 1 and NO_COLUMN in ends[0]["detail"]

    # each attempt's reason says the refusal once, with its three sites (c)
    for r in attempts:
        assert r.reason == f"0 of 3 sites trained, below min_clients 2 (a, b, c: {NO_COLUMN})"
        assert r.dropped_reasons == {s: NO_COLUMN for s in "abc"}
    lines = watched(fed, job)
    said = [line for line in lines if line.startswith("round 1 attempt ")]
    assert len(said) == 2
    assert all(line.count(NO_COLUMN) == 1 and f"(a, b, c: {NO_COLUMN})" in line
               for line in said), said


def test_refusals_in_other_words_each_attempt_are_retried_to_the_limit(federation):
    fed = federation(["a", "b", "c"])
    refusing(fed, ["a", "b", "c"], lambda n: f"GPU busy with task {n} of another job")
    job = run(fed, max_failed_attempts=4)
    row = fed.coord.store.job(job)
    assert row.status == "failed"
    assert len(failed(fed, job)) == 4 and row.failed_attempts == 4
    assert row.error.startswith("round 1 failed 4 times; last: "), row.error


def test_one_site_training_keeps_the_retries(federation):
    # b and c refuse alike every time, but a trains: not every site refused
    fed = federation(["a", "b", "c"])
    refusing(fed, ["b", "c"], lambda n: NO_COLUMN)
    job = run(fed, max_failed_attempts=4)
    row = fed.coord.store.job(job)
    assert row.status == "failed"
    assert len(failed(fed, job)) == 4
    assert row.error.startswith("round 1 failed 4 times; last: 1 of 3 sites trained"), \
        row.error
    assert f"(b, c: {NO_COLUMN})" in row.error


def test_a_plan_refused_alike_by_two_sites_of_four_commits_and_watch_says_it_once(
        federation):
    fed = federation(["a", "b", "c", "d"])
    refusing(fed, ["c", "d"], lambda n: NO_COLUMN)
    job = run(fed, max_failed_attempts=3)
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (committed,) = st.rounds(job)
    assert committed.survivors == ["a", "b"]
    assert committed.dropped_reasons == {"c": NO_COLUMN, "d": NO_COLUMN}
    lines = watched(fed, job)
    dropped = [line for line in lines if line.startswith("  dropped ")]
    assert dropped == [f"  dropped c, d: {NO_COLUMN}"], lines


def test_the_attempt_before_is_the_databases_so_a_restart_between_them_changes_nothing(
        federation):
    fed = federation(["a", "b", "c"])
    refusing(fed, ["a", "b", "c"], lambda n: NO_COLUMN)
    text = PLAN.format(min_clients=2).replace("max_failed_attempts = 3",
                                              "max_failed_attempts = 5")

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(text, actor="test")
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).failed_attempts == 1)
        fed.restart()  # in the pause before attempt 2
        await fed.pump_alive(until=lambda: fed.coord.store.job(job).status
                             in ("completed", "failed"), max_steps=6000)
        return job
    job = asyncio.run(go())
    row = fed.coord.store.job(job)
    assert row.status == "failed" and row.failed_attempts == 2, row
    assert row.error.endswith("every site refused it twice in the same words")
