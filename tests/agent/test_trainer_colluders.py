"""The agent's trainer sizes its DP-FedAvg noise share for the cohort less the sites
its policy assumes could collude (``[privacy] max_colluders``), and refuses a cohort
that leaves no honest site (tests/train/test_dp_fedavg_colluders.py has the sizing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.coordinator.plan import parse_plan

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
BRCA = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}

# z·S = 1: the update itself is clipped to 1e-3, so the weights sent are its noise
PLAN = """
[job]
dataset = "brca"
rounds = 1
seed = 5
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 1
batch_size = 32
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = true
clip = 10.0
[privacy]
client_dp = { clip_norm = 0.001, noise_multiplier = 1000.0, cohort_size = 3 }
"""


@pytest.fixture(autouse=True)
def brca_data():
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")


def share_sd(trainer: TorchTrainer, runs: int = 10) -> float:
    plan = parse_plan(PLAN)
    shares = [trainer.train("site-0", f"job-{k}", plan, np.zeros(40, np.float32), round=1,
                            seed=k).weights for k in range(runs)]
    return float(np.concatenate(shares).std())


def test_the_share_is_sized_for_the_sites_that_cannot_collude(tmp_path):
    # 400 draws: the sd is within 15 % of the true one at > 4 standard errors
    assert share_sd(TorchTrainer([BRCA], state_dir=tmp_path / "a")) == pytest.approx(
        1 / np.sqrt(3), rel=0.15)
    assert share_sd(TorchTrainer([BRCA], state_dir=tmp_path / "b", max_colluders=2)) == \
        pytest.approx(1.0, rel=0.15)


def test_a_cohort_no_larger_than_max_colluders_is_refused_before_training(tmp_path):
    trainer = TorchTrainer([BRCA], state_dir=tmp_path, max_colluders=3)
    with pytest.raises(TaskRefusal, match=(
            r"cohort_size = 3 leaves no honest site when 3 may collude \(this site's "
            r"\[privacy\] max_colluders = 3\)")):
        trainer.train("site-0", "job", parse_plan(PLAN), np.zeros(40, np.float32), round=1,
                      seed=1)
    assert not (tmp_path / "privacy" / "ledger.json").exists()
    with pytest.raises(ValueError, match="max_colluders=-1 must be an integer >= 0"):
        TorchTrainer([BRCA], max_colluders=-1)
