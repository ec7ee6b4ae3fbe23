"""The agent's task handling, one message at a time, with a recording link."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import LocalResult, SyntheticTrainer, TaskRefusal
from fedge.coordinator.checkpoint import model_digest
from fedge.coordinator.plan import parse_plan
from fedge.wire import codec
from fedge.wire import messages as m
from fedge.wire.messages import HEALTH_MIN_COHORT

# these agents run plans with and without secure aggregation
PLAIN_OK = PrivacyPolicy(require_secure_aggregation=False)

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
[model]
name = "linear"
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = false
clip = 0.25
"""


class Link:
    def __init__(self, agent):
        self.sent = []
        agent.send_frames = self.send

    async def send(self, frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 24)
        self.sent.append(env)

    def bodies(self, cls):
        return [e.body for e in self.sent if isinstance(e.body, cls)]


def deliver(agent, body, job="job1", rnd=1):
    frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job=job, round=rnd)]
    return agent.handle_frames(frames)


def task(plan=PLAN, d=4, task_id="t1"):
    w = np.zeros(d, np.float32)
    return m.TrainTask(task_id=task_id, plan=plan, weights=w,
                       model_digest=bytes.fromhex(model_digest(w)),
                       train_seed=1, quant_seed=b"\x01" * 16)


