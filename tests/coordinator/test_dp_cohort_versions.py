"""A DP job and agents one minor behind the coordinator, over the in-memory federation:
the skew rule accepts them (update required), the fleet view shows their version, and
a DP job gives them no cohort seat, as they report ε under the accounting of fedge <0.2
(add-or-remove), lower than today's replace-one figure.

Agents before 0.2 reach only a 0.2 coordinator (from 0.3 the skew rule refuses them
outright), so the coordinator here runs as 0.2.0 and its current agents as 0.2.0."""

from __future__ import annotations

import asyncio

import pytest

import fedge
from fedge.agent import runtime
from fedge.coordinator.cohort import OLD_EPSILON_ACCOUNTING
from fedge.update.version import parse_version
from tests.coordinator.test_service import PLAN as SERVICE_PLAN


def plan(min_clients: int) -> str:
    """test_service's one-site-per-step plan, one round, ``min_clients`` sites, and a
    clip DP-FedAvg's noise fits in (3.0)."""
    return (SERVICE_PLAN.replace("rounds = 3", "rounds = 1")
            .replace("min_clients = 2", f"min_clients = {min_clients}")
            .replace("enabled = false", "enabled = false\nclip = 3.0"))


DP = "[privacy]\ndp = { noise_multiplier = 1.0 }\n"
CLIENT_DP = "[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 0.5, cohort_size = 1 }\n"


# the last coordinator release that accepts agents before 0.2 (one minor behind)
COORDINATOR = "0.2.0"


@pytest.fixture
def federation(federation, monkeypatch):
    """The in-memory federation with its coordinator built as release COORDINATOR."""
    from fedge.coordinator import service

    monkeypatch.setattr(service, "__version__", COORDINATOR)
    return federation


def heard(fed, monkeypatch, old):
    """Every agent beats as fedge COORDINATOR; those in ``old`` as 0.1.0 (one minor
    behind)."""
    async def go():
        for s, agent in fed.agents.items():
            with monkeypatch.context() as mp:
                version = "0.1.0" if s in old else COORDINATOR
                mp.setattr(runtime, "running_version", lambda v=version: v)
                await agent.heartbeat()
    asyncio.run(go())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))


def test_the_package_is_0_2_the_first_with_replace_one_epsilon():
    assert parse_version(fedge.__version__)[:2] >= (0, 2), (
        f"fedge {fedge.__version__}: reinstall the package (pip install -e .)")


@pytest.mark.parametrize("privacy", [DP, CLIENT_DP])
def test_a_dp_job_gives_no_seat_to_an_agent_before_0_2(federation, monkeypatch, privacy):
    fed = federation(["a", "b", "c"])
    heard(fed, monkeypatch, old={"c"})
    coord = fed.coord
    versions = {f["site_id"]: f["version"] for f in coord.fleet()}
    assert versions == {"a": COORDINATOR, "b": COORDINATOR, "c": "0.1.0"}
    assert [a["actor"] for a in coord.store.audit_log(action="version_update_required")] \
        == ["c"]
    # all three are needed: the job waits, naming why c is not a candidate
    job = coord.submit_job(plan(3) + privacy, actor="test")
    coord.tick()
    wait = coord.job_status(job)["cohort_wait"]
    assert (wait["candidates"], wait["excluded"]) == (2, {"c": OLD_EPSILON_ACCOUNTING})
    assert "c: " + OLD_EPSILON_ACCOUNTING in wait["summary"]
    coord.cancel_job(job, actor="test")
    # two suffice: the round starts with a and b
    job = coord.submit_job(plan(2) + privacy, actor="test")
    coord.tick()
    assert coord.runner.job_id == job and coord.runner.round.cohort == ["a", "b"]
    coord.cancel_job(job, actor="test")
    # a job without DP seats c
    job = coord.submit_job(plan(3), actor="test")
    coord.tick()
    assert coord.runner.job_id == job and coord.runner.round.cohort == ["a", "b", "c"]
    # c updated: the next heartbeat says so, and a DP job seats it
    coord.cancel_job(job, actor="test")
    heard(fed, monkeypatch, old=set())
    job = coord.submit_job(plan(3) + privacy, actor="test")
    coord.tick()
    assert coord.runner.job_id == job and coord.runner.round.cohort == ["a", "b", "c"]
