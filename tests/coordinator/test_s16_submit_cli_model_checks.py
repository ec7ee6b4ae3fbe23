"""`fedge coordinator submit` (the direct database CLI, another process) checks a
plan's model against what the sites declared of their data sets (task, input shape),
as the running coordinator does at `fedge console jobs submit`, in the same words
(plan-matrix review s16, MEDIUM 2). It had only the data sets' names from the
appliances table, so a model no site could run was queued, then refused by every
site in round 1. The running coordinator now records each site's declarations with
its heartbeats (the ``declared_inputs`` table). Real coordinator (SQLite), real
agents and wire messages in memory (tests/coordinator/conftest.py), the real CLI as
a subprocess on the same database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.service import CoordinatorError
from fedge.coordinator.store import Store
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair
from tests.coordinator.test_damaged_database import fedge
from tests.coordinator.test_submit_checks_silent_sites import BRCA, PLAN, SITES


def _config(tmp_path: Path, state_dir: Path) -> Path:
    _, secret = save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\nbind = "tcp://127.0.0.1:0"\n'
                   f'curve_key = "{secret}"\n'
                   f'roster_public_key = "{Identity.generate().public_bytes().hex()}"\n')
    return cfg


def _heard(fed) -> None:  # type: ignore[no-untyped-def]
    """Every site heartbeats (after its DatasetClasses) to the running coordinator,
    which writes the fleet's heartbeats as it does every HEARTBEAT_FLUSH_S."""
    async def go() -> None:
        await fed.heartbeats()
        await fed.pump(until=lambda: not fed.inbox and all(
            s in fed.coord.conns and fed.coord.conns[s].datasets is not None for s in SITES))
    asyncio.run(go())
    fed.coord.store.flush_heartbeats(force=True)


def test_direct_submit_refuses_a_model_every_declaring_holder_would_refuse(federation,
                                                                          tmp_path):
    fed = federation(SITES)
    for site in SITES:
        fed.agents[site].trainer = TorchTrainer([BRCA])  # 39 features, survival
    _heard(fed)
    cfg = _config(tmp_path, fed.coord.state_dir)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)  # cox_linear with in_features = 38

    with pytest.raises(CoordinatorError) as console:  # the console's path
        fed.coord.submit_job(PLAN, actor="test")
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""
    assert out.stderr.splitlines() == [f"fedge coordinator submit: {console.value}"]
    assert "plan field model.params.in_features = 38: data set 'fed_tcga_brca' is 39 " \
           "features at hospital-0, hospital-1, hospital-2" in out.stderr
    assert "Nothing was submitted" in out.stderr
    assert fed.coord.list_jobs() == []

    # a classifier on survival data: refused the same way
    plan.write_text(PLAN.replace('name = "cox_linear"\nparams = { in_features = 38 }',
                                 'name = "logistic"\nparams = { in_features = 39 }'))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 2
    assert "plan field model.name = 'logistic': data set 'fed_tcga_brca' is a survival " \
           "task at hospital-0, hospital-1, hospital-2" in out.stderr

    # the model that fits goes in without a word
    plan.write_text(PLAN.replace("in_features = 38", "in_features = 39"))
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert [j["job_id"] for j in fed.coord.list_jobs()] == [out.stdout.strip()]


def test_declared_inputs_outlive_the_coordinator_and_follow_the_latest_heartbeat(
        federation):
    fed = federation(SITES)
    for site in SITES:
        fed.agents[site].trainer = TorchTrainer([BRCA])
    _heard(fed)
    state = fed.coord.state_dir
    fed.coord.close()
    store = Store(state)  # another process's view, after the coordinator stopped
    try:
        assert store.declared_inputs() == {
            s: {"tasks": {"fed_tcga_brca": "survival"},
                "input_shapes": {"fed_tcga_brca": [39]},
                "standardise": {"fed_tcga_brca": "continuous"}} for s in SITES}
        # a later heartbeat declaring nothing (an agent downgraded) replaces it
        store.record_heartbeat("hospital-0", version="0.3.0", health={}, eligible=True,
                               reason="", datasets=["fed_tcga_brca"], current_task="",
                               inputs={})
        store.flush_heartbeats(force=True)
    finally:
        store.close()
    store = Store(state)
    try:
        assert store.declared_inputs()["hospital-0"] == {}
        assert store.declared_inputs()["hospital-1"]["input_shapes"] == \
            {"fed_tcga_brca": [39]}
    finally:
        store.close()