def test_heartbeat_reports_version_health_and_datasets():
    agent = Agent("site-a", SyntheticTrainer("site-a"),
                  health=lambda: ({"gpu_temp_c": 40}, False, "GPU too hot"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(agent.heartbeat())
    (hb,) = link.bodies(m.Heartbeat)
    assert hb.site == "site-a" and hb.datasets == ["synthetic"]
    # the probe's report, and the privacy floor (the coordinator's cohort check)
    assert json.loads(hb.health_json) == {"gpu_temp_c": 40, HEALTH_MIN_COHORT: 3}
    assert (hb.eligible, hb.reason) == (False, "GPU too hot")
    assert link.sent[0].header.sender == "site-a"


def test_broken_health_probe_reports_ineligible_instead_of_crashing():
    def boom():
        raise OSError("nvml gone")

    agent = Agent("site-a", SyntheticTrainer("site-a"), health=boom, policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(agent.heartbeat())
    (hb,) = link.bodies(m.Heartbeat)
    assert not hb.eligible and "nvml gone" in hb.reason


def test_before_the_first_health_probe_returns_the_appliance_is_not_eligible(monkeypatch):
    """The cohort holds only appliances known to be healthy: a first probe stuck in
    NVML is no verdict of health."""
    import fedge.agent.runtime as rt

    monkeypatch.setattr(rt, "PROBE_WAIT_S", 0.05)
    release = threading.Event()

    def probe():
        release.wait(5)
        return {"probe": 1}, True, "eligible: 1 GPU(s) healthy"

    agent = Agent("site-a", SyntheticTrainer("site-a"), health=probe, policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        await agent.heartbeat()
        await agent.heartbeat()

    try:
        asyncio.run(go())
    finally:
        release.set()
    for hb in link.bodies(m.Heartbeat):
        assert (hb.eligible, hb.reason) == (False, "health not measured yet")
        assert json.loads(hb.health_json) == {HEALTH_MIN_COHORT: 3}  # no probe report


async def _until_the_probe_returns(agent, timeout=5.0):
    deadline = time.monotonic() + timeout
    while agent._probe is not None and not agent._probe.done():
        assert time.monotonic() < deadline, "the health probe did not return"
        await asyncio.sleep(0.01)


def test_a_health_probe_stuck_past_the_report_age_limit_makes_the_appliance_ineligible(
        monkeypatch):
    """A probe that hangs (an NVML call stuck after XID 79) leaves the last verdict
    standing for max_report_age_s, no longer: then heartbeats say not eligible and how
    long the probe has been stuck; the probe returning makes it eligible again."""
    import fedge.agent.runtime as rt

    monkeypatch.setattr(rt, "PROBE_WAIT_S", 0.05)
    limit = 0.5
    hang, release = threading.Event(), threading.Event()

    def probe():
        if hang.is_set():
            release.wait(5)
        return {"gpus": 1}, True, "eligible: 1 GPU(s) healthy"

    agent = Agent("site-a", SyntheticTrainer("site-a"), health=probe, max_report_age_s=limit,
                  policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        await agent.heartbeat()  # 1: measured, eligible
        hang.set()
        t0 = time.monotonic()
        await agent.heartbeat()  # 2: the probe hangs, the last verdict stands
        await agent.heartbeat()  # 3: likewise, without waiting
        within = time.monotonic() - t0
        await asyncio.sleep(limit + 0.2)
        await agent.heartbeat()  # 4: stuck past the limit
        await agent.heartbeat()  # 5: still stuck
        release.set()
        await _until_the_probe_returns(agent)
        await agent.heartbeat()  # 6: the stuck probe's verdict, fresh
        return within

    try:
        within = asyncio.run(go())
    finally:
        release.set()
    hbs = link.bodies(m.Heartbeat)
    assert within < limit
    assert [hb.eligible for hb in hbs] == [True, True, True, False, False, True]
    for hb in hbs[3:5]:
        match = re.fullmatch(r"health probe has not returned for ([0-9.]+) s \(limit 0.5 s\): "
                             r"a hung NVML call\?", hb.reason)
        assert match and float(match.group(1)) > limit, hb.reason
        # the last report, for the fleet view
        assert json.loads(hb.health_json) == {"gpus": 1, HEALTH_MIN_COHORT: 3}
    assert hbs[5].reason == "eligible: 1 GPU(s) healthy"


def test_a_verdict_older_than_the_report_age_limit_is_not_sent_as_eligible(monkeypatch):
    """Heartbeats that stopped for a while (a stalled loop, a link down) find a verdict
    decided long ago; the next probe not back yet, the old one does not stand."""
    import fedge.agent.runtime as rt

    monkeypatch.setattr(rt, "PROBE_WAIT_S", 0.05)
    limit = 0.3
    hang, release = threading.Event(), threading.Event()

    def probe():
        if hang.is_set():
            release.wait(5)
        return {}, True, "eligible: 1 GPU(s) healthy"

    agent = Agent("site-a", SyntheticTrainer("site-a"), health=probe, max_report_age_s=limit,
                  policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        await agent.heartbeat()
        await asyncio.sleep(limit + 0.1)
        hang.set()
        await agent.heartbeat()  # the new probe has run PROBE_WAIT_S, the verdict is old
        release.set()
        await _until_the_probe_returns(agent)
        await agent.heartbeat()

    try:
        asyncio.run(go())
    finally:
        release.set()
    first, old, fresh = link.bodies(m.Heartbeat)
    assert first.eligible and fresh.eligible
    assert not old.eligible
    assert re.fullmatch(r"health report is [0-9.]+ s old \(limit 0.3 s\)", old.reason)


def test_the_agent_takes_its_report_age_limit_from_the_sites_eligibility_policy(tmp_path):
    from fedge.agent.process import AgentConfig, health_max_age_s

    assert health_max_age_s(AgentConfig(tmp_path, eligibility={"max_report_age_s": 42})) == 42
    assert health_max_age_s(AgentConfig(tmp_path)) == 300.0  # EligibilityPolicy's default
    assert health_max_age_s(AgentConfig(tmp_path, health=False)) == 300.0
    with pytest.raises(ValueError, match="max_report_age_s"):
        health_max_age_s(AgentConfig(tmp_path, eligibility={"max_report_age_s": 0}))
    with pytest.raises(ValueError, match=r"max_report_age_s=0 must be > 0"):
        Agent("site-a", SyntheticTrainer("site-a"), max_report_age_s=0)


def test_the_sites_eligibility_table_is_parsed_once_for_the_probe_and_the_age_limit(
        tmp_path, monkeypatch):
    from fedge.agent.process import AgentConfig, health_max_age_s, health_probe
    from fedge.health import EligibilityPolicy

    parsed = []
    real = EligibilityPolicy.from_config

    def counted(config):
        parsed.append(config)
        return real(config)

    monkeypatch.setattr(EligibilityPolicy, "from_config", counted)
    cfg = AgentConfig(tmp_path, eligibility={"max_report_age_s": 42})
    health_probe(cfg)
    assert health_max_age_s(cfg) == 42
    assert parsed == [{"max_report_age_s": 42}]


def test_task_for_a_dataset_not_held_is_refused_with_reason():
    agent = Agent("site-a", SyntheticTrainer("site-a", dataset="other"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task()))
    (ref,) = link.bodies(m.TaskRefused)
    assert ref.task_id == "t1" and "'synthetic' is not held by site-a" in ref.reason
    assert link.sent[0].header.job == "job1" and link.sent[0].header.round == 1
    assert agent.task is None


def test_unrunnable_plan_is_refused():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task(plan=PLAN.replace("rounds = 1", "rounds = -1"))))
    (ref,) = link.bodies(m.TaskRefused)
    assert "unrunnable plan" in ref.reason and "job.rounds" in ref.reason


def test_a_plan_nested_past_the_parsers_depth_is_refused_by_name():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task(plan="a = " + "[" * 100_000)))
    (ref,) = link.bodies(m.TaskRefused)
    assert "nested too deeply" in ref.reason and agent.task is None


def test_an_internal_error_handling_a_message_is_logged_and_the_agent_goes_on(caplog):
    """A message that reaches a bug (here the roster handler made to fail) is logged
    with its type, never raised into the transport's task; the next message is served."""
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)

    def broken(data):
        raise KeyError("boom")

    agent._on_roster = broken
    with caplog.at_level("ERROR", logger="fedge.agent"):
        asyncio.run(deliver(agent, m.RosterUpdate(b"{}")))
    assert "internal error handling roster_update" in caplog.text
    asyncio.run(deliver(agent, task()))
    assert len(link.bodies(m.TrainDone)) == 1


def test_secure_plan_without_identity_is_refused():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task(plan=PLAN.replace("enabled = false", "enabled = true"))))
    assert "enrolled identity" in link.bodies(m.TaskRefused)[0].reason


