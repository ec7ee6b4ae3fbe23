"""A cancelled job stops the agents' local training: a RoundAbort (or a newer task)
sets the task's cancel event, real training on Fed-TCGA-BRCA stops within a step,
nothing is sent or released, and the one worker is free for the next job's round."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer, TorchTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.train.accounting import PrivacyLedger
from fedge.wire import codec
from fedge.wire import messages as m

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
PLAIN_OK = PrivacyPolicy(require_secure_aggregation=False)

PLAN = """
[job]
dataset = "brca"
rounds = 1
min_clients = 2
seed = 5
[model]
name = "cox_linear"
params = {{ in_features = 39 }}
[train]
steps = {steps}
batch_size = 32
learning_rate = 0.01
[strategy]
name = "fedavg"
[secagg]
enabled = false
"""
LONG = 200_000  # steps: a minute or more of training


@pytest.fixture()
def brca():
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    return {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}


class Link:
    def __init__(self, agent):
        self.sent = []
        agent.send_frames = self.send

    async def send(self, frames):
        self.sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    def bodies(self, cls):
        return [b for b in self.sent if isinstance(b, cls)]


def task(task_id, steps):
    w = np.zeros(40, np.float32)
    return m.TrainTask(task_id=task_id, plan=PLAN.format(steps=steps), weights=w,
                       model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                       quant_seed=b"\x01" * 16)


def deliver(agent, body, job="job1", rnd=1):
    frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job=job, round=rnd)]
    return asyncio.ensure_future(agent.handle_frames(frames))  # as the receive loop does


class Watched(TorchTrainer):
    """The real trainer, noting when each train() call enters and leaves its thread."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.entered: list[float] = []
        self.left: list[tuple[float, str]] = []

    def train(self, *a, **k):
        self.entered.append(time.monotonic())
        try:
            out = super().train(*a, **k)
        except Exception as exc:
            self.left.append((time.monotonic(), type(exc).__name__))
            raise
        self.left.append((time.monotonic(), "done"))
        return out


