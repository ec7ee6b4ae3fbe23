"""A coordinator SIGKILLed after the agents revealed a round's unmasking shares, before
it committed the round: real processes, loopback ZeroMQ, the agents' fsynced reveal logs.

Each agent logged its reveal over the round's survivor set S and will not reveal the
same update over any other set. The restarted coordinator must sum the round again over
exactly S, even with more sites than min_clients back before all of S is."""

from __future__ import annotations

import json
import time

import pytest

from fedge.coordinator import checkpoint as ck
from tests.e2e.test_federation import _coordinated, plan, rounds_of, wait_for_connected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def heard_since(fed, sites, t0):
    """Every site in ``sites`` has had a heartbeat recorded by the coordinator since t0."""
    rows = fed.query("SELECT site_id, last_seen FROM appliances")
    return all(r["last_seen"] and r["last_seen"] > t0 for r in rows if r["site_id"] in sites)


def test_coordinator_killed_after_the_reveal_retries_the_round_over_the_same_survivors(
        federation, brca):
    fed, sites = _coordinated(federation, brca, 4)
    for s in sites:
        fed.start_agent(s)
    wait_for_connected(fed, set(sites))
    everyone = sorted(sites)
    text = plan(rounds=3, min_clients=2)
    uninterrupted = fed.submit(text)
    assert fed.wait_job(uninterrupted, 150)["status"] == "completed", fed.dump()
    assert all(json.loads(r["survivors_json"]) == everyone
               for r in rounds_of(fed, uninterrupted))

    # the coordinator SIGKILLs itself once round 2 is evaluating: its unmasking is done,
    # so every survivor has logged its reveal over S = all four; nothing is committed
    fed.coordinator.kill()
    fed.env["FEDGE_TEST_KILL_AT"] = "2:evaluating"
    fed.start_coordinator()
    fed.env.pop("FEDGE_TEST_KILL_AT")
    interrupted = fed.submit(text)
    assert fed.coordinator.p.wait(240) == -9, fed.dump()
    assert fed.job(interrupted)["committed_round"] == 1
    # site-3 is down when the coordinator comes back; the three others make min_clients
    fed.procs["site-3"].kill()
    restarted = time.time()
    fed.start_coordinator()
    others = {"site-0", "site-1", "site-2"}
    fed.wait_for(lambda: heard_since(fed, others, restarted), 60, f"{others} to return")
    time.sleep(3)  # a coordinator that would start round 2 with them has done so now
    fed.procs["site-3"].start()
    row = fed.wait_job(interrupted, 240)
    assert row["status"] == "completed", fed.dump()

    rs = rounds_of(fed, interrupted)
    attempts = [(r["status"], json.loads(r["cohort_json"]), json.loads(r["survivors_json"]))
                for r in rs if r["round"] == 2]
    # never a cohort other than S: no attempt with site-0..2 alone (whose reveal they
    # would refuse), and the round summed over S; the attempt the kill cut short is
    # recorded as interrupted, with the survivors of its revealed sum
    assert attempts == [("interrupted", everyone, everyone),
                        ("committed", everyone, everyone)], (attempts, fed.dump())
    a = ck.load_checkpoint(ck.final_path(fed.coord_dir, uninterrupted)).weights
    b = ck.load_checkpoint(ck.final_path(fed.coord_dir, interrupted)).weights
    assert a.tobytes() == b.tobytes()
    for s in sites:  # nobody was asked to reveal over another set
        assert "UpdateAlreadySummed" not in fed.procs[s].output(), fed.procs[s].output()[-2000:]
    recorded = [json.loads(a["detail"]) for a in fed.audit("unmask_set_recorded")]
    assert {"job": interrupted, "round": 2, "survivors": everyone} in recorded
    # the record was made before the kill and cleared by the round's commit
    assert not fed.query("SELECT * FROM unmask_sets WHERE job_id = ?", interrupted)
