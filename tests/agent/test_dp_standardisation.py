"""A DP-SGD task on a data set standardised with constants fitted on its own rows is
refused, naming the fix; with public bounds (standardise = "bounds") it trains.

Fitted constants (the default standardise = "continuous", or "all") make every
record's features depend on every other record, so the record-level ε DP-SGD reports
would not hold (tests/train/test_standardise_bounds.py). DP-FedAvg alone (a site's
whole data is the neighbour) and plans without DP are not affected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.coordinator.plan import parse_plan
from fedge.train.accounting import PrivacyLedger

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
BRCA = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}
# FLamby's Fed-TCGA-BRCA: age is its one continuous column, the rest one-hot 0/1
BOUNDED = {"standardise": "bounds", "feature_bounds": {"age_at_index": [0, 120]}}

PLAN = """
[job]
dataset = "brca"
rounds = 1
seed = 5
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 3
batch_size = 32
learning_rate = 0.05
[strategy]
name = "fedavg"
"""
DP = """[privacy]
[privacy.dp]
noise_multiplier = 1.5
max_grad_norm = 1.0
delta = 1e-5
cox_per_term = true
"""
CLIENT_DP = """[secagg]
enabled = true
[privacy]
client_dp = { clip_norm = 1.0, noise_multiplier = 1.0, cohort_size = 3 }
"""


@pytest.fixture(autouse=True)
def brca_data():
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")


@pytest.mark.parametrize("setting", [{}, {"standardise": "continuous"}, {"standardise": "all"}])
def test_dp_sgd_on_a_fitted_standardisation_is_refused_naming_the_fix(tmp_path, setting):
    trainer = TorchTrainer([{**BRCA, **setting}], state_dir=tmp_path)
    mode = setting.get("standardise", "continuous")
    with pytest.raises(TaskRefusal) as refused:
        trainer.train("site-0", "job", parse_plan(PLAN + DP), np.zeros(40, np.float32),
                      round=1, seed=1)
    why = str(refused.value)
    for part in ("data set 'brca'", f"datasets.standardise = {mode!r}", "privacy.dp",
                 "fitted on its own training rows", "epsilon would not hold",
                 'standardise = "bounds" with feature_bounds', 'standardise = "none"'):
        assert part in why, (part, why)
    # refused before training: nothing in the ledger
    assert PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").entries == []


def test_dp_sgd_on_public_bounds_trains_and_spends_epsilon(tmp_path):
    trainer = TorchTrainer([{**BRCA, **BOUNDED}], state_dir=tmp_path)
    out = trainer.train("site-0", "job", parse_plan(PLAN + DP), np.zeros(40, np.float32),
                        round=1, seed=1)
    assert out.epsilon > 0 and np.all(np.isfinite(out.weights))
    assert not np.array_equal(out.weights, np.zeros(40, np.float32))
    out.release_privacy()
    assert PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").epsilon(
        1e-5, job="job") == pytest.approx(out.epsilon)
    # serving prepends the same public map: age (x - 60) / 60, the 0/1 columns as they are
    mean, scale, names = trainer.standardisation("brca")
    assert names[0] == "age_at_index"
    np.testing.assert_array_equal(mean, np.float32([60] + [0] * 38))
    np.testing.assert_array_equal(scale, np.float32([60] + [1] * 38))


def test_none_trains_under_dp_sgd(tmp_path):
    trainer = TorchTrainer([{**BRCA, "standardise": "none"}], state_dir=tmp_path)
    out = trainer.train("site-0", "job", parse_plan(PLAN + DP), np.zeros(40, np.float32),
                        round=1, seed=1)
    assert out.epsilon > 0


def test_without_dp_sgd_the_fitted_default_still_trains_as_before(tmp_path):
    """No DP, or DP-FedAvg alone (its neighbour is a whole site's data, which a
    site's own constants do not break): the default is unchanged."""
    trainer = TorchTrainer([BRCA], state_dir=tmp_path)
    for plan in (PLAN, PLAN + CLIENT_DP):
        out = trainer.train("site-0", "job", parse_plan(plan), np.zeros(40, np.float32),
                            round=1, seed=1)
        assert np.all(np.isfinite(out.weights))
    n, metrics = trainer.evaluate(parse_plan(PLAN + DP), out.weights, "test")
    assert n > 0 and "c_index" in metrics  # evaluation is not covered by ε: not refused
