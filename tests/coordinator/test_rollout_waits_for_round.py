"""A software roll-out does not restart a site in the middle of a round. The agent
stages a software update and restarts as soon as it is staged; the coordinator used to
send the ask (UpdateAvailable) whatever the site was doing, so a site training, or in
secure aggregation, left the round, the attempt failed and, roll-out step after
roll-out step, the job could fail.

Now the ask to a site in the cohort of a round in flight is held until that round's
attempt ends and is sent then, at once; the roll-out's status says what it waits
for, its deadline counts from the ask that goes, and the site is left out of the next
cohort until it reports its outcome, so its restart falls between rounds.

Real coordinator, agents, codec and database; the pump of tests/coordinator/conftest
moves the round's messages, the admin service's sends are recorded."""

from __future__ import annotations

import asyncio
import json

from fedge.console.protocol import AdminRequest
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.rounds import Phase
from fedge.update.messages import UpdateAvailable, UpdateOutcome
from fedge.update.rollout import Rollout
from tests.coordinator.test_federation_inproc import plan

SOFTWARE = "software/fedge/0.4.0/fedge-0.4.0.tar"
MODEL = "model/risk/2/model.onnx"


class AdminClock:
    def __init__(self) -> None:
        self.t = 5_000.0

    def __call__(self) -> float:
        return self.t


def setup(fed, path, deadline_s=300.0):
    """Sites a, b, c holding the job's data set and d, which holds another (it sits the
    job out); a roll-out of ``path`` over d then b, its canary d asked before the job
    (as a push leaves it), and the admin service wired to the coordinator as fedge.
    coordinator.process wires it. Returns (service, sends as (site, body, committed
    rounds, the round in flight's (number, phase, cohort) or None), admin clock)."""
    clock = AdminClock()
    fed.agents["d"].trainer.dataset = "other"
    rollout = Rollout("rollout-1", path, ["d", "b"], deadline_s=deadline_s)
    rollout.start(clock(), clock())
    fed.coord.store.save_rollout(rollout.rollout_id, rollout.to_state())
    sent = []

    def send(site, body):
        runner = fed.coord.runner
        rnd = runner.round if runner is not None else None
        sent.append((site, body, runner.committed if runner is not None else None,
                     None if rnd is None else (rnd.round, rnd.phase, list(rnd.cohort))))

    service = AdminService(fed.coord, {"k": Operator("eng", "viewer")}, send=send,
                           clock=clock, wall=clock)
    fed.coord.on_update_outcome = service.on_outcome
    fed.coord.on_site_returned = service.on_site_returned
    # (getattr: the same test run against a coordinator without the hook fails on what
    # it sends, not on the wiring)
    fed.coord.on_round_ended = getattr(service, "on_round_ended", lambda: None)
    return service, sent, clock


def status(service):
    reply = service.handle("k", AdminRequest("rollout_status",
                                             json.dumps({"rollout_id": "rollout-1"}), {}))
    assert reply.ok, reply.error
    return json.loads(reply.result_json)


def in_training(fed, number):
    r = fed.coord.runner
    return r is not None and r.round is not None and r.round.round == number \
        and r.round.phase is Phase.TRAINING


def test_a_software_ask_waits_for_the_round_to_end_and_the_site_sits_the_next_out(
        federation):
    fed = federation(["a", "b", "c", "d"])
    service, sent, clock = setup(fed, SOFTWARE, deadline_s=300.0)
    job_plan = plan(rounds=2, secure="false").replace("min_clients = 2", "min_clients = 3")

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(job_plan, actor="test")
        await fed.pump(until=lambda: in_training(fed, 1))
        # the canary reports, mid-round: the roll-out moves on to b, which is training
        service.on_outcome("d", UpdateOutcome("rollout-1", SOFTWARE, True, False, "ok"))
        assert [s for s in sent if s[0] == "b"] == []
        held = status(service)
        assert held["waiting_for"] == "b"
        assert held["held"] == f"waiting for round 1 of job {job} to end before asking b"
        # held longer than its deadline: the roll-out does not fail, b was not asked yet
        clock.t += 1000.0
        service.tick()
        assert service.rollouts["rollout-1"].state == "rest"
        await fed.pump(until=lambda: any(s[0] == "b" for s in sent))
        # sent as round 1 ended, before round 2 formed a cohort; round 2 waits for b
        await fed.pump(until=lambda: fed.coord.runner.round is not None)
        wait = fed.coord.job_status(job)
        assert wait["phase"] == "waiting_cohort", wait
        assert wait["cohort_wait"]["excluded"]["b"].startswith(
            f"installing software update {SOFTWARE} (roll-out rollout-1)")
        assert "held" not in status(service)
        # b restarts between rounds and reports: it is back in the cohort
        service.on_outcome("b", UpdateOutcome("rollout-1", SOFTWARE, True, False, "ok"))
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status in
                       ("completed", "failed"))
        return job

    job = asyncio.run(go())
    (ask,) = [s for s in sent if s[0] == "b"]
    _, body, committed, in_flight = ask
    assert body == UpdateAvailable("rollout-1", SOFTWARE)
    assert committed == 1 and (in_flight is None or "b" not in in_flight[2]), ask
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert [(r.round, r.status, r.cohort) for r in st.rounds(job)] == [
        (1, "committed", ["a", "b", "c"]), (2, "committed", ["a", "b", "c"])]
    assert service.rollouts["rollout-1"].state == "succeeded"
    assert [json.loads(r["detail"])["site"] for r in st.audit_log(action="update.held")] \
        == ["b"]
    assert st.audit_log(action="update.released")


def test_the_rebased_deadline_counts_from_the_ask_that_went(federation):
    fed = federation(["a", "b", "c", "d"])
    service, sent, clock = setup(fed, SOFTWARE, deadline_s=300.0)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: in_training(fed, 1))
        service.on_outcome("d", UpdateOutcome("rollout-1", SOFTWARE, True, False, "ok"))
        clock.t += 1000.0
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed")

    asyncio.run(go())
    assert [s[0] for s in sent if s[0] == "b"] == ["b"]
    clock.t += 299.0
    service.tick()
    assert service.rollouts["rollout-1"].state == "rest"
    clock.t += 1.0
    service.tick()
    assert service.rollouts["rollout-1"].state == "failed"
    assert "b did not report" in service.rollouts["rollout-1"].failure


def test_a_model_update_restarts_no_agent_and_is_sent_at_once(federation):
    fed = federation(["a", "b", "c", "d"])
    service, sent, _ = setup(fed, MODEL)

    async def go():
        await fed.heartbeats()
        fed.coord.submit_job(plan(rounds=1, secure="false"), actor="test")
        await fed.pump(until=lambda: in_training(fed, 1))
        service.on_outcome("d", UpdateOutcome("rollout-1", MODEL, True, False, "ok"))

    asyncio.run(go())
    assert [(s[0], s[3][1]) for s in sent if s[0] == "b"] == [("b", Phase.TRAINING)]
    assert "held" not in status(service)
