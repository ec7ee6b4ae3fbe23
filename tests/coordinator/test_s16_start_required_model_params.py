"""A model left without a parameter it has no default for is refused at submit where
the coordinator will build the job's starting model from the plan (plan-matrix review
s16 LOW 6): `logistic` without in_features was queued, then failed about 3 s later
when its starting model was built, the engineer seeing it only in the job's status.
Through Coordinator.submit_job (the console's path) with the coordinator's own model
builder, and `fedge coordinator submit` (the real CLI, a subprocess, on a real
database); a coordinator given its starting weights never builds the model, and its
plans may still leave the widths out."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.plan import PlanError
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store
from tests.coordinator.test_damaged_database import coordinator_config, fedge

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
[model]
name = "logistic"
params = {{ {params} }}
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
"""

REFUSAL = ("plan field model.params.in_features = None: required by model 'logistic', "
           "which has no default for it (the number of feature columns of the data set "
           "at each site); give it in model.params (must be an integer >= 1)")


def test_the_console_path_refuses_it_where_the_coordinator_builds_the_model(tmp_path):
    coord = Coordinator(tmp_path / "coord")  # torch_initial_weights, as in production
    try:
        with pytest.raises(PlanError) as err:
            coord.submit_job(PLAN.format(params="classes = 2"), actor="test")
        assert str(err.value) == REFUSAL
        assert coord.list_jobs() == []
        coord.submit_job(PLAN.format(params="in_features = 4, classes = 2"), actor="test")
        assert len(coord.list_jobs()) == 1
    finally:
        coord.close()


def test_a_coordinator_given_its_starting_weights_takes_the_plan_as_before(tmp_path):
    coord = Coordinator(tmp_path / "coord",
                        initial_weights=lambda plan: np.zeros(8, np.float32))
    try:
        coord.submit_job(PLAN.format(params="classes = 2"), actor="test")
        assert len(coord.list_jobs()) == 1
    finally:
        coord.close()


def test_the_direct_cli_refuses_it_and_stores_nothing(tmp_path):
    cfg, state = coordinator_config(tmp_path)  # holds job-1
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.format(params="classes = 2"))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip() == f"fedge coordinator submit: {REFUSAL}"
    store = Store(state)
    try:
        assert [j.job_id for j in store.jobs()] == ["job-1"]
    finally:
        store.close()
