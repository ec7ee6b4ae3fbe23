"""DP-SGD on a Cox model runs only when the plan accepts an ε per loss term.

A Cox record sits in the risk-set denominators of the other events in its batch, so
removing it moves the clipped gradient sum by up to ~(2b-1)·max_grad_norm, not
max_grad_norm: the accountant's ε is not a record-level bound there.
"""

from __future__ import annotations

import pytest

from fedge.coordinator.plan import PlanError, check_submission, parse_plan

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 3
[model]
name = "{model}"
params = {{ in_features = 39 }}
[train]
epochs = 1
batch_size = 32
learning_rate = 0.01
[strategy]
name = "fedavg"
[privacy]
dp = {{ noise_multiplier = 1.1{extra} }}
"""


@pytest.mark.parametrize("model", ["cox_linear", "cox_mlp"])
@pytest.mark.parametrize("extra", ["", ", cox_per_term = false"])
def test_dp_sgd_on_a_cox_model_without_consent_is_refused_saying_why(model: str,
                                                                     extra: str) -> None:
    with pytest.raises(PlanError) as info:
        check_submission(PLAN.format(model=model, extra=extra))
    err = info.value
    assert err.field == "privacy.dp.cox_per_term" and err.value is False
    assert f"model {model!r} is a Cox model" in err.rule
    assert "(2b - 1) x max_grad_norm" in err.rule
    assert "not a record-level bound" in err.rule
    assert "privacy.dp.cox_per_term = true" in err.rule


def test_dp_sgd_on_a_cox_model_with_consent_is_accepted_and_reaches_the_sites() -> None:
    from fedge.agent.trainer import train_config_dict
    from fedge.train.api import TrainConfig

    plan = parse_plan(PLAN.format(model="cox_linear", extra=", cox_per_term = true"))
    cfg = TrainConfig.from_dict(train_config_dict(plan, seed=1))
    assert cfg.dp is not None and cfg.dp.cox_per_term is True


def test_other_models_need_no_consent_and_the_flag_must_be_a_boolean() -> None:
    assert parse_plan(PLAN.format(model="logistic", extra="")).privacy["dp"] == {
        "noise_multiplier": 1.1}
    with pytest.raises(PlanError) as info:
        parse_plan(PLAN.format(model="cox_linear", extra=', cox_per_term = "yes"'))
    assert info.value.field == "privacy.dp.cox_per_term"
    assert "true or false" in info.value.rule


def test_a_cox_dp_job_stored_by_an_earlier_release_stays_readable_but_is_not_resubmitted(
    tmp_path,
) -> None:
    """The rule is for new jobs: a job queued or finished before it (its plan without
    cox_per_term) keeps its status readable; its sites refuse to train it, saying why."""
    from fedge.coordinator.service import Coordinator

    old = PLAN.format(model="cox_linear", extra="")
    assert parse_plan(old).privacy["dp"] == {"noise_multiplier": 1.1}
    coord = Coordinator(tmp_path / "coord")
    try:
        coord.store.create_job("job-old", old, actor="console")  # as the old release did
        assert coord.job_status("job-old")["rounds_planned"] == 3
        with pytest.raises(PlanError, match="cox_per_term"):
            coord.submit_job(old)
    finally:
        coord.close()