def test_trainer_refusal_is_forwarded():
    class Refusing(SyntheticTrainer):
        def train(self, *a, **k):
            raise TaskRefusal("privacy budget exhausted")

    agent = Agent("site-a", Refusing("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task()))
    assert link.bodies(m.TaskRefused)[0].reason == "privacy budget exhausted"


def test_an_unforeseen_training_error_is_answered_and_the_agent_is_free_again(caplog):
    """Training fails with an error no code path names (here an OSError): the site
    answers TaskRefused at once, rather than leaving the round to wait its training
    deadline, keeps the details in its own journal, and takes the next task."""
    class Failing(SyntheticTrainer):
        def train(self, *a, **k):
            open("/nonexistent/fedge/scratch", "rb")  # noqa: SIM115 - raises

    agent = Agent("site-a", Failing("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    with caplog.at_level("ERROR", logger="fedge.agent"):
        asyncio.run(deliver(agent, task()))
    (refused,) = link.bodies(m.TaskRefused)
    assert refused.task_id == "t1" and refused.task == m.TASK_TRAIN
    assert refused.reason == ("local training failed: internal error (FileNotFoundError; "
                              "see the site's journal)")
    assert "/nonexistent/fedge/scratch" in caplog.text  # the details stay here
    assert agent.task is None and agent._busy == ""
    agent.trainer = SyntheticTrainer("site-a")
    asyncio.run(deliver(agent, task(task_id="t2")))
    assert [d.task_id for d in link.bodies(m.TrainDone)] == ["t2"]


def test_train_then_plain_update_is_clipped_weighted_and_has_no_rows():
    trainer = SyntheticTrainer("site-a", n_examples=40)
    agent = Agent("site-a", trainer, policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        await deliver(agent, task())
        await deliver(agent, m.AggregateBegin(task_id="t1", cohort=["site-a", "site-b"],
                                              weight_scale=0.25 / 80, secure=False,
                                              threshold=1))
    asyncio.run(go())
    (done,) = link.bodies(m.TrainDone)
    assert done.n_examples == 40 and "loss" in done.metrics
    (up,) = link.bodies(m.PlainUpdate)
    w = 0.25 / 80 * 40
    delta = np.clip(0.5 * trainer.target(4), -0.25, 0.25)
    np.testing.assert_allclose(up.vector, np.concatenate([w * delta, [w]]), rtol=1e-6)
    assert up.vector.size == 5  # d + 1: the update and the weight, nothing per example


def test_aggregate_for_unknown_or_stale_task_is_refused():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        await deliver(agent, task(task_id="new"))
        await deliver(agent, m.AggregateBegin(task_id="old", cohort=["site-a"], weight_scale=1.0,
                                              secure=False, threshold=1))
    asyncio.run(go())
    assert link.bodies(m.TaskRefused)[0].reason == "no trained update for this round"
    assert link.bodies(m.PlainUpdate) == []


def test_round_abort_drops_state():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    Link(agent)

    async def go():
        await deliver(agent, task())
        assert agent.task is not None
        await deliver(agent, m.RoundAbort("cohort too small"))
    asyncio.run(go())
    assert agent.task is None


def test_a_rejection_from_the_coordinator_is_logged_shortened_and_not_kept(caplog):
    """The reason goes to the site's journal, cut to 300 characters; the agent keeps
    no list of them (one appended per message grew for the life of the process)."""
    import logging

    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    Link(agent)
    before = {name: repr(value) for name, value in vars(agent).items()}

    async def go():
        for _ in range(3):
            await deliver(agent, m.Rejected("x" * 5000))
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        asyncio.run(go())
    lines = [r.getMessage() for r in caplog.records if "rejected a message" in r.getMessage()]
    assert len(lines) == 3 and all(len(line) < 400 for line in lines)
    assert {name: repr(value) for name, value in vars(agent).items()} == before


class CountingTrainer(SyntheticTrainer):
    def __init__(self, site):
        super().__init__(site)
        self.trained = []

    def train(self, site, job, plan, weights, *, round, seed, **kw):
        self.trained.append((job, round))
        return super().train(site, job, plan, weights, round=round, seed=seed, **kw)


def test_a_round_aborted_while_its_task_plan_is_parsed_is_not_trained():
    """TrainTask then RoundAbort, each handled as its own asyncio task (as the agent
    process's receive loop does): the abort lands while the plan is parsed in the
    executor, before the task is the agent's. The aborted attempt must not occupy the
    one worker nor send a stale TrainDone; the round's next attempt trains."""
    trainer = CountingTrainer("site-a")
    agent = Agent("site-a", trainer, policy=PLAIN_OK)
    link = Link(agent)

    def frames(body, job="job1", rnd=1):
        return [bytes(f) for f in codec.encode(body, sender="coordinator", job=job,
                                               round=rnd)]

    async def go():
        racing = [asyncio.ensure_future(agent.handle_frames(frames(body))) for body in
                  (task(task_id="attempt-1"), m.RoundAbort("job cancelled"))]
        await asyncio.gather(*racing)
        assert trainer.trained == [] and agent.task is None and agent._busy == ""
        assert link.sent == []
        # an abort of another round leaves a task being parsed alone
        racing = [asyncio.ensure_future(agent.handle_frames(f)) for f in
                  (frames(task(task_id="attempt-2")),
                   frames(m.RoundAbort("other round"), rnd=2))]
        await asyncio.gather(*racing)
    asyncio.run(go())
    assert trainer.trained == [("job1", 1)]
    assert [d.task_id for d in link.bodies(m.TrainDone)] == ["attempt-2"]
    assert agent._arriving == []


def test_evaluation_result():
    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=7), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, m.EvalTask(task_id="t1", plan=PLAN,
                                          weights=np.zeros(4, np.float32), split="test")))
    (ev,) = link.bodies(m.EvalResult)
    assert ev.n_examples == 7 and ev.metrics["loss"] > 0


def test_malformed_message_from_coordinator_is_dropped():
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(agent.handle_frames([b"\x00garbage", b""]))
    assert link.sent == [] and agent.task is None


def test_a_message_nested_a_thousand_deep_is_dropped_and_the_agent_goes_on():
    """1 KB of msgpack nested ~1000 lists deep: parsed, then refused. Describing the
    bad field once raised RecursionError, which is no WireError."""
    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=7), policy=PLAIN_OK)
    link = Link(agent)
    header = bytes(codec.encode(m.HeartbeatAck(time=1.0, coordinator_version="1"),
                                sender="coordinator")[0])
    for depth in (900, 1000, 1023, 1100):
        asyncio.run(agent.handle_frames([header, b"\x91" * depth + b"\xc0"]))
    assert link.sent == [] and agent.task is None
    asyncio.run(deliver(agent, m.EvalTask(task_id="t1", plan=PLAN,
                                          weights=np.zeros(4, np.float32), split="test")))
    assert [e.n_examples for e in link.bodies(m.EvalResult)] == [7]


