"""A software update pushed while the agent works for a round restarts it once the
round is over, not in the middle of it. The agent stages the update on its one task
worker, so a push during training is staged right after the training ends; it used to
restart (exit 75) at once, throwing that training away, or leaving a secure
aggregation whose DP run was charged for an update never summed.

Real agent (`fedge.agent.runtime.Agent`) with the update client `run` attaches
(`attach_update_client`), real TUF relay and slots; the link carries every message
through the wire codec, and the relay answers the agent's fetch requests. Only the
restart itself (os._exit(75) in production) is recorded instead."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.agent.updates import attach_update_client
from fedge.update.ab import SelfUpdate
from fedge.update.messages import UpdateAvailable, UpdateFetchRequest
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, PLAN, task
from tests.update.test_self_update import bundle


class Gated(SyntheticTrainer):
    """Synthetic training that runs until the test opens its gate."""

    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def train(self, *a, **k):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().train(*a, **k)


class Site:
    """One agent, its update client and a link to the coordinator's TUF relay; every
    message the agent sends and its restart land in `events`, in order."""

    def __init__(self, fleet, root, *, restart_wait_s: float = 60.0) -> None:
        self.fleet = fleet
        self.events: list[object] = []
        self.trainer = Gated("site-a")
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fedge-task")
        self.agent = Agent("site-a", self.trainer, policy=PLAIN_OK, executor=self.pool)
        self.agent.send_frames = self.send
        self.client = attach_update_client(self.agent, fleet.agent_dir, software_root=root,
                                           restart=lambda: self.events.append("restart"),
                                           restart_wait_s=restart_wait_s, reply_timeout_s=5)
        self.client.updater.clock = fleet.clock

    async def send(self, frames) -> None:
        body = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body
        self.events.append(body)
        if isinstance(body, UpdateFetchRequest):
            reply = self.fleet.repo.handle_fetch(body)
            self.deliver(reply, job="", rnd=0)

    def deliver(self, body, job="job1", rnd=1) -> asyncio.Future:
        frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job=job,
                                                 round=rnd)]
        return asyncio.ensure_future(self.agent.handle_frames(frames))  # as run_agent

    def sent(self, cls) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    @property
    def restarted(self) -> bool:
        return "restart" in self.events


async def until(cond, timeout=30.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)


def push(fleet, tmp_path) -> UpdateAvailable:
    fleet.publish("software", "fedge", "1.1.0", "fedge-1.1.0.tar.gz",
                  bundle(tmp_path, "1.1.0", "good").read_bytes())
    [path] = fleet.repo.current_targets().signed.targets
    return UpdateAvailable("r1", path)


def test_a_push_during_training_restarts_the_agent_after_its_round_ends(
        fleet, tmp_path, installed, caplog):
    """Pushed during training: staged once the training ends, and the agent answers
    the rest of the round (its update, its evaluation) before it restarts."""
    root, _ = installed
    site = Site(fleet, root)
    ask = push(fleet, tmp_path)

    async def go() -> None:
        train = site.deliver(task())
        await until(site.trainer.entered.is_set)
        await site.deliver(ask, job="", rnd=0)
        site.trainer.gate.set()
        await train
        await until(lambda: SelfUpdate(root).pending() is not None)  # staged
        await asyncio.sleep(1.0)
        assert not site.restarted, "restarted with the round in flight"
        await site.deliver(m.AggregateBegin(task_id="t1", cohort=["site-a", "site-b"],
                                            weight_scale=1 / 100, secure=False,
                                            threshold=1))
        await asyncio.sleep(1.0)
        assert not site.restarted, "restarted before the round's evaluation"
        await site.deliver(m.EvalTask(task_id="t1", plan=PLAN,
                                      weights=np.zeros(4, np.float32), split="test"))
        await until(lambda: site.restarted, timeout=10)

    with caplog.at_level(logging.WARNING, logger="fedge.agent.updates"):
        asyncio.run(go())
    kinds = [e if isinstance(e, str) else type(e).__name__ for e in site.events
             if not isinstance(e, UpdateFetchRequest)]
    assert kinds == ["TrainDone", "PlainUpdate", "EvalResult", "restart"]
    assert "software 1.1.0 staged; restarting after round 1 of job job1 ends" in caplog.text
    assert "round 1 of job job1 is over: restarting into it" in caplog.text
    site.pool.shutdown()


def test_a_push_to_an_idle_agent_restarts_it_at_once(fleet, tmp_path, installed):
    root, _ = installed
    site = Site(fleet, root)
    ask = push(fleet, tmp_path)

    async def go() -> None:
        await site.deliver(ask, job="", rnd=0)
        await asyncio.wait_for(asyncio.gather(*site.client.tasks), 30)

    asyncio.run(go())
    assert site.restarted and SelfUpdate(root).pending() is not None
    site.pool.shutdown()


def test_a_round_that_never_ends_restarts_the_agent_after_the_bound(
        fleet, tmp_path, installed, caplog):
    """A task held past `update_restart_wait_s` (the coordinator never sends its
    evaluation, or keeps the site in round after round): the agent restarts anyway."""
    root, _ = installed
    site = Site(fleet, root, restart_wait_s=1.5)
    ask = push(fleet, tmp_path)
    site.trainer.gate.set()

    async def go() -> float:
        await site.deliver(task())
        assert site.agent.held_round() == ("job1", 1)
        t0 = time.monotonic()
        await site.deliver(ask, job="", rnd=0)
        await until(lambda: site.restarted, timeout=15)
        return time.monotonic() - t0

    with caplog.at_level(logging.WARNING, logger="fedge.agent.updates"):
        waited = asyncio.run(go())
    assert 1.0 < waited < 10
    assert site.agent.held_round() == ("job1", 1)
    assert "round 1 of job job1 is not over: restarting into it now" in caplog.text
    site.pool.shutdown()


def test_the_wait_is_set_in_agent_toml(tmp_path):
    from fedge.agent.process import AgentConfigError, load_config

    path = tmp_path / "agent.toml"
    path.write_text('state_dir = "s"\n')
    assert load_config(path).update_restart_wait_s == 1800.0
    path.write_text('state_dir = "s"\nupdate_restart_wait_s = 120\n')
    assert load_config(path).update_restart_wait_s == 120.0
    path.write_text('state_dir = "s"\nupdate_restart_wait_s = 0\n')
    with pytest.raises(AgentConfigError, match="update_restart_wait_s = 0 must be > 0"):
        load_config(path)
