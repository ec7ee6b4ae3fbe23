"""Plans the sites would refuse for their data are refused at submission, through the
real coordinator (SQLite) and real agents (their agent.toml [[datasets]] tables in a
TorchTrainer) exchanging real wire messages: each agent declares its data sets' task
and input shape before its heartbeats (DatasetClasses), and the coordinator checks
the plan's model, job.classes and client_dp.cohort_size against them, naming the
field, the plan's value and the sites' values. Before, these plans got a job id and
failed after queueing (the mljob review, MEDIUM 1)."""

from __future__ import annotations

import asyncio

import pytest

from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.plan import PlanError
from fedge.coordinator.service import CoordinatorError, submission_warnings

SITES = ["hospital-0", "hospital-1", "hospital-2"]

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 2
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

CLIENT_DP = ("[privacy]\n"
             "client_dp = { clip_norm = 0.1, noise_multiplier = 0.5, cohort_size = {k} }\n")


def _brca(site: int, **extra) -> dict:
    return {"name": "fed_tcga_brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca",
            "site": site, **extra}


def _table(n_features: int, task: str = "binary") -> dict:
    return {"name": "fed_tcga_brca", "kind": "tabular", "path": "/nonexistent/t.csv",
            "task": task, "target": "y", "features": [f"f{j}" for j in range(n_features)]}


def _declared(federation, tables: dict[str, dict]):  # type: ignore[no-untyped-def]
    """A federation whose agents hold ``tables`` and have each sent a heartbeat."""
    fed = federation(SITES)
    for site, table in tables.items():
        fed.agents[site].trainer = TorchTrainer([table])

    async def go() -> None:
        await fed.heartbeats()
        await fed.pump(until=lambda: not fed.inbox and all(
            s in fed.coord.conns and fed.coord.conns[s].datasets is not None for s in SITES))
    asyncio.run(go())
    return fed


@pytest.fixture
def brca(federation):  # type: ignore[no-untyped-def]
    return _declared(federation, {s: _brca(i) for i, s in enumerate(SITES)})


@pytest.mark.parametrize(("old", "new", "field", "words"), [
    ("in_features = 39", "in_features = 38", "model.params.in_features",
     ["= 38", "39 features at hospital-0, hospital-1, hospital-2"]),
    ('name = "cox_linear"\nparams = { in_features = 39 }',
     'name = "logistic"\nparams = { in_features = 39 }', "model.name",
     ["'logistic'", "a survival task at hospital-0, hospital-1, hospital-2"]),
    ('name = "cox_linear"\nparams = { in_features = 39 }',
     'name = "resnet_small"', "model.name",
     ["'resnet_small'", "a survival task at hospital-0"]),
    ('name = "cox_linear"\nparams = { in_features = 39 }',
     'name = "mlp"\nparams = { in_features = 39 }\n', "job.classes",
     ["['a', 'b']", "a survival task at hospital-0"]),
])
def test_a_model_no_site_can_train_gets_no_job_id(brca, old, new, field, words):
    plan = PLAN.replace(old, new)
    if field == "job.classes":
        plan = plan.replace("min_clients = 2", 'min_clients = 2\nclasses = ["a", "b"]')
    with pytest.raises(CoordinatorError) as info:
        brca.coord.submit_job(plan, actor="test")
    text = str(info.value)
    assert text.startswith(f"plan field {field} = "), text
    for word in words:
        assert word in text, text
    assert "Nothing was submitted" in text
    assert brca.coord.list_jobs() == []
    brca.coord.submit_job(PLAN, actor="test")  # the plan it came from is taken
    assert len(brca.coord.list_jobs()) == 1


def test_job_classes_with_a_cox_model_is_refused_without_asking_the_sites(brca):
    plan = PLAN.replace("min_clients = 2", 'min_clients = 2\nclasses = ["a", "b"]')
    with pytest.raises(PlanError) as info:
        brca.coord.submit_job(plan, actor="test")
    assert info.value.field == "job.classes"
    assert brca.coord.list_jobs() == []


def test_a_client_dp_cohort_larger_than_the_federation_gets_no_job_id(brca):
    plan = PLAN + CLIENT_DP.replace("{k}", "10") + "[secagg]\nclip = 1.0\n"
    with pytest.raises(CoordinatorError) as info:
        brca.coord.submit_job(plan, actor="test")
    text = str(info.value)
    assert text.startswith("plan field privacy.client_dp.cohort_size = 10: "), text
    assert "3 enrolled site(s)" in text and "cohort_size <= 3," in text
    assert brca.coord.list_jobs() == []
    brca.coord.submit_job(PLAN + CLIENT_DP.replace("{k}", "3") + "[secagg]\nclip = 1.0\n",
                          actor="test")
    assert len(brca.coord.list_jobs()) == 1


def test_the_direct_cli_path_refuses_the_cohort_from_the_enrolled_count(brca):
    """fedge coordinator submit checks from the database: no declared inputs there,
    but the enrolled sites bound the cohort all the same."""
    from fedge.coordinator.plan import parse_plan

    plan = parse_plan(PLAN + CLIENT_DP.replace("{k}", "4") + "[secagg]\nclip = 1.0\n")
    with pytest.raises(CoordinatorError, match="cohort_size = 4"):
        submission_warnings(brca.coord.store, plan, {})


def test_sites_that_disagree_are_named_in_a_warning_and_the_job_is_queued(federation):
    fed = _declared(federation, {"hospital-0": _table(39), "hospital-1": _table(39),
                                 "hospital-2": _table(38)})
    plan = PLAN.replace('name = "cox_linear"', 'name = "logistic"')
    warnings: list[str] = []
    fed.coord.submit_job(plan, actor="test", warnings=warnings)
    assert len(fed.coord.list_jobs()) == 1
    assert any("model.params.in_features = 39" in w and "38 features at hospital-2" in w
               and "Those sites will refuse" in w for w in warnings), warnings


def test_a_regression_target_refuses_a_classifier_and_image_sizes_are_checked(federation):
    fed = _declared(federation, {s: _table(39, task="regression") for s in SITES})
    with pytest.raises(CoordinatorError, match="a regression task"):
        fed.coord.submit_job(PLAN.replace('name = "cox_linear"', 'name = "logistic"'),
                             actor="test")
    fed.coord.submit_job(PLAN.replace('name = "cox_linear"', 'name = "linear"'), actor="test")

    images = {"name": "fed_tcga_brca", "kind": "images", "path": "/nonexistent/img",
              "task": "binary", "classes": ["benign", "malignant"], "image_size": 32}
    fed = _declared(federation, {s: images for s in SITES})
    resnet = PLAN.replace('name = "cox_linear"\nparams = { in_features = 39 }',
                          'name = "resnet_small"')
    with pytest.raises(CoordinatorError) as info:
        fed.coord.submit_job(resnet, actor="test")
    assert str(info.value).startswith("plan field model.params.image_size = 64: ")
    assert "1-channel 32x32 images at hospital-0" in str(info.value)
    fed.coord.submit_job(resnet.replace('"resnet_small"',
                                        '"resnet_small"\nparams = { image_size = 32 }'),
                         actor="test")