def test_an_unforeseen_evaluation_error_is_answered_and_the_agent_is_free_again(caplog):
    class Failing(SyntheticTrainer):
        def evaluate(self, *a, **k):
            open("/nonexistent/fedge/eval", "rb")  # noqa: SIM115 - raises

    agent = Agent("site-a", Failing("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    with caplog.at_level("ERROR", logger="fedge.agent"):
        asyncio.run(deliver(agent, m.EvalTask(task_id="t1", plan=PLAN,
                                              weights=np.zeros(4, np.float32),
                                              split="test")))
    (refused,) = link.bodies(m.TaskRefused)
    assert refused.task_id == "t1" and refused.task == m.TASK_EVAL
    assert refused.reason == ("evaluation failed: internal error (FileNotFoundError; "
                              "see the site's journal)")
    assert "/nonexistent/fedge/eval" in caplog.text
    assert agent.task is None and agent._busy == ""


def test_a_result_outside_the_wires_example_range_is_refused_not_left_to_time_out():
    """A trainer that counts 0 examples (or more than 2^40) cannot be told as a
    TrainDone: the site refuses at once instead of raising inside the handler."""
    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=0), policy=PLAIN_OK)
    link = Link(agent)
    asyncio.run(deliver(agent, task()))
    (refused,) = link.bodies(m.TaskRefused)
    assert refused.task == m.TASK_TRAIN and "trained on 0 examples" in refused.reason
    assert agent.task is None and agent._busy == ""
    agent.trainer = SyntheticTrainer("site-a", n_examples=m.MAX_EXAMPLES + 1)
    asyncio.run(deliver(agent, m.EvalTask(task_id="t2", plan=PLAN,
                                          weights=np.zeros(4, np.float32), split="test")))
    (_, refused) = link.bodies(m.TaskRefused)
    assert refused.task == m.TASK_EVAL and "an evaluation result needs 0.." in refused.reason


