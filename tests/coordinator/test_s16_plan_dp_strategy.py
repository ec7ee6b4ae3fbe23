"""A strategy name that asks for differential privacy is told that DP is set in the
[privacy] table (review s16 plan-matrix LOW 7)."""

from __future__ import annotations

import pytest

from fedge.coordinator.plan import (
    PlanError,
    parse_plan,
)
from tests.coordinator.test_s16_plan_momentum import _plan


@pytest.mark.parametrize("name", ["dp-fedavg", "DP-FedAvg", "dpfedavg", "dp_sgd", "dpsgd"])
def test_a_dp_strategy_name_is_told_where_dp_is_set(name: str) -> None:
    with pytest.raises(PlanError) as err:
        parse_plan(_plan(train="learning_rate = 0.01", strategy=name))
    assert err.value.field == "strategy.name"
    msg = str(err.value)
    assert msg.startswith(f"plan field strategy.name = {name!r}: must be one of fedavg, "
                          "fedavgm, fedprox, fedadam, fedyogi, fedadagrad, scaffold; ")
    assert "DP-FedAvg is privacy.client_dp = { clip_norm, noise_multiplier, cohort_size }" \
        in msg
    assert "DP-SGD is privacy.dp = " in msg


def test_another_unknown_strategy_gets_the_list_alone() -> None:
    with pytest.raises(PlanError) as err:
        parse_plan(_plan(train="learning_rate = 0.01", strategy="fedsgd"))
    assert str(err.value) == ("plan field strategy.name = 'fedsgd': must be one of fedavg, "
                              "fedavgm, fedprox, fedadam, fedyogi, fedadagrad, scaffold")
