"""What the agent says about itself: its STATUS= line (the task and the link to the
coordinator, each kept through the other's changes; a refusal; the stop) and its log
when the health probe is slow (said once, summed up, and once when it recovers)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import zmq

from fedge.agent import runtime
from fedge.agent.process import AgentStatus, Enrolled, run_agent
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, Link, deliver, task


def test_a_reconnect_mid_training_keeps_the_task_in_the_status():
    status = AgentStatus("connecting to tcp://c:1")
    assert status.link("connected to tcp://c:1") == "connected to tcp://c:1"
    assert status.task("train job1 round 2") == "train job1 round 2 (connected to tcp://c:1)"
    assert status.link("connecting to tcp://c:1 (heartbeat timeout)") == (
        "train job1 round 2 (connecting to tcp://c:1 (heartbeat timeout))")
    assert status.link("connected to tcp://c:1") == "train job1 round 2 (connected to tcp://c:1)"
    assert status.stopping(0) == "stopping: abandoning train job1 round 2"
    assert status.task("idle") == "connected to tcp://c:1"
    assert status.stopping(75) == "stopping (exit 75)"
    assert status.task("refused eval j round 1: bad\nplan") == (
        "refused eval j round 1: bad plan (connected to tcp://c:1)")  # one line


def test_a_refused_task_is_named_in_the_status_instead_of_idle():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    Link(agent)
    said: list[str] = []
    agent.on_status = said.append
    asyncio.run(deliver(agent, task(plan="not a plan")))
    assert len(said) == 1, said  # the reason as the log shortens it (quoted: it may hold
    # what the coordinator sent)
    assert said[0].startswith('refused train job1 round 1: "unrunnable plan: '), said


class Recorder:
    """A Notifier's face, recording what it would send."""

    enabled = True

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self, status=None):  # type: ignore[no-untyped-def]
        self.sent.append(f"READY=1 {status}")

    def status(self, text):  # type: ignore[no-untyped-def]
        self.sent.append(f"STATUS={text}")

    def watchdog(self):  # type: ignore[no-untyped-def]
        self.sent.append("WATCHDOG=1")

    def stopping(self, status=None):  # type: ignore[no-untyped-def]
        self.sent.append(f"STOPPING=1 {status}")


def test_the_status_keeps_the_link_with_the_task_and_stopping_says_what_is_abandoned():
    with socket.socket() as s:  # a port nobody listens on: the coordinator is down
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    public, secret = (k.decode() for k in zmq.curve_keypair())
    coordinator, _ = (k.decode() for k in zmq.curve_keypair())
    enrolled = Enrolled("site-a", public, secret, endpoint, coordinator, None, None)
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    notifier = Recorder()

    async def scenario() -> int:
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=0.2, timeout_s=1.0,
                                              stop=stop, notifier=notifier))
        await asyncio.sleep(0.3)
        agent.on_status(f"{m.TASK_TRAIN} job1 round 1")  # as the agent says it
        await asyncio.sleep(0.1)
        stop.set()
        return await asyncio.wait_for(run, 20)

    assert asyncio.run(scenario()) == 0
    assert f"STATUS=train job1 round 1 (connecting to {endpoint})" in notifier.sent
    assert notifier.sent[-1] == "STOPPING=1 stopping: abandoning train job1 round 1"


def test_a_slow_health_probe_is_logged_once_then_summed_up_and_its_recovery_once(
        caplog, monkeypatch):
    slow = [True]

    def probe():
        if slow[0]:
            time.sleep(runtime.PROBE_WAIT_S + 0.1)
        return {}, True, ""

    agent = Agent("site-a", SyntheticTrainer("site-a"), health=probe, policy=PLAIN_OK)
    Link(agent)

    async def beats(n: int) -> None:
        for _ in range(n):  # every other one starts a probe; the next takes its verdict
            await agent.heartbeat()
            await asyncio.sleep(0.2)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        asyncio.run(beats(8))  # four slow probes
        assert len(warnings()) == 1 and "health probe still running after 0.5 s" in \
            warnings()[0], warnings()
        monkeypatch.setattr(runtime, "PROBE_SLOW_LOG_S", 0.0)
        asyncio.run(beats(2))  # the summary is due: the three since, and this one
        assert len(warnings()) == 2 and "4 time(s) in the last" in warnings()[1], warnings()
        slow[0] = False
        asyncio.run(beats(2))
    infos = [r.getMessage() for r in caplog.records if "answers within" in r.getMessage()]
    assert len(infos) == 1 and "late 0 more time(s)" in infos[0], infos
