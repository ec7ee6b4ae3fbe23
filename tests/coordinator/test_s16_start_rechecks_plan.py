"""A queued job is checked again when the running coordinator starts it (review s16
progress, the unfinished start re-check): a plan submitted before any site's
declarations were known was checked against nothing, queued, and then refused by
every site in round 1. Now the coordinator runs the same submission checks with what
the sites have declared since, and a plan they refuse fails at once, before any site
is asked to train, with the checks' own words. Real coordinator (SQLite) and real
agents declaring their data sets (TorchTrainer tables), in memory."""

from __future__ import annotations

import asyncio

from fedge.agent.trainer import TorchTrainer
from fedge.wire import messages as m
from tests.coordinator.test_submit_checks_declared_data import PLAN, SITES, _brca


def _fleet_declaring_after_the_submit(federation, plan: str):  # type: ignore[no-untyped-def]
    fed = federation(SITES)
    for i, site in enumerate(SITES):
        fed.agents[site].trainer = TorchTrainer([_brca(i)])
    warnings: list[str] = []
    job = fed.coord.submit_job(plan, actor="test", warnings=warnings)  # nothing known yet
    assert warnings == []
    tasks: list[str] = []
    fed.kill_hook = lambda site, body: tasks.append(site) if isinstance(
        body, m.TrainTask) else False

    async def go() -> None:
        await fed.heartbeats()
        while fed.inbox:  # their declarations reach the coordinator before it starts it
            site, frames = fed.inbox.pop(0)
            fed.coord.handle_frames(site, frames)
        assert all(fed.coord.conns[s].tasks for s in SITES)
        # until the job ended without a runner, or a site was asked to train
        await fed.pump(until=lambda: (fed.coord.store.job(job).status != "queued"
                                      and fed.coord.runner is None) or bool(tasks),
                       max_steps=200)
    asyncio.run(go())
    return fed, job, tasks


def test_a_plan_the_sites_declared_against_since_its_submit_fails_at_start(federation):
    fed, job, tasks = _fleet_declaring_after_the_submit(
        federation, PLAN.replace("in_features = 39", "in_features = 38"))
    record = fed.coord.store.job(job)
    assert record.status == "failed"
    assert record.error.startswith("refused when it was to start, by the submission "
                                   "checks: plan field model.params.in_features = 38"), \
        record.error
    assert "39 features at hospital-0, hospital-1, hospital-2" in record.error
    assert tasks == [], "a site was asked to train a plan every site refuses"
    assert fed.coord.store.rounds(job) == []


def test_a_plan_that_fits_what_the_sites_declared_starts(federation):
    fed, job, tasks = _fleet_declaring_after_the_submit(federation, PLAN)
    assert fed.coord.store.job(job).status == "running"
    assert sorted(tasks) == SITES
