"""A failed attempt at a round, through the real coordinator and agents (in memory, with
SecAgg+): the next attempt waits a pause that doubles (fedge.coordinator.service,
RETRY_BACKOFF_S), shown as the job's phase and kept across a coordinator restart; a
site whose own refusal failed the attempt is left out of the next ones until it says
it is eligible again (fedge.coordinator.cohort, "sidelined").

The broken site cannot save its state: its trainer trains, then writing the run to its
privacy ledger fails for real (the ledger's directory is a regular file: what a state
dir gone read-only does to a root process, whom chmod would not stop) and the agent
withholds its masked input."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from fedge.agent.trainer import LocalResult, SyntheticTrainer
from fedge.wire import codec

RETRY_BACKOFF_S = 5.0  # fedge.coordinator.service's: the pause after a first failed attempt

PLAN = """
[job]
dataset = "synthetic"
rounds = 3
min_clients = {min_clients}
seed = 5
max_failed_attempts = 3
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = true
# t = 3 of 3 sites (every masked input is needed), t = 2 of 2
alpha = 0.5
delta = 0.0
clip = 1.0
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 3
eval_s = 3
"""


class LedgerUnwritable(SyntheticTrainer):
    """Trains as SyntheticTrainer; recording the run in its privacy ledger (before the
    update may leave) fails every time, with the OSError the file system gives."""

    def __init__(self, site: str, state_dir: Path, n_examples: int) -> None:
        super().__init__(site, n_examples=n_examples)
        self.ledger = state_dir / "privacy" / "ledger.json"

    def train(self, *args, **kwargs) -> LocalResult:  # type: ignore[no-untyped-def]
        return dataclasses.replace(super().train(*args, **kwargs),
                                   release_privacy=self._save_ledger)

    def _save_ledger(self) -> None:
        self.ledger.write_text("{}")  # NotADirectoryError: state_dir is a file


def broken_site(fed, site: str, tmp_path: Path) -> str:
    state = tmp_path / f"{site}-state"
    state.write_text("a file where the state directory should be\n")
    agent = fed.agents[site]
    agent.trainer = LedgerUnwritable(site, state, agent.trainer.n_examples)
    return str(state)


async def settle(fed, steps: int = 200) -> None:
    """Tick and move messages until nothing is in flight, without moving the clock."""
    for _ in range(steps):
        fed.coord.tick()
        while fed.inbox:
            site, frames = fed.inbox.pop(0)
            fed.coord.handle_frames(site, frames)
        outbox, fed.coord.outbox = fed.coord.outbox, []
        for out in outbox:
            frames = [bytes(f) for f in codec.encode(out.body, sender="coordinator",
                                                     job=out.job, round=out.round)]
            await fed.agents[out.site].handle_frames(frames)
        await asyncio.sleep(0.002)
        if not fed.inbox and not outbox and not fed.coord.outbox:
            return
    raise AssertionError("messages still in flight")


def failed_attempts(fed, job: str) -> list:
    return [r for r in fed.coord.store.rounds(job) if r.status == "failed"]


def test_a_site_that_cannot_save_its_state_is_left_out_and_the_job_commits_without_it(
        federation, tmp_path):
    fed = federation(["a", "b", "c"])
    where = broken_site(fed, "c", tmp_path)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN.format(min_clients=2), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status
                       in ("completed", "failed"), max_steps=4000)
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    rounds = st.rounds(job)
    committed = [r for r in rounds if r.status == "committed"]
    assert [r.round for r in committed] == [1, 2, 3]
    assert all(r.survivors == ["a", "b"] for r in committed), committed
    # one attempt failed with c in it; every later one went without c
    failed = [r for r in rounds if r.status == "failed"]
    assert [(r.round, r.attempt) for r in failed] == [(1, 1)], failed
    # the kind of error, not where: the coordinator keeps the reason (no appliance path)
    reason = failed[0].dropped_reasons["c"]
    assert "cannot record this update's privacy spend" in reason, reason
    assert "Not a directory" in reason and where not in reason, reason
    assert all("c" not in r.cohort for r in committed)


def test_the_next_attempt_waits_a_doubling_pause_shown_as_the_phase_and_kept_over_a_restart(
        federation, tmp_path):
    # min_clients 3 of 3: the round cannot go without c, whatever it does
    fed = federation(["a", "b", "c"])
    broken_site(fed, "c", tmp_path)
    clock = fed.clock

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN.format(min_clients=3), actor="test")
        await fed.pump(until=lambda: failed_attempts(fed, job), max_steps=400)
        await settle(fed)
        runner = fed.coord.runner
        assert runner is not None and runner.round is None
        assert fed.coord.store.job(job).failed_attempts == 1
        # the pause: RETRY_BACKOFF_S after the attempt opened, on the monotonic clock
        due = runner.retry_at
        assert 0 < due - clock.t <= RETRY_BACKOFF_S
        status = fed.coord.job_status(job)
        assert status["current_round"] == 1
        assert status["phase"] == "retrying"
        assert status["retry"]["in_s"] == round(due - clock.t, 1)
        assert status["retry"]["retry_at"] == round(due, 3)  # one clock stands for both
        assert status["retry"]["summary"].startswith(
            f"next attempt in {due - clock.t:.0f} s after: ")
        assert "cannot record this update's privacy spend" in status["retry"]["summary"]
        assert status["retry"]["attempt"] == 1 and status["retry"]["max_failed_attempts"] == 3
        assert "c" in status["sidelined"]
        clock.t = due - 0.01
        await settle(fed)
        assert fed.coord.runner.round is None, "the next attempt opened before its pause"
        clock.t = due
        await settle(fed)
        rnd = fed.coord.runner.round
        assert rnd is not None and rnd.phase.value == "waiting_cohort"
        # c is left out, with why, until its next heartbeat says it is eligible
        wait = fed.coord.job_status(job)["cohort_wait"]
        assert wait["excluded"]["c"].startswith("left out after attempt 1 at round 1 "
                                                "failed with it (")
        assert fed.coord.runner.round.cohort == []
        # its heartbeat brings it back: it is in the second attempt, and fails it again;
        # the pause doubles
        await fed.agents["c"].heartbeat()
        await settle(fed)
        second = failed_attempts(fed, job)
        assert len(second) == 2 and second[1].cohort == ["a", "b", "c"], second
        second_opened = fed.coord.runner.retry_at - 2 * RETRY_BACKOFF_S
        assert second_opened >= due
        assert fed.coord.job_status(job)["retry"]["attempt"] == 2
        # a restart in the pause keeps the count (the database's) and takes the pause
        # again in full; the job is not failed by it
        coord = fed.restart()
        restarted_at = clock.t
        await settle(fed)
        assert coord.runner is not None and coord.runner.round is None
        status = coord.job_status(job)
        assert status["status"] == "running" and status["failed_attempts"] == 2
        assert status["phase"] == "retrying"
        assert status["retry"]["in_s"] == 2 * RETRY_BACKOFF_S
        clock.t = restarted_at + 2 * RETRY_BACKOFF_S - 0.01
        await settle(fed)
        assert coord.runner.round is None
        clock.t = restarted_at + 2 * RETRY_BACKOFF_S
        await settle(fed)
        assert coord.runner.round is not None

    asyncio.run(go())


def test_an_attempt_that_waited_out_its_cohort_deadline_is_followed_at_once(federation):
    # nobody refused (no site holds the data set): nobody is left out, and an attempt
    # that lasted longer than the pause is followed by the next at once, as before
    fed = federation(["a", "b"])

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(PLAN.format(min_clients=2).replace(
            '"synthetic"', '"elsewhere"'), actor="test")
        await fed.pump(until=lambda: failed_attempts(fed, job), max_steps=400)
        runner = fed.coord.runner
        assert runner is not None and not runner.sidelined
        assert runner.retry_at <= fed.clock.t
        fed.coord.tick()
        assert fed.coord.runner.round is not None
        assert "phase" in fed.coord.job_status(job)
        assert fed.coord.job_status(job)["phase"] != "retrying"

    asyncio.run(go())