async def start_training(agent):
    """Deliver a TrainTask and return once the agent holds it (the plan is parsed off
    the loop first), with the delivery still running as a task."""
    training = asyncio.create_task(deliver(agent, task()))
    for _ in range(500):
        if agent.task is not None:
            break
        await asyncio.sleep(0.01)
    return training


def test_heartbeats_flow_while_training_runs_in_the_worker():
    release = threading.Event()

    class Slow(SyntheticTrainer):
        def train(self, *a, **k):
            release.wait(5)
            return LocalResult(np.zeros(4, np.float32), 1, {})

    agent = Agent("site-a", Slow("site-a"), policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        training = await start_training(agent)
        t0 = time.monotonic()
        for _ in range(3):
            await agent.heartbeat()
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        release.set()
        await training
        return elapsed

    elapsed = asyncio.run(go())
    assert elapsed < 2.0
    hbs = link.bodies(m.Heartbeat)
    assert len(hbs) == 3 and hbs[0].current_task.startswith("train job1")
    assert len(link.bodies(m.TrainDone)) == 1


def test_health_probes_do_not_queue_behind_training_on_the_one_worker(monkeypatch):
    """`fedge agent` trains on one worker thread by default. Heartbeats during a long
    round still carry a fresh health report (the probe has its own thread); a probe
    that hangs (an NVML call stuck) delays one heartbeat by PROBE_WAIT_S at most and
    the next ones go out at once with the last report."""
    from concurrent.futures import ThreadPoolExecutor

    import fedge.agent.runtime as rt

    monkeypatch.setattr(rt, "PROBE_WAIT_S", 0.3)
    release, hang = threading.Event(), threading.Event()
    probes = []

    def probe():
        probes.append(threading.current_thread().name)
        if hang.is_set():
            release.wait(10)
        return {"probe": len(probes)}, True, ""

    class Slow(SyntheticTrainer):
        def train(self, *a, **k):
            release.wait(10)
            return LocalResult(np.zeros(4, np.float32), 1, {})

    one = ThreadPoolExecutor(1)
    agent = Agent("site-a", Slow("site-a"), executor=one, health=probe, policy=PLAIN_OK)
    link = Link(agent)

    async def go():
        training = await start_training(agent)
        t0 = time.monotonic()
        for _ in range(3):
            await agent.heartbeat()
        fresh = time.monotonic() - t0
        hang.set()
        t0 = time.monotonic()
        for _ in range(3):
            await agent.heartbeat()
        stuck = time.monotonic() - t0
        release.set()
        await training
        return fresh, stuck

    try:
        fresh, stuck = asyncio.run(go())
    finally:
        release.set()
        one.shutdown(wait=True)
    reports = [json.loads(hb.health_json) for hb in link.bodies(m.Heartbeat)]
    assert [r["probe"] for r in reports[:3]] == [1, 2, 3] and fresh < 2.0
    # the fourth probe hangs: heartbeats 4-6 carry report 3, and it is not re-queued;
    # its verdict stands while the probe is within max_report_age_s (300 s here)
    assert [r["probe"] for r in reports[3:]] == [3, 3, 3] and len(probes) == 4
    assert all(hb.eligible for hb in link.bodies(m.Heartbeat))
    assert 0.3 <= stuck < 0.3 + 1.0
    assert all(name.startswith("fedge-health") for name in probes)
    assert len(link.bodies(m.TrainDone)) == 1


def test_synthetic_trainer_refuses_other_dataset():
    with pytest.raises(TaskRefusal, match="not held"):
        SyntheticTrainer("a", dataset="x").train("a", "j", parse_plan(PLAN),
                                                  np.zeros(2, np.float32), round=1, seed=0)


SCAFFOLD_PLAN = PLAN.replace('name = "fedavg"', 'name = "scaffold"')


@pytest.mark.parametrize("control", [None, np.zeros(3, np.float32)])
def test_scaffold_task_without_a_fitting_server_control_is_refused(control):
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    t = task(plan=SCAFFOLD_PLAN)
    t = m.TrainTask(**{**t.__dict__, "server_control": control})
    asyncio.run(deliver(agent, t))
    (ref,) = link.bodies(m.TaskRefused)
    assert "without a server control variate of length 4" in ref.reason
    assert agent.task is None and not link.bodies(m.TrainDone)


def test_scaffold_task_without_its_control_commit_is_refused_by_name():
    """A coordinator that predates ControlCommit: the agent would not know which of its
    Δc_i the server's c holds, so it refuses rather than let c_i drift from c."""
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)
    link = Link(agent)
    c = np.zeros(4, np.float32)
    t = m.TrainTask(**{**task(plan=SCAFFOLD_PLAN).__dict__, "server_control": c})

    async def go():
        await deliver(agent, t)
        # one for another attempt does not stand for this one
        await deliver(agent, m.ControlCommit(task_id="t0", summed_round=0))
        await deliver(agent, t)
    asyncio.run(go())
    refused = link.bodies(m.TaskRefused)
    assert len(refused) == 2 and all("without its ControlCommit" in r.reason
                                     and "update the coordinator" in r.reason
                                     for r in refused)
    assert not link.bodies(m.TrainDone)


