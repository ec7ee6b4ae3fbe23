"""What an EvalTask may ask of a site: real Agents over TorchTrainer (Fed-TCGA-BRCA),
real wire encoding, job state on disk (tests/agent/test_guard.py's Fleet).

Evaluation metrics leave without noise, on weights the coordinator chooses. A
coordinator that wrote its own plan for an EvalTask (no [privacy] table, secure
aggregation off, ``eval_split = "train"``) read the loss of chosen weights on a
``require_dp`` site's training rows, in float64: finite differences of it gave that
site's training gradient (410 EvalTasks imitated its update with cosine 0.76)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy, plan_digest
from fedge.agent.jobstate import JobStateStore
from fedge.agent.runtime import METRIC_DIGITS, Agent
from fedge.agent.trainer import TorchTrainer
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_guard import RND, SITES, Fleet
from tests.agent.test_privacy_release import BOUNDED, DATA, DP_PLAN

D = 40  # cox_linear on 39 features
# a plan the coordinator writes for the occasion: no DP, no secure aggregation, and
# the training split named as the one to evaluate
ORACLE_PLAN = (DP_PLAN.split("[privacy]")[0].replace("enabled = true", "enabled = false")
               .replace("[job]", '[job]\neval_split = "train"'))


@pytest.fixture
def fleet(tmp_path: Path):
    """``fleet(policy)``: three agents on Fed-TCGA-BRCA centres 0-2, each with its
    ledger and job state under ``tmp_path/<site>``; ``fleet.restart(site)`` makes a new
    Agent over the same state directory, as a restarted appliance would be."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")

    def make(policy: PrivacyPolicy | None = None) -> Fleet:
        f = Fleet(policy=policy)
        f.weights = np.zeros(D, np.float32)

        def restart(site: str) -> Agent:
            old = f.agents[site]
            new = Agent(site, TorchTrainer(
                [{"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA),
                  "site": SITES.index(site), **BOUNDED}], state_dir=tmp_path / site),
                identity=old.identity, roster=old.roster, roster_key=old.roster_key,
                policy=policy, job_state=JobStateStore(tmp_path / site / "jobs"))
            new.send_frames = old.send_frames
            f.agents[site] = new
            return new

        for site in SITES:
            restart(site)
        f.restart = restart
        return f

    return make


def evaluate(f: Fleet, site: str, plan: str, split: str, task_id: str = "e1") -> object:
    f.inbox.clear()
    asyncio.run(f.deliver(site, m.EvalTask(task_id=task_id, plan=plan,
                                           weights=np.full(D, 0.01, np.float32),
                                           split=split)))
    (body,) = [b for s, b in f.inbox if s == site]
    return body


def refused(body: object, *words: str) -> bool:
    return (isinstance(body, m.TaskRefused) and body.task == m.TASK_EVAL
            and all(w in body.reason for w in words))


def test_an_eval_plan_below_the_sites_floor_is_refused_not_only_the_jobs(fleet) -> None:
    """The site requires DP and secure aggregation. The coordinator's own plan for an
    EvalTask has neither and names the training split: refused, as the same plan in a
    TrainTask is, whatever job it names. The site's floor also refuses the training
    split outright (require_dp), whatever the plan."""
    policy = PrivacyPolicy(require_dp=True, require_secure_aggregation=True)
    f = fleet(policy)
    for job_plan in (ORACLE_PLAN, ORACLE_PLAN.replace("enabled = false", "enabled = true")):
        body = evaluate(f, "site-b", job_plan, "train")
        assert refused(body, "evaluation under this plan refused", "require"), body
    # the same plan's TrainTask: refused alike
    asyncio.run(f.train(["site-b"], "t1", plan=ORACLE_PLAN))
    assert "requires secure aggregation" in f.refusals()["site-b"]
    # require_dp: no training split, even under a plan that (for its part) allows it
    why = policy.refuse_evaluation("train", plan_split="train", secure=True,
                                   privacy={"dp": {"noise_multiplier": 1.0}})
    assert why is not None and "require_dp" in why and "training split" in why
    assert PrivacyPolicy().refuse_evaluation("train", plan_split="train", secure=True,
                                             privacy={}) is None
    # the job's own DP plan on the split it names: evaluated
    assert isinstance(evaluate(f, "site-b", DP_PLAN, "test"), m.EvalResult)


def test_a_job_this_site_trained_is_evaluated_under_that_jobs_plan_only(fleet) -> None:
    """site-a trained job1 under the DP plan. An EvalTask for job1 under another plan
    (no DP, the training split) is refused, before and after the agent restarts; the
    job's own plan, even laid out differently, is evaluated. site-c, in the roster but
    never trained in job1 (left out of every round), takes the job's evaluation under
    the policy's checks alone."""
    f = fleet()  # the default floor: secure aggregation required, DP not
    oracle = ORACLE_PLAN.replace("enabled = false", "enabled = true")  # meets the floor
    asyncio.run(f.train(["site-a", "site-b"], "t1", plan=DP_PLAN))
    assert {s for s, b in f.inbox if isinstance(b, m.TrainDone)} == {"site-a", "site-b"}
    for _ in range(2):
        body = evaluate(f, "site-a", oracle, "train")
        assert refused(body, "differs from the plan this site trained job 'job1' under"), body
        assert refused(evaluate(f, "site-a", oracle, "test"), "differs"), "any split"
        relaid = "# the same plan\n" + DP_PLAN.replace(" = ", "   =   ")
        assert plan_digest(relaid) == plan_digest(DP_PLAN) != plan_digest(oracle)
        for plan in (DP_PLAN, relaid):
            assert isinstance(evaluate(f, "site-a", plan, "test"), m.EvalResult)
        f.restart("site-a")  # the job's plan is kept on disk
    # another job, never trained here: the policy decides
    f.inbox.clear()
    asyncio.run(f.agents["site-a"].handle_frames([bytes(x) for x in codec.encode(
        m.EvalTask(task_id="e2", plan=oracle, weights=f.weights, split="train"),
        sender="coordinator", job="job2", round=RND)]))
    assert isinstance(f.inbox[-1][1], m.EvalResult)
    # a site in the roster that never trained in job1 takes its final test
    assert isinstance(evaluate(f, "site-c", DP_PLAN, "test"), m.EvalResult)


def test_evaluation_metrics_leave_rounded_to_six_significant_digits(fleet) -> None:
    """A float64 loss let finite differences of chosen weights read a training
    gradient; the metrics that leave carry METRIC_DIGITS (6) significant digits."""
    f = fleet()
    assert METRIC_DIGITS == 6
    body = evaluate(f, "site-a", DP_PLAN, "test")
    assert isinstance(body, m.EvalResult) and body.metrics
    for name, value in body.metrics.items():
        assert float(f"{value:.6g}") == value, (name, value)
    assert any(float(f"{v:.5g}") != v for v in body.metrics.values()), body.metrics
