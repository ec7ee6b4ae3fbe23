"""In a fleet being upgraded, the submit-time check of a plan's model against the
declared data is not decided by the upgraded sites alone: agents before
DatasetClasses.tasks/input_shapes hold the data set and declare nothing, so a plan
that every site that declared would refuse is taken with a warning naming those sites
and the silent ones, and refused only when every holder declared. Before, one upgraded
site's word refused the plan (upgrade review 13, LOW 5). Real coordinator (SQLite),
real agents and wire messages, as in test_submit_checks_declared_data.py."""

from __future__ import annotations

import asyncio

import pytest

from fedge.agent.trainer import SyntheticTrainer, TorchTrainer
from fedge.coordinator.service import CoordinatorError

SITES = ["hospital-0", "hospital-1", "hospital-2"]

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 2
[model]
name = "cox_linear"
params = { in_features = 38 }
[train]
steps = 10
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
"""

BRCA = {"name": "fed_tcga_brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca",
        "site": 2}  # FLamby's 39 features


def _fleet(federation, upgraded: list[str]):  # type: ignore[no-untyped-def]
    """``upgraded`` sites declare BRCA's task and 39 features; the others hold the
    data set and declare nothing (an agent before these declarations)."""
    fed = federation(SITES)
    for site in SITES:
        fed.agents[site].trainer = (TorchTrainer([BRCA]) if site in upgraded else
                                    SyntheticTrainer(site, dataset="fed_tcga_brca"))

    async def go() -> None:
        await fed.heartbeats()
        await fed.pump(until=lambda: not fed.inbox and all(
            s in fed.coord.conns and fed.coord.conns[s].datasets is not None for s in SITES))
    asyncio.run(go())
    return fed


def test_one_upgraded_site_that_would_refuse_warns_naming_it_and_the_silent_holders(
        federation):
    fed = _fleet(federation, ["hospital-2"])
    warnings: list[str] = []
    fed.coord.submit_job(PLAN, actor="test", warnings=warnings)
    assert len(fed.coord.list_jobs()) == 1
    (warning,) = [w for w in warnings if "model.params.in_features = 38" in w]
    assert "39 features at hospital-2" in warning
    assert "Those sites will refuse its tasks" in warning
    assert "2 site(s) holding it did not say (hospital-0, hospital-1" in warning
    assert "it runs only if they fit it" in warning, warning


def test_a_task_misfit_at_upgraded_sites_is_a_warning_while_a_holder_is_silent(federation):
    fed = _fleet(federation, ["hospital-1", "hospital-2"])
    warnings: list[str] = []
    plan = PLAN.replace('name = "cox_linear"\nparams = { in_features = 38 }',
                        'name = "logistic"\nparams = { in_features = 39 }')
    fed.coord.submit_job(plan, actor="test", warnings=warnings)
    assert any("plan field model.name = 'logistic'" in w
               and "a survival task at hospital-1, hospital-2" in w
               and "did not say (hospital-0" in w for w in warnings), warnings


def test_when_every_holder_declared_and_would_refuse_the_plan_is_still_refused(federation):
    fed = _fleet(federation, SITES)
    with pytest.raises(CoordinatorError) as info:
        fed.coord.submit_job(PLAN, actor="test")
    assert str(info.value).startswith("plan field model.params.in_features = 38: ")
    assert "Every site holding it would refuse the job. Nothing was submitted" \
        in str(info.value)
    assert fed.coord.list_jobs() == []