def test_scaffold_update_vector_carries_delta_y_and_clipped_delta_c():
    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=10), policy=PLAIN_OK)
    link = Link(agent)
    c = np.array([0.0, 1.0, -1.0, 0.5], np.float32)
    plan = SCAFFOLD_PLAN.replace("clip = 0.25", "clip = 0.1")
    t = m.TrainTask(**{**task(plan=plan).__dict__, "server_control": c})
    asyncio.run(deliver(agent, m.ControlCommit(task_id="t1", summed_round=0)))
    asyncio.run(deliver(agent, t))
    assert link.bodies(m.TrainDone)
    local = agent.task.local
    asyncio.run(deliver(agent, m.AggregateBegin(task_id="t1", cohort=["site-a", "site-b"],
                                                weight_scale=0.02, secure=False, threshold=1)))
    (up,) = link.bodies(m.PlainUpdate)
    w = 0.02 * 10
    np.testing.assert_allclose(up.vector[:4], w * np.clip(local.weights, -0.1, 0.1),
                               rtol=1e-6)
    np.testing.assert_allclose(up.vector[4:8], w * np.clip(local.delta_control, -0.1, 0.1),
                               rtol=1e-6)
    assert up.vector[8] == np.float32(w) and up.vector.size == 9
    # Δc_i = c_i⁺ − c_i = −c + (w − y)/(K·lr) with c_i = 0, w = 0, K = 1, lr = 0.5
    np.testing.assert_allclose(local.delta_control, -c - local.weights / 0.5, atol=1e-6)
    # kept pending once the update left, clipped as it was summed
    at, pending = agent.pending_control("job1")
    assert at == 1 and agent.client_control("job1", 2) is None
    asyncio.run(deliver(agent, m.EvalTask(task_id="t1", plan=plan,
                                          weights=np.zeros(4, np.float32), split="test")))
    assert agent.client_control("job1", 2) is None  # an EvalTask moves nothing
    # the next task's ControlCommit says round 1's sum held it: c_i moves by what was
    # summed (Δc_i clipped), or the server's c, which moved by the clipped sum, would
    # drift from the mean of the c_i
    asyncio.run(deliver(agent, m.ControlCommit(task_id="t2", summed_round=1), rnd=2))
    assert np.abs(local.delta_control).max() > 0.1  # the clip matters here
    np.testing.assert_array_equal(pending, np.clip(local.delta_control.astype(np.float64),
                                                   -0.1, 0.1))
    np.testing.assert_array_equal(agent.client_control("job1", 2),
                                  np.clip(local.delta_control, -0.1, 0.1))
    assert agent.client_control("job1", 1) is None and agent.pending_control("job1") is None


