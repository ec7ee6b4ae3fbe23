"""TorchTrainer: the real local training on Fed-TCGA-BRCA, refusals with reasons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer, train_config_dict
from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import train_seed

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"

PLAN = """
[job]
dataset = "brca"
rounds = 1
seed = 5
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 5
batch_size = 32
learning_rate = 0.05
[strategy]
name = "fedprox"
mu = 0.1
"""


@pytest.fixture(scope="module")
def trainer():
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    return TorchTrainer([{"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}])


def test_plan_maps_to_train_config():
    cfg = train_config_dict(parse_plan(PLAN), seed=9)
    assert cfg["lr"] == 0.05 and cfg["steps"] == 5 and cfg["prox_mu"] == 0.1
    assert cfg["seed"] == 9 and cfg["device"] == "cpu"


def test_local_training_is_deterministic_and_moves_the_model(trainer):
    plan = parse_plan(PLAN)
    w0 = np.zeros(40, np.float32)
    seed = train_seed(plan.seed, 1, "site-0")
    a = trainer.train("site-0", "j", plan, w0, round=1, seed=seed)
    b = trainer.train("site-0", "j", plan, w0, round=1, seed=seed)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.n_examples > 100 and not np.array_equal(a.weights, w0)
    n, metrics = trainer.evaluate(plan, a.weights, "test")
    assert n > 0 and 0.0 <= metrics["c_index"] <= 1.0


def test_missing_dataset_and_wrong_model_are_refused(trainer):
    plan = parse_plan(PLAN.replace('dataset = "brca"', 'dataset = "ixi"'))
    with pytest.raises(TaskRefusal, match="'ixi' is not held here"):
        trainer.train("s", "j", plan, np.zeros(40, np.float32), round=1, seed=0)
    plan = parse_plan(PLAN.replace('name = "cox_linear"', 'name = "no_such_model"'))
    with pytest.raises(TaskRefusal):
        trainer.train("s", "j", plan, np.zeros(40, np.float32), round=1, seed=0)


def test_bad_dataset_table_fails_at_startup():
    with pytest.raises(ValueError, match="kind"):
        TorchTrainer([{"name": "x", "kind": "nope", "path": "/nonexistent"}])
