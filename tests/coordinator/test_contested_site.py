"""A site whose connection is contested (its key replaced its own connection
CONTESTED_TIMES times: two machines holding one appliance's keys, a restored VM
snapshot) is dropped from the round in flight at once, as lost, naming why, and the
round goes on with the others; it is kept out of new cohorts until its key has been
quiet for CONTEST_QUIET_S. Before, the round waited for it until a deadline (or its
heartbeat timeout), every round, for as long as the clone was online.

Real coordinator, agents, codec and SecAgg+; the pump of tests/coordinator/conftest
moves the messages. The site's messages are swallowed once the contest begins (the
other machine got them), so only the drop can end the wait early."""

from __future__ import annotations

import asyncio
import json

from fedge.coordinator.rounds import Phase
from fedge.coordinator.service import CONTEST_QUIET_S, CONTEST_WITHDRAW_TIMES
from fedge.secagg.messages import RelayedShares
from fedge.wire.messages import TrainTask
from tests.coordinator.test_federation_inproc import plan

REASON = ("contested: 3 reconnects from 10.0.0.7, 10.0.1.9 — two appliances share this "
          "site's keys?")
# deadlines far beyond what the round needs: only the drop can end a wait in time
def slow(secure):
    return plan(rounds=1, secure=secure).replace("train_s = 5", "train_s = 600").replace(
        "secagg_stage_s = 3", "secagg_stage_s = 600").replace("cohort_s = 5", "cohort_s = 600")


def contest(fed, site):
    for _ in range(3):  # the transport saw its key connect again, from the other machine
        fed.coord.superseded(site, "10.0.0.7", "10.0.1.9")


def run_with_clone(fed, when, secure="true"):
    """Run a one-round job with slow deadlines; as ``when(site, body)`` first holds for
    a message to c, c's key starts being fought over and c's messages go to the other
    machine. Returns (job, the clock time the round ran from the contest to its commit,
    the job's status meanwhile)."""
    seen = {}

    def hook(site, body):
        if site != "c" or not when(site, body):
            return False
        if "at" not in seen:
            seen["at"] = fed.clock.t
            contest(fed, "c")
            seen["status"] = fed.coord.job_status(fed.coord.runner.job_id)
        return True

    fed.kill_hook = hook

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(slow(secure), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status in
                       ("completed", "failed"), max_steps=400)
        return job

    job = asyncio.run(go())
    return job, fed.clock.t - seen["at"], seen["status"]


def test_contested_site_is_dropped_from_training_at_once_and_the_round_commits(federation):
    fed = federation(["a", "b", "c"])
    job, took, status = run_with_clone(fed, lambda s, b: isinstance(b, TrainTask),
                                       secure="false")
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (r,) = st.rounds(job)
    assert r.survivors == ["a", "b"] and r.dropped == ["c"]
    assert r.dropped_reasons == {"c": REASON}
    assert took < 10, f"the round waited {took:.1f} s for the contested site"
    # jobs status says why, while the round is in flight
    assert status["contested"] == {"c": f"dropped from round 1: {REASON}"}
    [row] = st.audit_log(action="contested_site_dropped")
    assert row["actor"] == "coordinator"
    assert json.loads(row["detail"]) == {"job": job, "round": 1, "site": "c", "reason": REASON}


def test_contested_site_is_dropped_from_secure_aggregation_at_once(federation):
    fed = federation(["a", "b", "c", "d"])
    job, took, _ = run_with_clone(fed, lambda s, b: isinstance(b, RelayedShares))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (r,) = st.rounds(job)
    assert r.survivors == ["a", "b", "d"]
    assert r.dropped_reasons == {"c": REASON}
    assert took < 10, f"secure aggregation waited {took:.1f} s for the contested site"


def test_contested_site_is_left_out_of_new_cohorts_until_its_key_is_quiet(federation):
    fed = federation(["a", "b", "c"])
    contest(fed, "c")
    quick = plan(rounds=1, secure="false")

    async def go():
        await fed.heartbeats()
        first = fed.coord.submit_job(quick, actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(first).status == "completed",
                       advance=0.05)
        fed.clock.t += CONTEST_QUIET_S  # the other machine went away
        await fed.heartbeats()
        second = fed.coord.submit_job(quick, actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(second).status == "completed",
                       advance=0.05)
        return first, second

    first, second = asyncio.run(go())
    st = fed.coord.store
    (r1,) = st.rounds(first)
    assert r1.cohort == ["a", "b"]
    assert r1.left_out == {"c": f"{REASON}; left out of new rounds until it stops for "
                                f"{CONTEST_QUIET_S:g} s"}
    (r2,) = st.rounds(second)
    assert r2.cohort == ["a", "b", "c"]


def test_a_site_reconnecting_a_few_times_from_one_address_is_not_dropped(federation):
    """Three replacements from one address can be one agent on a flaky link (a NAT
    dropping idle connections): shown as contested in the fleet view, kept in rounds.
    Ten from one address (two machines behind one NAT) take it out."""
    fed = federation(["a", "b", "c"])
    for _ in range(3):
        fed.coord.superseded("c", "10.0.0.7", "10.0.0.7")  # an agent replacing its socket
    assert fed.coord.contested("c", fed.clock.t) is not None
    assert fed.coord.contested_out(fed.clock.t) == {}

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed")
        return job

    (r,) = fed.coord.store.rounds(asyncio.run(go()))
    assert r.survivors == ["a", "b", "c"], r.dropped_reasons


def test_a_site_reconnecting_ten_times_from_one_address_is_dropped(federation):
    fed = federation(["a", "b", "c"])
    for _ in range(CONTEST_WITHDRAW_TIMES - 1):
        fed.coord.superseded("c", "10.0.0.7", "10.0.0.7")

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: fed.coord.runner is not None
                       and fed.coord.runner.round is not None
                       and fed.coord.runner.round.phase is Phase.TRAINING)
        fed.coord.superseded("c", "10.0.0.7", "10.0.0.7")  # now it is taken out
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed")
        return job

    job = asyncio.run(go())
    (r,) = fed.coord.store.rounds(job)
    # contested once the round was under way: dropped, named, the round went on
    assert r.cohort == ["a", "b", "c"] and r.survivors == ["a", "b"]
    assert r.dropped_reasons["c"].startswith(
        f"contested: {CONTEST_WITHDRAW_TIMES} reconnects from 10.0.0.7 — ")
