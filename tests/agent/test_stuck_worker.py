"""A worker thread that never returns (a deadlocked training) is a stuck agent, though
its event loop runs on: past a grace after its cancel, or past its plan's deadline, the
agent logs it, heartbeats say not eligible, and the process stops its watchdog pings
so that systemd restarts it.

The trainer is the boundary replaced here: one whose ``train`` never returns and
ignores its cancel event, as a torch/OpenMP or CUDA deadlock would."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time

import pytest

from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, PLAN, Link, deliver, task
from tests.e2e.conftest import DATA, Federation, Proc, wait_for


class WedgedTrainer(SyntheticTrainer):
    """``train`` blocks until ``release`` is set, whatever its cancel says."""

    def __init__(self, site: str) -> None:
        super().__init__(site)
        self.release = threading.Event()
        self.entered = threading.Event()

    def train(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.entered.set()
        self.release.wait(30)  # bounded, for the test's sake: a real deadlock is not
        return super().train(*args, **kwargs)


def wedged_agent(grace_s: float) -> tuple[Agent, WedgedTrainer, Link]:
    trainer = WedgedTrainer("site-a")
    agent = Agent("site-a", trainer, policy=PLAIN_OK, stuck_grace_s=grace_s)
    return agent, trainer, Link(agent)


async def start(agent: Agent, trainer: WedgedTrainer, plan: str = PLAN) -> asyncio.Task:
    training = asyncio.ensure_future(deliver(agent, task(plan)))
    await asyncio.to_thread(trainer.entered.wait, 10)
    return training


def test_a_training_still_running_past_the_grace_after_its_cancel_is_stuck(caplog):
    agent, trainer, link = wedged_agent(grace_s=0.3)

    async def scenario():
        training = await start(agent, trainer)
        await agent.heartbeat()
        await deliver(agent, m.RoundAbort("attempt failed"))
        await agent.heartbeat()  # cancelled, within the grace: not stuck yet
        await asyncio.sleep(0.5)
        await agent.heartbeat()
        await agent.heartbeat()  # the ERROR is logged once
        trainer.release.set()
        await training
        await agent.heartbeat()  # back: eligible again

    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        asyncio.run(scenario())
    beats = link.bodies(m.Heartbeat)
    assert [b.eligible for b in beats] == [True, True, False, False, True]
    assert beats[2].reason.startswith("worker stuck: train job1 round 1 still running on "
                                      "asyncio_"), beats[2].reason  # the default executor
    assert "after it was cancelled (grace 0.3 s)" in beats[2].reason
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "worker stuck: train job1 round 1" in errors[0], errors
    assert any("the stuck worker task (train job1 round 1) returned" in r.getMessage()
               for r in caplog.records)


def test_a_training_running_past_its_deadline_and_the_grace_is_stuck_uncancelled():
    agent, trainer, link = wedged_agent(grace_s=0.2)
    plan = PLAN + "[deadlines]\ntrain_s = 0.3\n"

    async def scenario():
        training = await start(agent, trainer, plan)
        await agent.heartbeat()
        await asyncio.sleep(0.7)
        await agent.heartbeat()
        trainer.release.set()
        await training

    asyncio.run(scenario())
    first, late = link.bodies(m.Heartbeat)
    assert first.eligible and not late.eligible
    assert "past its deadline of 0.3 s plus 0.2 s" in late.reason, late.reason


def test_the_stuck_grace_must_be_positive():
    with pytest.raises(ValueError, match="stuck_grace_s=0"):
        Agent("site-a", SyntheticTrainer("site-a"), stuck_grace_s=0)


# -- the agent process, as systemd sees it -------------------------------------------------

WEDGE = """
import sys, threading, logging
from fedge.agent import trainer as tr
def wedged(self, *a, **k):
    logging.getLogger("wedge").warning("training thread now wedged")
    threading.Event().wait()  # forever; ignores the cancel event, as a deadlock would
tr.TorchTrainer.train = wedged
from fedge.cli import main
sys.exit(main(sys.argv[1:]))
"""

STUCK_PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2
seed = 42
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 3
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = true
clip = 1.0
[deadlines]
cohort_s = 30
train_s = 3
"""


@pytest.fixture
def fed(tmp_path):
    """A coordinator and two enrolled sites holding Fed-TCGA-BRCA centres 0 and 1;
    site-1's agent runs, the test starts site-0's."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    fed = Federation(tmp_path / "fed")
    try:
        for i in range(2):
            fed.add_site(f"site-{i}", [{"name": "fed_tcga_brca", "kind": "fed_tcga_brca",
                                        "path": str(DATA.resolve()), "site": i}])
        fed.enrol_in_store()
        fed.start_coordinator()
        fed.start_agent("site-1")
        yield fed
    finally:
        fed.close()


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_an_agent_whose_training_never_returns_stops_its_watchdog_pings(fed):
    """A real agent process under a bound NOTIFY_SOCKET (WATCHDOG_USEC = 1 s: a ping
    every 0.5 s) whose training never returns: once the round is aborted (train_s = 3)
    and the grace (1 s) has passed, it logs the stuck task at ERROR, the coordinator
    records it as not eligible, and no WATCHDOG=1 follows: systemd would restart it."""
    cfg = fed.write_agent("site-0")
    cfg.write_text("stuck_task_grace_s = 1.0\n" + cfg.read_text())
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(fed.root / "notify.sock"))
    notify.settimeout(0.2)
    datagrams: list[tuple[float, str]] = []
    done = threading.Event()

    def drain():  # as systemd does: read every datagram as it comes
        while not done.is_set():
            try:
                datagrams.append((time.monotonic(), notify.recv(4096).decode()))
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    env = {**fed.env, "NOTIFY_SOCKET": str(fed.root / "notify.sock"),
           "WATCHDOG_USEC": "1000000"}
    agent = Proc("site-0", [sys.executable, "-c", WEDGE, "agent", "--config", str(cfg)],
                 fed.root / "agent-site-0.log", env)
    fed.procs["site-0"] = agent
    try:
        wait_for(lambda: {"site-0", "site-1"} <= fed.connected(), 60, "both heartbeats")
        fed.submit(STUCK_PLAN)
        wait_for(lambda: "training thread now wedged" in agent.output(), 60,
                 "the training to wedge")
        wait_for(lambda: "worker stuck: train" in agent.output(), 60,
                 "the stuck worker to be logged")
        stuck_at = time.monotonic()
        wait_for(lambda: fed.query("SELECT eligible, eligibility_reason FROM appliances "
                                   "WHERE site_id = 'site-0' AND eligible = 0 AND "
                                   "eligibility_reason LIKE 'worker stuck:%'"), 30,
                 "the coordinator to record site-0 as not eligible")
        time.sleep(max(0.0, stuck_at + 4.0 - time.monotonic()))
        assert agent.p.poll() is None, agent.output()
    finally:
        done.set()
        reader.join(5)
        agent.stop()
        notify.close()
    out = agent.output()
    pings = [t for t, d in datagrams if "WATCHDOG=1" in d.splitlines()]
    assert len(pings) >= 4, (datagrams, out)  # it pinged while it was working
    # none once the stuck task was logged (4 s more: 8 ping periods)
    late = [round(t - stuck_at, 2) for t in pings if t > stuck_at + 0.1]
    assert not late, (late, out)
    assert [d for _, d in datagrams if "STATUS=worker stuck: train" in d], datagrams
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert any("worker stuck: train" in line and "still running on fedge-task" in line
               for line in errors), out
    assert any("no more watchdog pings" in line for line in errors), out
