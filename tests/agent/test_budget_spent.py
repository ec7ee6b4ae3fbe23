"""A site whose privacy budget is spent already refuses a TrainTask at once, naming the
setting, the cap and its ε, instead of training every round and refusing only at the
masked input (where, kept in every cohort, it failed attempt after attempt with a tight
min_clients or t); and, its max_epsilon_total met, its heartbeats say it is not
eligible. A ledger holding a released run without DP has an unbounded total: under
max_epsilon_total, that is said.

Real TorchTrainer on Fed-TCGA-BRCA and its privacy ledger on disk
(tests/agent/test_privacy_release's fleet)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.trainer import ledger_path
from fedge.train.accounting import DP_SGD, NO_DP, PrivacyLedger
from fedge.wire import messages as m
from tests.agent.test_guard import JOB, SITES
from tests.agent.test_privacy_release import DELTA, DP_PLAN, fleet  # noqa: F401


def earlier_runs(tmp_path: Path, site: str, job: str, rounds: int,
                 mechanism: str = DP_SGD) -> float:
    """``site``'s ledger on disk holding ``rounds`` released runs of ``job``; its ε."""
    ledger = PrivacyLedger()
    for r in range(1, rounds + 1):
        ledger.record(job=job, round=r, mechanism=mechanism,
                      noise_multiplier=1.1 if mechanism == DP_SGD else 0.0,
                      sampling_rate=16 / 125, steps=3)
    ledger_path(tmp_path / site).parent.mkdir(parents=True)
    ledger.save(ledger_path(tmp_path / site))
    return ledger.epsilon(DELTA)


def train(f) -> None:
    asyncio.run(f.train(SITES, "t1", plan=DP_PLAN))


def trained(f) -> list[str]:
    return sorted(s for s, b in f.inbox if isinstance(b, m.TrainDone))


def test_a_site_over_its_max_epsilon_total_refuses_the_task_and_is_not_eligible(
        fleet, tmp_path: Path) -> None:  # noqa: F811
    spent = earlier_runs(tmp_path, "site-b", "old-job", 29)
    assert spent > 2.5
    f = fleet(PrivacyPolicy(max_epsilon_total=2.5))
    train(f)
    assert trained(f) == ["site-a", "site-c"]
    refused = f.refusals()
    assert list(refused) == ["site-b"]
    assert refused["site-b"].startswith(
        f"privacy budget spent: epsilon {spent:.4g} >= max_epsilon_total 2.5"), refused
    assert refused["site-b"].endswith("; not training")
    [b] = [b for s, b in f.inbox if s == "site-b"]
    assert isinstance(b, m.TaskRefused) and b.task == m.TASK_TRAIN
    assert len(fleet.ledger("site-b").entries) == 29  # nothing trained, nothing recorded

    f.inbox.clear()
    asyncio.run(f.agents["site-b"].heartbeat())
    asyncio.run(f.agents["site-a"].heartbeat())
    beats = {s: b for s, b in f.inbox if isinstance(b, m.Heartbeat)}
    assert not beats["site-b"].eligible
    assert beats["site-b"].reason.startswith(
        f"privacy budget spent: epsilon {spent:.4g} >= max_epsilon_total 2.5")
    assert beats["site-a"].eligible, beats["site-a"].reason


def test_a_site_at_its_jobs_max_epsilon_refuses_that_jobs_task_only(
        fleet, tmp_path: Path) -> None:  # noqa: F811
    spent = earlier_runs(tmp_path, "site-b", JOB, 29)
    f = fleet(PrivacyPolicy(max_epsilon=2.5))
    train(f)
    assert trained(f) == ["site-a", "site-c"]
    assert f.refusals()["site-b"] == (
        f"privacy budget spent: job {JOB!r}'s epsilon at this site is already "
        f"{spent:.4g} (delta 1e-05), at or above this appliance's [privacy] "
        "max_epsilon = 2.5; not training")
    f.inbox.clear()
    asyncio.run(f.agents["site-b"].heartbeat())  # another job may still train here
    [beat] = [b for _, b in f.inbox if isinstance(b, m.Heartbeat)]
    assert beat.eligible, beat.reason


def test_a_released_run_without_dp_spends_every_max_epsilon_total_and_says_so(
        fleet, tmp_path: Path) -> None:  # noqa: F811
    spent = earlier_runs(tmp_path, "site-b", "exact-job", 1, mechanism=NO_DP)
    assert spent == float("inf")
    f = fleet(PrivacyPolicy(max_epsilon_total=100))
    train(f)
    assert trained(f) == ["site-a", "site-c"]
    reason = f.refusals()["site-b"]
    assert reason.startswith("privacy budget spent: epsilon inf >= max_epsilon_total 100")
    assert "a released run without DP (job 'exact-job')" in reason, reason
