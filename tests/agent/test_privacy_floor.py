"""The site's DP floor beyond "some noise": real Agents over TorchTrainer
(Fed-TCGA-BRCA), the real SecAgg+ ServerSession played by the test, privacy ledgers
on disk (tests/agent/test_privacy_release.py's fleet).

``require_dp = true`` once accepted a noise multiplier of 1e-9: the update left with
ε = inf, and the site only saw "unbounded" afterwards in ``fedge agent privacy``. The
plan's noise and target are the coordinator's word; the site's own numbers
(``min_noise_multiplier``, ``max_epsilon``, ``max_epsilon_total``) are checked against
the plan when its task comes, and against the site's own ledger when the run is
charged, just before its update could leave."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from fedge.agent.guard import PrivacyPolicy, PrivacyPolicyError
from fedge.agent.process import AgentConfigError, load_config
from fedge.agent.trainer import ledger_path
from fedge.secagg.messages import MaskedInput
from fedge.train.accounting import DP_SGD, PrivacyLedger, epsilon_for
from fedge.wire import messages as m
from tests.agent.test_guard import JOB, RND, SITES
from tests.agent.test_privacy_release import DELTA, DP_PLAN, fleet, one_round, runs

__all__ = ["fleet"]  # the fixture, taken over from test_privacy_release

TINY_SGD = DP_PLAN.replace("noise_multiplier = 1.1", "noise_multiplier = 1e-9")
TINY_FEDAVG = (DP_PLAN.split("[privacy]")[0].replace("clip = 1.0", "clip = 10.0")
               + "[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 1e-9, "
                 "cohort_size = 3 }\n")


def masked_inputs(f, site: str) -> list[object]:
    return [b for s, b, _ in f.sent if s == site and isinstance(b, MaskedInput)]


def test_require_dp_never_releases_an_update_whose_epsilon_is_unbounded(fleet) -> None:
    """DP-SGD with noise 1e-9: the plan alone cannot tell its ε (the site's record
    count does), so the sites train, and each withholds its masked input at charge
    time (ε unbounded): nothing is summed, nothing charged. DP-FedAvg with noise 1e-9:
    its ε over the plan's rounds is unbounded already, so the task is refused before
    training. With the plan's real noise, the round goes through."""
    f = fleet(PrivacyPolicy(require_dp=True))

    async def tiny_sgd():
        await f.train(SITES, "t1", plan=TINY_SGD)
        assert {s for s, b in f.inbox if isinstance(b, m.TrainDone)} == set(SITES)
        return await f.aggregate(SITES, "t1")

    assert asyncio.run(tiny_sgd()) is None
    refused = f.refusals()
    assert set(refused) == set(SITES), refused
    for site in SITES:
        assert "require_dp" in refused[site] and "unbounded" in refused[site], refused[site]
        assert "the masked input is withheld" in refused[site]
        assert not masked_inputs(f, site)
        assert runs(fleet.ledger(site)) == [(RND, 1, "pending")]  # never charged

    asyncio.run(f.train(SITES, "t2", plan=TINY_FEDAVG))
    refused = f.refusals()
    assert set(refused) == set(SITES), refused
    assert all("DP-FedAvg epsilon over its 3 round(s) is unbounded" in r
               for r in refused.values()), refused
    assert not [b for _, b in f.inbox if isinstance(b, m.TrainDone)]

    async def honest():
        await f.train(SITES, "t3", plan=DP_PLAN)
        return await f.aggregate(SITES, "t3")

    assert asyncio.run(honest()) is not None, f.refusals()
    for i, site in enumerate(SITES):
        assert fleet.ledger(site).epsilon(DELTA, job=JOB) == pytest.approx(one_round(i))


def test_max_epsilon_withholds_the_run_that_would_take_its_job_past_the_cap(fleet) -> None:
    """max_epsilon = 2.5: the first run of the job (ε 1.62, 2.34, 2.25 at the three
    centres) is summed; a second (a retried attempt: DP noise is fresh, a new run)
    would take site-b to 2.99 and site-c to 2.87, so they withhold it, uncharged, while
    site-a (1.99, from its own ledger) may release."""
    f = fleet(PrivacyPolicy(max_epsilon=2.5))

    async def first():
        await f.train(SITES, "t1", plan=DP_PLAN)
        return await f.aggregate(SITES, "t1")

    assert asyncio.run(first()) is not None, f.refusals()

    async def second():
        await f.train(SITES, "t2", plan=DP_PLAN)
        return await f.aggregate(SITES, "t2")

    asyncio.run(second())
    refused = f.refusals()
    assert set(refused) == {"site-b", "site-c"}, refused
    for site in ("site-b", "site-c"):
        reason = refused[site]
        assert "max_epsilon = 2.5" in reason and f"job {JOB!r}" in reason, reason
        assert "delta 1e-05" in reason and "the masked input is withheld" in reason
        assert len(masked_inputs(f, site)) == 1  # the first run's only
        assert runs(fleet.ledger(site)) == [(RND, 1, "released"), (RND, 2, "pending")]
    assert runs(fleet.ledger("site-a")) == [(RND, 1, "released"), (RND, 2, "released")]
    q = 16 / 125  # site-b: 125 training records
    assert float(reason_epsilon(refused["site-b"])) == pytest.approx(
        epsilon_for(noise_multiplier=1.1, sampling_rate=q, steps=6, delta=DELTA), rel=1e-3)