def test_a_dc_the_control_commit_does_not_name_is_dropped_and_a_later_c_i_undone(tmp_path):
    """Round 1's update left but its attempt failed and round 1 was committed without
    this site: its Δc_i is dropped. c_i that an older agent moved when the EvalTask came
    (saved in the job state) goes back to the committed round's."""
    from fedge.agent.jobstate import JobStateStore

    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=10), policy=PLAIN_OK,
                  job_state=JobStateStore(tmp_path))
    Link(agent)
    scaffold_round(agent, "job", 1)
    assert agent.pending_control("job")[0] == 1
    asyncio.run(deliver(agent, m.ControlCommit(task_id="x", summed_round=0), job="job",
                        rnd=2))
    assert agent.pending_control("job") is None and agent.client_control("job", 2) is None
    # an older agent's state: c_i moved for rounds 1 and 2 at their EvalTasks
    JobStateStore(tmp_path).save("job", "controls", {
        "2": np.full(4, 0.5, np.float32), "3": np.full(4, 0.75, np.float32)})
    again = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK,
                  job_state=JobStateStore(tmp_path))
    asyncio.run(deliver(again, m.ControlCommit(task_id="y", summed_round=1), job="job",
                        rnd=3))
    np.testing.assert_array_equal(again.client_control("job", 3), np.full(4, 0.5))
    assert JobStateStore(tmp_path).load("job", "controls").keys() == {"2"}
    # a ControlCommit naming its own round or a later one is no commit
    asyncio.run(deliver(again, m.ControlCommit(task_id="z", summed_round=3), job="job",
                        rnd=3))
    np.testing.assert_array_equal(again.client_control("job", 9), np.full(4, 0.5))


def scaffold_round(agent, job, rnd=1, summed=0):
    """One SCAFFOLD round of ``job`` (ControlCommit naming round ``summed``, train, plain
    aggregate, evaluate): its Δc_i is pending; returns c_i for the round after."""
    c = np.array([0.0, 1.0, -1.0, 0.5], np.float32)
    t = m.TrainTask(**{**task(plan=SCAFFOLD_PLAN, task_id=f"{job}-{rnd}").__dict__,
                       "server_control": c})

    async def go():
        await deliver(agent, m.ControlCommit(task_id=f"{job}-{rnd}", summed_round=summed),
                      job=job, rnd=rnd)
        await deliver(agent, t, job=job, rnd=rnd)
        await deliver(agent, m.AggregateBegin(task_id=f"{job}-{rnd}",
                                              cohort=["site-a", "site-b"], weight_scale=0.02,
                                              secure=False, threshold=1), job=job, rnd=rnd)
        await deliver(agent, m.EvalTask(task_id=f"{job}-{rnd}", plan=SCAFFOLD_PLAN,
                                        weights=np.zeros(4, np.float32), split="test"),
                      job=job, rnd=rnd)
    asyncio.run(go())
    return agent.client_control(job, rnd + 1)


def commit(agent, job, rnd):
    """The ControlCommit of round ``rnd + 1``: round ``rnd``'s sum held the site's Δc_i."""
    asyncio.run(deliver(agent, m.ControlCommit(task_id="next", summed_round=rnd), job=job,
                        rnd=rnd + 1))
    return agent.client_control(job, rnd + 1)


