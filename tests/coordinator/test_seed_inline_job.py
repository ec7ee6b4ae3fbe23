"""A plan that names no seed gets a fresh one written into its job table at
submission, whichever way the TOML writes that table: a [job] header, an inline
``job = { ... }`` table, or dotted ``job.*`` keys. (Before, only a [job] header got
one, and every other plan ran with seed 0, sharing it with every such job.)"""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.plan import parse_plan
from fedge.coordinator.service import Coordinator

REST = """
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 10
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
"""

LAYOUTS = {
    "header": '[job]\ndataset = "fed_tcga_brca"\nrounds = 2\nmin_clients = 2\n' + REST,
    "quoted header": '[ "job" ]  # the job\ndataset = "fed_tcga_brca"\nrounds = 2\n' + REST,
    "inline": 'job = { name = "inline", dataset = "fed_tcga_brca", rounds = 2, '
              'min_clients = 2 }\n' + REST,
    "inline, quoted key": '"job"={dataset="fed_tcga_brca",rounds=2}\n' + REST,
    "dotted": 'job.dataset = "fed_tcga_brca"\njob.rounds = 2\n' + REST,
    "dotted after a comment": '# a plan\n\njob.dataset = "fed_tcga_brca"\n'
                              'job.rounds = 2\n' + REST,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_job_gets_a_seed_of_its_own(tmp_path, layout):
    text = LAYOUTS[layout]
    assert parse_plan(text).seed == 0  # none named
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(40, np.float32))
    try:
        ids = [coord.submit_job(text, actor="test") for _ in range(3)]
        stored = [parse_plan(coord.store.job(j).plan_toml) for j in ids]
    finally:
        coord.close()
    seeds = [p.seed for p in stored]
    assert len(set(seeds)) == 3 and 0 not in seeds  # 3 draws below 2**31 do not meet
    original = parse_plan(text)
    for plan in stored:  # the seed is all that changed
        assert (plan.dataset, plan.rounds, plan.min_clients, plan.name) == \
            (original.dataset, original.rounds, original.min_clients, original.name)
        assert "chosen at submission" in plan.text or layout.startswith("inline")


def test_a_plan_that_names_its_seed_is_stored_as_written(tmp_path):
    text = 'job = { dataset = "fed_tcga_brca", rounds = 2, seed = 7 }\n' + REST
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(40, np.float32))
    try:
        job = coord.submit_job(text, actor="test")
        assert coord.store.job(job).plan_toml == text
    finally:
        coord.close()
