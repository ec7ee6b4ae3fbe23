"""A model left without a parameter it has no default for is refused naming it
(review s16 plan-matrix LOW 6)."""

from __future__ import annotations

import pytest

from fedge.coordinator.plan import (
    PlanError,
    check_required_model_params,
    parse_plan,
)
from tests.coordinator.test_s16_plan_momentum import _plan


@pytest.mark.parametrize("model", ["linear", "logistic", "mlp", "cox_linear", "cox_mlp"])
def test_a_tabular_model_without_in_features_is_refused_naming_it(model: str) -> None:
    plan = parse_plan(_plan(model=model, params="", train="learning_rate = 0.01"))
    with pytest.raises(PlanError) as err:
        check_required_model_params(plan)
    assert err.value.field == "model.params.in_features"
    assert str(err.value) == (
        f"plan field model.params.in_features = None: required by model {model!r}, which "
        "has no default for it (the number of feature columns of the data set at each "
        "site); give it in model.params (must be an integer >= 1)")


def test_a_model_with_its_required_parameters_or_none_required_passes() -> None:
    check_required_model_params(parse_plan(_plan(train="learning_rate = 0.01")))
    check_required_model_params(parse_plan(_plan(model="resnet_small", params="",
                                                 train="learning_rate = 0.01")))