def test_the_agent_holds_c_i_of_its_last_used_jobs_only_and_reloads_a_dropped_one(tmp_path):
    """Jobs end without telling the agent: c_i of finished jobs must not pile up in
    memory, and a job dropped from memory comes back with the c_i it committed."""
    from fedge.agent.jobstate import JobStateStore

    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=10), policy=PLAIN_OK,
                  job_state=JobStateStore(tmp_path), held_jobs=2)
    Link(agent)
    for job in ("job-1", "job-2"):
        scaffold_round(agent, job)
    committed = {job: commit(agent, job, 1) for job in ("job-1", "job-2")}
    assert committed["job-1"] is not None and list(agent.controls) == ["job-1", "job-2"]
    agent.client_control("job-1", 2)  # used again: now the newest
    scaffold_round(agent, "job-3")
    committed["job-3"] = commit(agent, "job-3", 1)
    assert list(agent.controls) == ["job-1", "job-3"]  # job-2, used longest ago, dropped
    for _ in range(10):
        scaffold_round(agent, "job-4")
    assert len(agent.controls) == 2
    # job-2's next round starts from what it committed, read back from disk once
    loads = []
    real_load = agent.job_state.load
    agent.job_state.load = lambda job, kind: loads.append((job, kind)) or real_load(job, kind)
    np.testing.assert_array_equal(agent.client_control("job-2", 2), committed["job-2"])
    assert agent.pending_control("job-2") is None
    assert loads == [("job-2", "controls")]
    assert list(agent.controls) == ["job-4", "job-2"]
    with pytest.raises(ValueError, match="held_jobs=0"):
        Agent("site-a", SyntheticTrainer("site-a"), held_jobs=0)


def test_without_a_job_store_a_job_dropped_from_memory_starts_from_zeros():
    agent = Agent("site-a", SyntheticTrainer("site-a", n_examples=10), policy=PLAIN_OK,
                  held_jobs=1)
    Link(agent)
    scaffold_round(agent, "job-1")
    assert commit(agent, "job-1", 1) is not None
    scaffold_round(agent, "job-2")
    assert list(agent.controls) == ["job-2"]
    assert agent.client_control("job-1", 2) is None


def test_a_newer_roster_from_the_coordinator_is_kept_an_older_or_foreign_one_refused(
        tmp_path, caplog):
    """Sites enrolled after this one reach it through the coordinator, signed by the
    console; a replayed older roster, one signed by another key, or one without this
    site's own identity is refused by name and the roster in force is kept."""
    import logging

    from fedge.secagg.keys import Identity, Roster

    console, me, other = Identity.generate(), Identity.generate(), Identity.generate()
    path = tmp_path / "roster.json"
    at_enrolment = Roster.build({"site-a": me.public_bytes()}, console, serial=1)
    path.write_bytes(at_enrolment.to_bytes())
    agent = Agent("site-a", SyntheticTrainer("site-a"), identity=me, roster=at_enrolment,
                  roster_key=console.public_bytes(), roster_path=path, policy=PLAIN_OK)
    Link(agent)
    both = {"site-a": me.public_bytes(), "site-b": other.public_bytes()}

    async def send(roster):
        await deliver(agent, m.RosterUpdate(roster.to_bytes()), job="", rnd=0)

    newer = Roster.build(both, console, serial=3)
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        asyncio.run(send(newer))
        assert agent.roster.serial == 3 and "site-b" in agent.roster
        assert path.read_bytes() == newer.to_bytes()  # a restart starts from it
        refused = [
            (Roster.build({"site-a": me.public_bytes()}, console, serial=2), "older"),
            (Roster.build(both, Identity.generate(), serial=9), "does not verify"),
            (Roster.build({"site-a": other.public_bytes(), "site-b": other.public_bytes()},
                          console, serial=9), "does not hold this site"),
        ]
        for roster, why in refused:
            caplog.clear()
            asyncio.run(send(roster))
            assert why in caplog.text and "roster update refused" in caplog.text
            assert agent.roster.serial == 3 and path.read_bytes() == newer.to_bytes()


def test_a_newer_roster_that_cannot_be_kept_on_disk_is_still_taken(tmp_path, caplog):
    """A full or broken disk: the roster is in force in memory (the coordinator sends it
    again after a restart), and the failure is named."""
    import logging

    from fedge.secagg.keys import Identity, Roster

    console, me = Identity.generate(), Identity.generate()
    (tmp_path / "state").write_text("a file where the state directory should be")
    agent = Agent("site-a", SyntheticTrainer("site-a"), identity=me,
                  roster=Roster.build({"site-a": me.public_bytes()}, console, serial=1),
                  roster_key=console.public_bytes(), roster_path=tmp_path / "state" / "r.json",
     policy=PLAIN_OK)
    newer = Roster.build({"site-a": me.public_bytes(), "site-b": console.public_bytes()},
                         console, serial=2)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        assert agent._on_roster(newer.to_bytes()) is True
    assert agent.roster.serial == 2
    assert "roster serial 2 not kept in" in caplog.text and "r.json" in caplog.text
