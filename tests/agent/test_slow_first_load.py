"""A task's first load of its data set (a large image set: minutes, and it cannot be
cancelled) is not counted against the plan's deadline for the task: the stuck-worker
watchdog counts the training from when its data is loaded, and the load has its own,
much longer bound (DATA_LOAD_S). Counted as training, a slow first load got the agent
restarted by systemd, which threw away the loaded data: the site never joined.

The trainer is SyntheticTrainer with a first load that takes longer than the plan's
train_s plus the grace, as TorchTrainer's does (loaded once, kept in memory)."""

from __future__ import annotations

import asyncio
import threading
import time

from fedge.agent import runtime
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, PLAN, Link, deliver, task

LOAD_S = 1.0
DEADLINE_PLAN = PLAN + "[deadlines]\ntrain_s = 0.3\n"  # + grace 0.2: well under LOAD_S


class SlowFirstLoad(SyntheticTrainer):
    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.loaded: set[str] = set()
        self.lock = threading.Lock()
        self.loading = threading.Event()

    def load_data(self, name: str, job: str | None = None) -> None:
        with self.lock:
            if name not in self.loaded:
                self.loading.set()
                time.sleep(LOAD_S)  # slow, not hung
                self.loaded.add(name)

    def train(self, site, job, plan, *a, **k):  # type: ignore[no-untyped-def]
        self.load_data(plan.dataset)  # loads on first use, as TorchTrainer does
        return super().train(site, job, plan, *a, **k)


def run_slow_load() -> tuple[Link, SlowFirstLoad]:
    trainer = SlowFirstLoad("site-a")
    agent = Agent("site-a", trainer, policy=PLAIN_OK, stuck_grace_s=0.2)
    link = Link(agent)

    async def scenario() -> None:
        training = asyncio.ensure_future(deliver(agent, task(DEADLINE_PLAN)))
        await asyncio.to_thread(trainer.loading.wait, 10)
        for _ in range(4):  # through the load and past train_s + grace
            await asyncio.sleep(LOAD_S / 4)
            await agent.heartbeat()
        await training
        await agent.heartbeat()

    asyncio.run(scenario())
    return link, trainer


def test_a_slow_first_data_load_is_not_a_stuck_training():
    link, _ = run_slow_load()
    beats = link.bodies(m.Heartbeat)
    assert all(b.eligible for b in beats), [b.reason for b in beats]
    assert len(link.bodies(m.TrainDone)) == 1


def test_a_load_past_its_own_bound_is_stuck(monkeypatch):
    monkeypatch.setattr(runtime, "DATA_LOAD_S", 0.3)
    link, _ = run_slow_load()
    late = [b for b in link.bodies(m.Heartbeat) if not b.eligible]
    assert late and late[0].reason.startswith(
        "worker stuck: loading data set 'synthetic' for train job1 round 1"), late
    assert "past its deadline of 0.3 s plus 0.2 s" in late[0].reason
    assert link.bodies(m.Heartbeat)[-1].eligible  # back once the load returned
