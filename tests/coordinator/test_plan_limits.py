"""Plans whose size would hurt the federation are refused at submission, naming the
field, the value and the limit, and nothing is stored: a model too large for the
coordinator and the sites to hold and send (a typo in model.params.hidden)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedge.coordinator.plan import (
    MODEL_PARAMS_MAX,
    ROUNDS_MAX,
    PlanError,
    check_submission,
    model_parameter_count,
)
from fedge.coordinator.service import Coordinator
from fedge.train.models import ModelSpec, build_model

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 2
[model]
name = "cox_mlp"
params = { in_features = 39, hidden = [32] }
[train]
steps = 10
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
"""


@pytest.mark.parametrize(("name", "params"), [
    ("linear", {"in_features": 7, "out_features": 3}),
    ("logistic", {"in_features": 7}),
    ("logistic", {"in_features": 7, "classes": 5}),
    ("mlp", {"in_features": 7, "hidden": [5, 4], "out_features": 2}),
    ("mlp", {"in_features": 7}),
    ("cox_linear", {"in_features": 39}),
    ("cox_mlp", {"in_features": 39, "hidden": [32, 8], "dropout": 0.1}),
    ("resnet_small", {}),
    ("resnet_small", {"width": 12, "classes": 5, "in_channels": 3, "image_size": 32}),
])
def test_the_count_is_what_the_built_model_holds(name, params):
    built = build_model(ModelSpec(name, params))
    assert model_parameter_count(name, params) == sum(p.numel() for p in built.parameters())


def test_the_largest_model_in_the_examples_is_far_below_the_limit():
    assert model_parameter_count("resnet_small", {"width": 16}) < MODEL_PARAMS_MAX / 100


def test_a_model_of_ten_billion_parameters_gets_no_job_id(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(1, np.float32))
    huge = PLAN.replace("hidden = [32]", "hidden = [100000, 100000]")
    try:
        with pytest.raises(PlanError) as info:
            coord.submit_job(huge, actor="test")
        assert info.value.field == "model.params.hidden"
        assert info.value.value == [100000, 100000]
        assert "10,004,200,001 parameters" in str(info.value)
        assert f"{MODEL_PARAMS_MAX:,}" in str(info.value)
        assert coord.list_jobs() == []
        coord.submit_job(PLAN, actor="test")  # the plan it came from is taken
        assert len(coord.list_jobs()) == 1
    finally:
        coord.close()


def test_a_huge_input_layer_names_in_features():
    with pytest.raises(PlanError) as info:
        check_submission(PLAN.replace('"cox_mlp"', '"cox_linear"')
                         .replace(", hidden = [32]", "").replace("= 39", "= 60000000"))
    assert info.value.field == "model.params.in_features"
    assert "60,000,001 parameters" in str(info.value)


def test_a_job_of_a_hundred_billion_rounds_gets_no_job_id(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(1, np.float32))
    try:
        with pytest.raises(PlanError) as info:
            coord.submit_job(PLAN.replace("rounds = 2", "rounds = 100000000000"), actor="test")
        assert info.value.field == "job.rounds"
        assert info.value.value == 100000000000
        assert f"must be <= {ROUNDS_MAX}" in str(info.value)
        assert coord.list_jobs() == []
        coord.submit_job(PLAN.replace("rounds = 2", f"rounds = {ROUNDS_MAX}"), actor="test")
        assert len(coord.list_jobs()) == 1
    finally:
        coord.close()


def test_huge_rounds_under_dp_are_refused_before_the_accountant_runs():
    dp = PLAN.replace("rounds = 2", "rounds = 100000000000") + (
        "[privacy]\nmin_site_examples = 100\n"
        "dp = { noise_multiplier = 1.1, delta = 1e-5, target_epsilon = 8.0, "
        "cox_per_term = true }\n")
    started = time.monotonic()
    with pytest.raises(PlanError) as info:
        check_submission(dp)
    assert info.value.field == "job.rounds"
    assert time.monotonic() - started < 5.0
