"""The plan digest that holds a job's evaluations to its own plan ("a job is evaluated
under its own plan only", fedge.agent.runtime) is on disk before an update trained
under it leaves; one that cannot be written withholds the update. It was logged and
the TrainDone sent anyway: after a restart the agent no longer knew the plan, and an
EvalTask under another plan was taken. Real Agents, real wire encoding, a real
JobStateStore whose file's place is taken by a directory (a real OSError)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedge.agent.guard import plan_digest
from fedge.agent.jobstate import JobStateStore
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.wire import messages as m
from tests.agent.test_guard import JOB, SECURE, Fleet


def _with_job_state(f: Fleet, site: str, store: JobStateStore) -> Agent:
    """``site``'s agent again, now over ``store`` (a restart keeps the store)."""
    old = f.agents[site]
    new = Agent(site, SyntheticTrainer(site), identity=old.identity, roster=old.roster,
                roster_key=old.roster_key, job_state=store)
    new.send_frames = old.send_frames
    f.agents[site] = new
    return new


def test_an_update_whose_plan_digest_cannot_be_saved_is_refused_not_sent(
        tmp_path: Path) -> None:
    f = Fleet()
    store = JobStateStore(tmp_path / "jobs")
    _with_job_state(f, "site-a", store)
    blocker = store.path(JOB, "plan")
    blocker.mkdir(parents=True)  # the file's place taken: its atomic rename fails

    asyncio.run(f.train(["site-a", "site-b"], "t1", plan=SECURE))
    sent = {(s, type(b).__name__) for s, b in f.inbox}
    assert ("site-a", "TrainDone") not in sent, f.inbox
    assert ("site-b", "TrainDone") in sent, f.inbox  # a site that can write is unaffected
    (refusal,) = [b for s, b in f.inbox if s == "site-a"]
    assert isinstance(refusal, m.TaskRefused) and refusal.task == m.TASK_TRAIN
    assert refusal.task_id == "t1"
    assert "cannot record the plan this job is trained under" in refusal.reason, refusal
    assert str(tmp_path) not in refusal.reason  # the coordinator keeps it: no path

    # the disk takes it again: the next round's write is tried (not skipped as held)
    blocker.rmdir()
    asyncio.run(f.train(["site-a"], "t2", plan=SECURE))
    assert [type(b) for s, b in f.inbox if s == "site-a"] == [m.TrainDone], f.inbox
    # and a restarted agent knows the plan its update left under
    restarted = _with_job_state(f, "site-a", store)
    assert restarted.job_plan(JOB) == plan_digest(SECURE)
