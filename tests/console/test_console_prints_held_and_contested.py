"""What the console prints of two things the coordinator says of a job and a roll-out:

- `fedge console push` prints the ask a roll-out holds back while the site is in a
  round ("held": "waiting for round N of job J to end before asking SITE"), not only
  its state;
- `fedge console jobs watch` prints a site whose connection is contested (two machines
  holding its keys: jobs status's "contested"), each time that changes.

Real coordinator, agents, codec, database and admin service (tests/coordinator's
in-memory federation, whose pump moves the round's messages); the console's calls go
to the admin service's handler as the admin channel delivers them."""

from __future__ import annotations

import asyncio
import itertools
import json

from fedge.console.cli import rollout_line, watch_job
from fedge.console.protocol import AdminRequest
from fedge.coordinator.admin import AdminService, Operator
from fedge.update.messages import UpdateOutcome
from fedge.wire.messages import TrainTask
from tests.coordinator.conftest import InProcFederation
from tests.coordinator.test_contested_site import REASON, contest, slow
from tests.coordinator.test_rollout_waits_for_round import SOFTWARE, in_training, setup


def _call(service):
    def call(op, args):
        reply = service.handle("k", AdminRequest(op, json.dumps(args), {}))
        assert reply.ok, reply.error
        return json.loads(reply.result_json), {}
    return call


def test_push_line_says_what_a_held_rollout_waits_for(tmp_path):
    fed = InProcFederation(tmp_path / "coord", ["a", "b", "c", "d"])
    try:
        service, _, _ = setup(fed, SOFTWARE)
        job_plan = slow("false").replace("min_clients = 2", "min_clients = 3")

        async def go():
            await fed.heartbeats()
            job = fed.coord.submit_job(job_plan, actor="test")
            await fed.pump(until=lambda: in_training(fed, 1))
            service.on_outcome("d", UpdateOutcome("rollout-1", SOFTWARE, True, False, "ok"))
            return job

        job = asyncio.run(go())
        status, _ = _call(service)("rollout_status", {"rollout_id": "rollout-1"})
        assert rollout_line(status) == (
            f"roll-out rollout-1 of {SOFTWARE}: rest — waiting for round 1 of job {job} "
            "to end before asking b")
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()


def test_jobs_watch_prints_a_contested_site_as_it_changes(tmp_path):
    fed = InProcFederation(tmp_path / "coord", ["a", "b", "c"])
    loop = asyncio.new_event_loop()
    try:
        service = AdminService(fed.coord, {"k": Operator("eng", "viewer")},
                               send=lambda site, body: None)

        def hook(site, body):
            if site == "c" and isinstance(body, TrainTask):
                contest(fed, "c")  # the other machine took c's TrainTask
                return True
            return False

        fed.kill_hook = hook
        loop.run_until_complete(fed.heartbeats())
        job = fed.coord.submit_job(slow("false"), actor="test")
        call = _call(service)

        def polled(op, args):
            if op == "jobs_status":  # the federation goes on between two polls
                steps = itertools.count()
                loop.run_until_complete(fed.pump(until=lambda: next(steps) >= 1,
                                                 max_steps=2))
            return call(op, args)

        lines: list[str] = []
        status = watch_job(polled, job, interval_s=0, out=lines.append, results_wait_s=0)
        assert status["status"] == "completed", status
        said = [ln for ln in lines if "contested" in ln]
        assert said[0] == f"  contested c: dropped from round 1: {REASON}", lines
        assert len(said) == len(set(said)), lines  # each said once, until it changes
        # the job's end drops jobs status's list: that is not the contest ending
        assert not any("no longer contested" in ln for ln in lines), lines
    finally:
        loop.close()
        fed.pool.shutdown(wait=True)
        fed.coord.close()