async def until(cond, timeout=20.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def current_task(agent, link):
    await agent.heartbeat()
    return link.bodies(m.Heartbeat)[-1].current_task


@pytest.mark.parametrize("how", ["round_abort", "superseded"])
def test_an_abandoned_long_training_stops_within_a_second_and_the_next_one_trains(
        brca, tmp_path, how):
    """Training of hours on the agent's one worker: a RoundAbort for its round (a job
    cancelled), or a newer TrainTask, stops it within a second; heartbeats say it is
    finishing until the thread returns; no TrainDone for it; the next task trains."""
    trainer = Watched([brca], state_dir=tmp_path)
    pool = ThreadPoolExecutor(1)
    agent = Agent("site-a", trainer, policy=PLAIN_OK, executor=pool)
    link = Link(agent)

    async def go():
        long = deliver(agent, task("long", LONG))
        await until(lambda: trainer.entered)
        await asyncio.sleep(0.5)  # well into its steps
        assert not trainer.left and (await current_task(agent, link)) == "train job1 round 1"
        t0 = time.monotonic()
        if how == "round_abort":
            await deliver(agent, m.RoundAbort("job cancelled"))
            assert (await current_task(agent, link)) == "finishing aborted train job1 round 1"
            nxt = deliver(agent, task("next", 5), job="job2")
        else:
            nxt = deliver(agent, task("next", 5), job="job1")
        await until(lambda: trainer.left)
        stopped = trainer.left[0][0] - t0
        await long
        await nxt
        return stopped

    stopped = asyncio.run(go())
    pool.shutdown(wait=True)
    # uncancelled it trains for a minute or more; the bound leaves room for a loaded
    # machine's thread switches (timings are the benches' business, not the tests')
    assert stopped < 10.0, f"training went on for {stopped:.2f} s after it was abandoned"
    assert [why for _, why in trainer.left] == ["TrainingCancelled", "done"]
    assert [d.task_id for d in link.bodies(m.TrainDone)] == ["next"]
    assert link.bodies(m.TaskRefused) == []  # nobody waits for an answer to the aborted one
    assert agent.task is not None and agent.task.task_id == "next"  # held for aggregation
    # the abandoned run left nothing in the privacy ledger; the next one is there
    entries = PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").entries
    assert len(entries) == 1


def test_a_dp_sgd_run_cancelled_mid_training_records_nothing_and_keeps_the_cursor(brca):
    """local_train itself: a DP-SGD run cancelled from another thread stops with
    TrainingCancelled; nothing enters the ledger (pending or released) and the data
    cursors are as before."""
    from fedge.train.api import (
        ClientState,
        DatasetSpec,
        ModelSpec,
        TrainConfig,
        TrainingCancelled,
        load_site_data,
        local_train,
    )

    data = load_site_data(DatasetSpec.from_config(brca))
    spec = ModelSpec("cox_linear", {"in_features": 39})
    cfg = TrainConfig.from_dict({"steps": LONG, "batch_size": 32, "lr": 0.01,
                                 "dp": {"noise_multiplier": 1.5, "max_grad_norm": 1.0,
                                        "delta": 1e-5, "cox_per_term": True}})
    state = ClientState(job="j")
    plain = TrainConfig.from_dict({"steps": 3, "batch_size": 32, "lr": 0.01})
    local_train(spec, np.zeros(40, np.float32), data, plain, round=1, state=state)
    cursors = {r: repr(c) for r, c in state.cursors.items()}
    before = list(state.ledger.entries)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(TrainingCancelled, match=r"cancelled after \d+ of 200000 steps"):
        local_train(spec, np.zeros(40, np.float32), data, cfg, round=2, state=state,
                    cancel=cancel)
    assert time.monotonic() - t0 < 10.0  # uncancelled: a minute or more
    assert state.ledger.entries == before
    assert {r: repr(c) for r, c in state.cursors.items()} == cursors
    # a run cancelled before it starts does not load or train anything either
    with pytest.raises(TrainingCancelled, match="after 0 of"):
        local_train(spec, np.zeros(40, np.float32), data, plain, round=2, state=state,
                    cancel=cancel)
    assert state.ledger.entries == before


def test_work_queued_for_tasks_abandoned_meanwhile_does_not_run(monkeypatch):
    """The one worker is held by a training slow to notice anything (loading its data,
    say). A second TrainTask supersedes it at once; that task's plan waits for the
    worker, and its round is aborted meanwhile: when the worker frees, the first run
    stops at its next check and the second is neither parsed nor trained."""
    release = threading.Event()
    trained, parsed = [], []

    class Counting(SyntheticTrainer):
        def train(self, site, job, plan, weights, *, round, seed, cancel=None, **kw):
            if job == "first":
                release.wait(10)
            out = super().train(site, job, plan, weights, round=round, seed=seed,
                                cancel=cancel, **kw)
            trained.append(job)  # reached only by a run that was not cancelled
            return out

    pool = ThreadPoolExecutor(1)
    agent = Agent("site-a", Counting("site-a", dataset="brca"), policy=PLAIN_OK,
                  executor=pool)
    link = Link(agent)
    import fedge.agent.runtime as rt

    real = rt.parse_plan

    def counting_parse(text):  # the real parser, counted
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(rt, "parse_plan", counting_parse)
    try:
        async def go():
            first = deliver(agent, task("first", 1), job="first")
            await until(lambda: agent.task is not None and agent.task.job == "first")
            assert len(parsed) == 1
            queued = deliver(agent, task("queued", 1), job="queued")
            await asyncio.sleep(0.05)
            assert agent.task.cancel.is_set()  # "first": superseded on arrival
            assert (await current_task(agent, link)) == \
                "finishing aborted train first round 1"
            await deliver(agent, m.RoundAbort("job cancelled"), job="queued")
            release.set()
            await first
            await queued
        asyncio.run(go())
    finally:
        release.set()
        pool.shutdown(wait=True)
    assert trained == [] and len(parsed) == 1
    assert link.bodies(m.TrainDone) == [] and link.bodies(m.TaskRefused) == []
    assert agent._busy == ""
