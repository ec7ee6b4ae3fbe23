"""A plan the sites would refuse is refused at submit, and nothing is stored."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.plan import PlanError
from fedge.coordinator.service import Coordinator

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 3
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 10
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[privacy]
client_dp = { clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 3 }
"""


@pytest.mark.parametrize(("old", "new", "field"), [
    ('name = "cox_linear"', 'name = "cox_linearr"', "model.name"),
    ("noise_multiplier = 0.5", "noise = 0.5", "privacy.client_dp.noise"),
    ("noise_multiplier = 0.5", "noise_multiplier = -0.5", "privacy.client_dp.noise_multiplier"),
    ("client_dp = { clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 3 }",
     "dp = { noise_multiplier = 1.1, max_grad_nrm = 1.0 }", "privacy.dp.max_grad_nrm"),
    # what a DP plan releases stays inside its ε (tests/coordinator/test_plan_dp_release.py)
    ("noise_multiplier = 0.5", "noise_multiplier = 0.0", "privacy.client_dp.noise_multiplier"),
    ("min_clients = 3", 'min_clients = 3\neval_split = "train"', "job.eval_split"),
    ("[privacy]", "[secagg]\nenabled = false\n[privacy]", "secagg.enabled"),
    ("[privacy]", "[secagg]\nclip = 0.5\n[privacy]", "secagg.clip"),
    ("client_dp = { clip_norm = 0.5, noise_multiplier = 0.5, cohort_size = 3 }",
     "dp = { noise_multiplier = 1.1, delta = 0.1, cox_per_term = true }\n"
     "min_site_examples = 40", "privacy.dp.delta"),
])
def test_a_plan_the_sites_would_refuse_gets_no_job_id(tmp_path, old, new, field):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(40, np.float32))
    try:
        assert old in PLAN
        with pytest.raises(PlanError) as info:
            coord.submit_job(PLAN.replace(old, new), actor="test")
        assert info.value.field == field
        assert coord.list_jobs() == []
        coord.submit_job(PLAN, actor="test")  # the plan it came from is taken
        assert len(coord.list_jobs()) == 1
    finally:
        coord.close()
