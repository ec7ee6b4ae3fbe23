"""A model whose number of outputs no site holding the data set accepts is refused at
submit, naming the field (review s16 progress L2): an MLP with out_features = 2 on a
binary data set passed submit, then every site refused every attempt with the same
error (fedge.train.api._check_classes: a binary model has one logit) and the job
failed after its retries and backoff, the jobs behind it waiting. Same refuse-or-warn
rule as the other model-fit checks. Real coordinator (SQLite) and real agents
declaring their data sets (TorchTrainer tables), in memory."""

from __future__ import annotations

import pytest

from fedge.coordinator.service import CoordinatorError
from tests.coordinator.test_submit_checks_declared_data import SITES, _declared, _table

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2
[model]
name = "{model}"
params = {{ in_features = 5, {params} }}
[train]
steps = 1
batch_size = 4
learning_rate = 0.05
[strategy]
name = "fedavg"
"""


def test_two_outputs_on_binary_data_everywhere_gets_no_job_id(federation):
    fed = _declared(federation, {s: _table(5, "binary") for s in SITES})
    with pytest.raises(CoordinatorError) as err:
        fed.coord.submit_job(PLAN.format(model="mlp", params="out_features = 2"),
                             actor="test")
    text = str(err.value)
    assert text.startswith("plan field model.params.out_features = 2: data set "
                           "'fed_tcga_brca' is a binary task at hospital-0, hospital-1, "
                           "hospital-2"), text
    assert "a binary model has one logit (out_features = 1)" in text
    assert text.endswith("Every site holding it would refuse the job. Nothing was submitted")
    assert fed.coord.list_jobs() == []
    fed.coord.submit_job(PLAN.format(model="mlp", params="out_features = 1"), actor="test")
    fed.coord.submit_job(PLAN.format(model="logistic", params="classes = 2"), actor="test")
    assert len(fed.coord.list_jobs()) == 2


def test_one_logit_on_multiclass_data_everywhere_gets_no_job_id(federation):
    fed = _declared(federation, {s: _table(5, "multiclass") for s in SITES})
    with pytest.raises(CoordinatorError, match=r"^plan field model\.params\.out_features "
                       r"= 1: data set 'fed_tcga_brca' is a multiclass task"):
        fed.coord.submit_job(PLAN.format(model="mlp", params="out_features = 1"),
                             actor="test")
    with pytest.raises(CoordinatorError, match=r"^plan field model\.params\.classes = 2: "):
        fed.coord.submit_job(PLAN.format(model="logistic", params="classes = 2"),
                             actor="test")
    fed.coord.submit_job(PLAN.format(model="mlp", params="out_features = 3"), actor="test")
    assert len(fed.coord.list_jobs()) == 1


def test_sites_that_differ_are_named_in_a_warning_and_the_job_is_queued(federation):
    fed = _declared(federation, {"hospital-0": _table(5, "binary"),
                                 "hospital-1": _table(5, "multiclass"),
                                 "hospital-2": _table(5, "multiclass")})
    warnings: list[str] = []
    fed.coord.submit_job(PLAN.format(model="mlp", params="out_features = 2"),
                         actor="test", warnings=warnings)
    assert len(fed.coord.list_jobs()) == 1
    assert any(w.startswith("plan field model.params.out_features = 2: data set "
                            "'fed_tcga_brca' is a binary task at hospital-0 ")
               and "Those sites will refuse its tasks" in w for w in warnings), warnings
