"""train.momentum is refused at submit unless optimizer = "sgd": the sites' Adam
ignores it (review s16 plan-matrix LOW 4)."""

from __future__ import annotations

import pytest

from fedge.coordinator.plan import (
    PlanError,
    check_submission,
    parse_plan,
    with_seed,
)

PLAN = """
[job]
dataset = "cls"
rounds = 2
seed = 1
[model]
name = "{model}"
params = {{ {params} }}
[train]
steps = 2
batch_size = 8
{train}
[strategy]
name = "{strategy}"
"""


def _plan(*, model: str = "logistic", params: str = "in_features = 4, classes = 2",
          train: str = "", strategy: str = "fedavg") -> str:
    return PLAN.format(model=model, params=params, train=train, strategy=strategy)


def test_momentum_with_adam_is_refused_naming_the_field_and_sgd() -> None:
    text = _plan(train='optimizer = "adam"\nlearning_rate = 0.01\nmomentum = 0.9')
    for submit in (check_submission, with_seed):
        with pytest.raises(PlanError) as err:
            submit(text)
        assert err.value.field == "train.momentum" and err.value.value == 0.9
        assert str(err.value) == (
            "plan field train.momentum = 0.9: applies to optimizer = \"sgd\" only: with "
            "train.optimizer = 'adam' it would be ignored (Adam's own momentum is its "
            "beta1 = 0.9, fixed). Leave train.momentum out, or use optimizer = \"sgd\"")


@pytest.mark.parametrize("train", [
    'optimizer = "adam"\nlearning_rate = 0.01',
    'optimizer = "adam"\nlearning_rate = 0.01\nmomentum = 0.0',
    'optimizer = "adam"\nlearning_rate = 0.01\nmomentum = 0',
    'optimizer = "sgd"\nlearning_rate = 0.01\nmomentum = 0.9',
    'learning_rate = 0.01\nmomentum = 0.9',  # sgd by default
])
def test_momentum_is_accepted_with_sgd_and_zero_or_absent_with_adam(train: str) -> None:
    check_submission(_plan(train=train))


def test_a_stored_adam_plan_with_momentum_still_parses() -> None:
    """A job queued before the rule stays readable: the rule is for new submissions."""
    plan = parse_plan(_plan(train='optimizer = "adam"\nlearning_rate = 0.01\nmomentum = 0.9'))
    assert plan.train.optimizer == "adam" and plan.train.momentum == 0.9
