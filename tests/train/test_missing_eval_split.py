"""A plan evaluating on a split a site does not hold is refused by that site, saying how
to provide it (the agent sends the reason to the coordinator's audit trail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.coordinator.plan import parse_plan

PLAN = """
[job]
dataset = "tcga"
rounds = 1
eval_split = "val"
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 1
batch_size = 8
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def _trainer(tcga_dir: Path, val_fraction: float) -> TorchTrainer:
    table = {
        "name": "tcga",
        "kind": "fed_tcga_brca",
        "path": str(tcga_dir),
        "site": 5,
        "val_fraction": val_fraction,
    }
    return TorchTrainer([table])


def test_val_split_absent_is_refused_with_the_fix(tcga_dir: Path) -> None:
    plan = parse_plan(PLAN)
    w = np.zeros(40, np.float32)
    with pytest.raises(
        TaskRefusal,
        match=r"has no 'val' split \(hold one out with the data "
        r"set's val_fraction > 0",
    ):
        _trainer(tcga_dir, 0.0).evaluate(plan, w, plan.eval_split)
    n, metrics = _trainer(tcga_dir, 0.2).evaluate(plan, w, plan.eval_split)
    assert n == 8  # 20% of centre 5's 40 training rows
    # they hold no event: a Cox loss (or C-index) is left out, not reported as 0.0
    assert set(metrics) <= {"loss", "c_index"}