def reason_epsilon(reason: str) -> str:
    return reason.split("epsilon at this site to ")[1].split(" ")[0]


def test_max_epsilon_total_counts_every_job_in_the_sites_ledger(fleet, tmp_path: Path) -> None:
    """site-b's ledger already holds a released run of another job (ε 2.34 alone):
    with max_epsilon_total = 2.5 its run of this job (2.34 for the job, 2.99 over
    both) is withheld, uncharged; the other sites, whose ledgers hold nothing else,
    release theirs."""
    earlier = PrivacyLedger()
    earlier.record(job="old-job", round=1, mechanism=DP_SGD, noise_multiplier=1.1,
                   sampling_rate=16 / 125, steps=3)
    ledger_path(tmp_path / "site-b").parent.mkdir(parents=True)
    earlier.save(ledger_path(tmp_path / "site-b"))
    f = fleet(PrivacyPolicy(max_epsilon_total=2.5, min_cohort=2))

    async def round_():
        await f.train(SITES, "t1", plan=DP_PLAN)
        return await f.aggregate(SITES, "t1")

    asyncio.run(round_())
    refused = f.refusals()
    assert list(refused) == ["site-b"], refused
    assert "max_epsilon_total = 2.5" in refused["site-b"]
    assert "every job in its privacy ledger" in refused["site-b"]
    assert not masked_inputs(f, "site-b")
    ledger = fleet.ledger("site-b")
    assert [e["status"] for e in ledger.entries] == ["released", "pending"]
    assert ledger.epsilon(DELTA, job=JOB) == 0.0
    for site in ("site-a", "site-c"):
        assert runs(fleet.ledger(site)) == [(RND, 1, "released")]


def test_the_plans_own_noise_and_target_are_checked_before_training(fleet) -> None:
    """What the plan alone tells is refused before any training (the hospital's
    compute spared, nothing in its ledger): noise below min_noise_multiplier, a
    DP-SGD target_epsilon above a cap, a plan without DP noise under a cap."""
    target_50 = DP_PLAN.replace("cox_per_term = true", "cox_per_term = true, "
                                                       "target_epsilon = 50.0")
    no_dp = DP_PLAN.split("[privacy]")[0]
    for policy, plan, words in (
            (PrivacyPolicy(min_noise_multiplier=1.5), DP_PLAN,
             ("privacy.dp.noise_multiplier 1.1", "min_noise_multiplier = 1.5")),
            (PrivacyPolicy(min_noise_multiplier=1.5), TINY_FEDAVG,
             ("privacy.client_dp.noise_multiplier 1e-09", "min_noise_multiplier = 1.5")),
            (PrivacyPolicy(max_epsilon=10.0), target_50,
             ("privacy.dp.target_epsilon", "50", "max_epsilon = 10")),
            (PrivacyPolicy(max_epsilon_total=10.0), target_50,
             ("privacy.dp.target_epsilon", "max_epsilon_total = 10")),
            (PrivacyPolicy(max_epsilon=10.0), no_dp, ("max_epsilon = 10", "no DP noise"))):
        f = fleet(policy)
        asyncio.run(f.train(["site-a"], "t1", plan=plan))
        reason = f.refusals().get("site-a", "")
        assert all(w in reason for w in words), (policy, reason)
        assert not [b for _, b in f.inbox if isinstance(b, m.TrainDone)]
        assert fleet.ledger("site-a").entries == []
    # the plan's noise at the floor, a target within the cap: trained
    f = fleet(PrivacyPolicy(min_noise_multiplier=1.1, max_epsilon=60.0, require_dp=True))
    asyncio.run(f.train(["site-a"], "t1", plan=target_50))
    assert [b for _, b in f.inbox if isinstance(b, m.TrainDone)], f.refusals()


def test_agent_toml_privacy_floor_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[privacy]\nrequire_dp = true\nmin_noise_multiplier = 1\n"
                   "max_epsilon = 8\nmax_epsilon_total = 20.0\nbudget_delta = 1e-6\n")
    policy = load_config(cfg).policy
    assert policy == PrivacyPolicy(require_dp=True, min_noise_multiplier=1.0, max_epsilon=8.0,
                                   max_epsilon_total=20.0, budget_delta=1e-6)
    assert isinstance(policy.max_epsilon, float) and policy.checks_release
    default = PrivacyPolicy()
    assert (default.min_noise_multiplier, default.max_epsilon, default.max_epsilon_total,
            default.budget_delta) == (0.0, None, None, 1e-5)
    assert not default.checks_release
    for bad, why in (("min_noise_multiplier = -0.5", "min_noise_multiplier = -0.5 must be"),
                     ("min_noise_multiplier = true", "min_noise_multiplier = True must be"),
                     ("max_epsilon = 0", "max_epsilon = 0 must be a number > 0"),
                     ("max_epsilon = inf", "max_epsilon = inf must be"),
                     ("max_epsilon_total = 'ten'", "max_epsilon_total = 'ten' must be"),
                     ("budget_delta = 1.0", r"budget_delta = 1.0 must be a number in \(0, 1\)"),
                     ("budget_delta = 0", "budget_delta = 0 must be")):
        cfg.write_text(f"[privacy]\n{bad}\n")
        with pytest.raises(AgentConfigError, match=why):
            load_config(cfg)
    with pytest.raises(PrivacyPolicyError, match="max_epsilon = nan"):
        PrivacyPolicy(max_epsilon=math.nan)
