"""The ε caps at their boundary: a budget spent at exactly the cap is spent (the task is
refused before it trains, and the site is not eligible), and a plan whose own ε lies
just above a cap is refused up front, not trained and then withheld at release.

Kills mutations M34 (``job_epsilon >= max_epsilon`` relaxed to ``>`` in
`refuse_spent`), M35 (``total_epsilon < cap`` relaxed to ``<=`` in `budget_spent`)
and M39 (the plan-level check given ``cap + 1`` of slack)."""

from __future__ import annotations

import pytest

from fedge.agent.guard import PrivacyPolicy

CAP = 4.0


def dp_sgd_plan(target_epsilon: float) -> dict[str, object]:
    """A DP-SGD [privacy] table whose target ε is measured at the policy's δ."""
    return {"dp": {"noise_multiplier": 1.1, "max_grad_norm": 1.0,
                   "target_epsilon": target_epsilon, "delta": 1e-5}}


def test_a_jobs_epsilon_at_exactly_max_epsilon_is_spent_and_refuses_its_task() -> None:
    policy = PrivacyPolicy(max_epsilon=CAP)
    refused = policy.refuse_spent(job="brca", job_epsilon=CAP)
    assert refused is not None
    assert refused.startswith("privacy budget spent: job 'brca'")
    assert "at or above" in refused and "max_epsilon = 4" in refused
    assert refused.endswith("not training")
    # a hair below the cap the job may still train
    assert policy.refuse_spent(job="brca", job_epsilon=CAP * (1 - 1e-9)) is None


def test_a_ledger_at_exactly_max_epsilon_total_is_spent_and_the_site_not_eligible() -> None:
    policy = PrivacyPolicy(max_epsilon_total=CAP)
    spent = policy.budget_spent(CAP)
    assert spent.startswith("privacy budget spent: epsilon 4 >= max_epsilon_total 4")
    refused = policy.refuse_spent(job="brca", job_epsilon=0.5, total_epsilon=CAP)
    assert refused == f"{spent}; not training"
    # a hair below the cap the site is still eligible
    assert policy.budget_spent(CAP * (1 - 1e-9)) == ""
    assert policy.refuse_spent(job="brca", job_epsilon=0.5,
                               total_epsilon=CAP * (1 - 1e-9)) is None


@pytest.mark.parametrize("cap_name", ["max_epsilon", "max_epsilon_total"])
def test_a_plan_whose_target_is_just_above_a_cap_is_refused_before_training(
    cap_name: str,
) -> None:
    policy = PrivacyPolicy(**{cap_name: CAP})
    refused = policy.refuse_plan(True, dp_sgd_plan(CAP * 1.01), rounds=3)
    assert refused is not None
    assert "privacy.dp.target_epsilon" in refused
    assert f"above this appliance's [privacy] {cap_name} = 4" in refused
    # a target at the cap itself may be spent in full
    assert policy.refuse_plan(True, dp_sgd_plan(CAP), rounds=3) is None
