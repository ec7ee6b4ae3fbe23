"""A DP-SGD plan (privacy.dp) on a data set the sites standardise with constants
fitted on their own training rows (agent.toml datasets.standardise "continuous", the
default, or "all") is refused at submission when every site holding it does so, and
taken with a warning naming those sites when only some do; the words are the sites'
own refusal and its fix (plan-matrix review s16, MEDIUM 3: such a plan was queued,
then refused by every site in round 1). Each agent declares its data sets'
standardisation in DatasetClasses.standardise. Real coordinator (SQLite), real agents
(their agent.toml [[datasets]] tables in a TorchTrainer) and wire messages in memory;
the real `fedge coordinator submit` CLI on the same database."""

from __future__ import annotations

import asyncio

import pytest

from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.service import CoordinatorError
from tests.coordinator.test_damaged_database import fedge
from tests.coordinator.test_s16_submit_cli_model_checks import _config
from tests.coordinator.test_submit_checks_silent_sites import PLAN, SITES

DP_PLAN = PLAN.replace("in_features = 38", "in_features = 39") + (
    "[privacy]\n"
    "dp = { noise_multiplier = 1.0, max_grad_norm = 1.0, cox_per_term = true }\n")


def _brca(site: int, **extra) -> dict:
    return {"name": "fed_tcga_brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca",
            "site": site, **extra}


def _declared(federation, tables: dict[str, dict]):  # type: ignore[no-untyped-def]
    fed = federation(SITES)
    for site, table in tables.items():
        fed.agents[site].trainer = TorchTrainer([table])

    async def go() -> None:
        await fed.heartbeats()
        await fed.pump(until=lambda: not fed.inbox and all(
            s in fed.coord.conns and fed.coord.conns[s].datasets is not None for s in SITES))
    asyncio.run(go())
    return fed


def test_a_dp_sgd_plan_every_holder_would_refuse_for_fitted_standardisation_is_refused(
        federation, tmp_path):
    fed = _declared(federation, {s: _brca(i) for i, s in enumerate(SITES)})  # default
    with pytest.raises(CoordinatorError) as info:
        fed.coord.submit_job(DP_PLAN, actor="test")
    text = str(info.value)
    assert text.startswith(
        "plan field privacy.dp = {'cox_per_term': True, 'max_grad_norm': 1.0, "
        "'noise_multiplier': 1.0}: data set 'fed_tcga_brca' is standardised with constants "
        "fitted on each site's own training rows (datasets.standardise = 'continuous', "
        "the default) at hospital-0, hospital-1, hospital-2 (agent.toml [[datasets]]); "
        "under the plan's privacy.dp (DP-SGD), replacing one record would move every "
        "other record's features, so the record-level epsilon would not hold"), text
    assert 'standardise = "bounds" with feature_bounds = { column = [lo, hi], ... }' in text
    assert 'or standardise = "none"' in text
    assert text.endswith("Every site holding it would refuse the job. Nothing was "
                         "submitted")
    assert fed.coord.list_jobs() == []

    # the direct CLI, from what the coordinator recorded: the same refusal
    fed.coord.store.flush_heartbeats(force=True)
    plan = tmp_path / "plan.toml"
    plan.write_text(DP_PLAN)
    out = fedge("coordinator", "submit", "--config", str(_config(tmp_path,
                                                                 fed.coord.state_dir)),
                str(plan))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.splitlines() == [f"fedge coordinator submit: {text}"]

    # without privacy.dp, or with DP-FedAvg alone, nothing is said of it
    warnings: list[str] = []
    fed.coord.submit_job(DP_PLAN.split("[privacy]")[0], actor="test", warnings=warnings)
    assert warnings == []


def test_some_holders_with_fitted_standardisation_are_named_in_a_warning(federation):
    fed = _declared(federation, {
        "hospital-0": _brca(0, standardise="all"),
        "hospital-1": _brca(1, standardise="none"),
        "hospital-2": _brca(2, standardise="none")})
    warnings: list[str] = []
    fed.coord.submit_job(DP_PLAN, actor="test", warnings=warnings)
    (warning,) = warnings
    assert "(datasets.standardise = 'all') at hospital-0 (agent.toml [[datasets]])" \
        in warning
    assert "Those sites will refuse its tasks; the other 2 that said so fit it" in warning
    assert len(fed.coord.list_jobs()) == 1


def test_sites_that_standardise_with_public_constants_take_the_plan_without_a_word(
        federation):
    fed = _declared(federation, {s: _brca(i, standardise="none")
                                 for i, s in enumerate(SITES)})
    warnings: list[str] = []
    fed.coord.submit_job(DP_PLAN, actor="test", warnings=warnings)
    assert warnings == []
