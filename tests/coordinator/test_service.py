"""The Coordinator's admin API and its refusal paths, over the in-memory federation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fedge import __version__
from fedge.coordinator.plan import PlanError
from fedge.coordinator.service import CoordinatorError
from fedge.coordinator.store import StoreError
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "synthetic"
rounds = 3
min_clients = 2
[model]
name = "linear"
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = false
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 5
eval_s = 5
"""


def test_fleet_shows_registry_and_connection(federation):
    fed = federation(["a", "b"])
    asyncio.run(fed.agents["a"].heartbeat())
    fed.coord.handle_frames("a", fed.inbox.pop()[1])
    fleet = {f["site_id"]: f for f in fed.coord.fleet()}
    assert fleet["a"]["connected"] and not fleet["b"]["connected"]
    assert fleet["a"]["datasets"] == ["synthetic"] and fleet["a"]["status"] == "enrolled"


def test_invalid_plan_is_refused_and_nothing_is_stored(federation):
    fed = federation(["a"])
    with pytest.raises(PlanError, match=r"job\.rounds"):
        fed.coord.submit_job(PLAN.replace("rounds = 3", "rounds = 0"))
    assert fed.coord.list_jobs() == []


def test_job_status_and_cancel(federation):
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="alice")
    st = fed.coord.job_status(job)
    assert st["status"] == "queued" and st["rounds_planned"] == 3 and st["final_checkpoint"] == ""

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).committed_round >= 1)
    asyncio.run(go())
    fed.coord.cancel_job(job, actor="alice")
    assert fed.coord.store.job(job).status == "cancelled"
    assert fed.coord.runner is None
    with pytest.raises(CoordinatorError, match="cancelled"):
        fed.coord.cancel_job(job)
    with pytest.raises(CoordinatorError, match="unknown job"):
        fed.coord.job_status("nope")
    actors = {(a["actor"], a["action"]) for a in fed.coord.store.audit_log()}
    assert ("alice", "submit_job") in actors and ("alice", "job_cancelled") in actors


def test_revoke_drops_connection_and_allow_list(federation):
    fed = federation(["a", "b", "c"])
    lists, dropped = [], []
    fed.coord.on_allow_list = lists.append
    fed.coord.on_disconnect = dropped.append
    asyncio.run(fed.heartbeats())
    for site, frames in fed.inbox:
        fed.coord.handle_frames(site, frames)
    fed.inbox.clear()
    fed.coord.revoke("c", actor="alice")
    assert dropped == ["c"] and "c" not in {s for s in fed.coord.connected_sites()}
    assert len(lists[-1]) == 2
    with pytest.raises(StoreError, match="unknown site"):
        fed.coord.revoke("zzz")


def test_set_roster_verifies_signature(federation):
    from fedge.secagg.keys import Identity, Roster

    fed = federation(["a"])
    forged = Roster.build({"a": Identity.generate().public_bytes()}, Identity.generate())
    with pytest.raises(ValueError, match="signature"):
        fed.coord.set_roster(forged.to_bytes())


def test_heartbeat_naming_another_site_is_rejected(federation):
    fed = federation(["a", "b"])
    hb = m.Heartbeat(site="b", version="0.1.0", health_json="{}", eligible=True, reason="",
                     datasets=[], current_task="")
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(hb, sender="a")])
    assert fed.coord.store.audit_log(action="spoofed_sender")
    assert fed.coord.store.appliance("b").last_seen is None
    assert [type(o.body) for o in fed.coord.outbox if o.site == "a"] == [
        m.Rejected, m.RosterUpdate]  # refused; a's live connection still gets the roster


def test_a_heartbeat_with_health_nested_past_the_parsers_depth_is_kept_not_fatal(federation):
    """One enrolled site's odd health JSON (60 000 nested arrays) must not raise out of
    the coordinator's message loop, which would end it for every site."""
    fed = federation(["a", "b"])
    hb = m.Heartbeat(site="a", version=__version__, health_json="[" * 60_000, eligible=True,
                     reason="", datasets=["synthetic"], current_task="")
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(hb, sender="a")])
    row = fed.coord.store.appliance("a")
    assert row.last_seen is not None and row.health == {"unparsable": "[" * 200}
    assert type(fed.coord.outbox[0].body) is m.HeartbeatAck


def test_an_internal_error_handling_one_message_is_refused_and_audited_not_raised(federation):
    """Whatever a message reaches that raises (here a heartbeat handler made to fail) is
    logged, audited as internal_error and answered with Rejected; the next message from
    the same site is handled as usual."""
    fed = federation(["a"])
    real = fed.coord._heartbeat

    def broken(site, body):
        raise KeyError("boom")

    fed.coord._heartbeat = broken
    hb = m.Heartbeat(site="a", version=__version__, health_json="{}", eligible=True, reason="",
                     datasets=[], current_task="")
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(hb, sender="a")])
    [entry] = fed.coord.store.audit_log(action="internal_error")
    assert "heartbeat could not be handled: KeyError" in entry["detail"]
    assert [type(o.body) for o in fed.coord.outbox] == [m.Rejected]
    fed.coord._heartbeat = real
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(hb, sender="a")])
    assert fed.coord.store.appliance("a").last_seen is not None


def test_update_outcome_is_routed(federation):
    from fedge.update.messages import UpdateOutcome

    fed = federation(["a"])
    got = []
    fed.coord.on_update_outcome = lambda site, body: got.append((site, body.ok))
    out = UpdateOutcome(rollout_id="r1", path="p", ok=True, rolled_back=False, detail="")
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(out, sender="a")])
    assert got == [("a", True)]


def test_a_site_is_reported_as_returned_on_first_contact_and_after_a_lost_connection(
        federation):
    """Any authenticated message counts: the transport vouches for the sender."""
    fed = federation(["a", "b"])
    returned: list[str] = []
    fed.coord.on_site_returned = returned.append

    def beat(site, *, named=None, version=__version__):
        hb = m.Heartbeat(site=named or site, version=version, health_json="{}",
                         eligible=True, reason="", datasets=[], current_task="")
        fed.coord.handle_frames(site, [bytes(f) for f in codec.encode(hb, sender=site)])

    beat("a")
    beat("a")
    assert returned == ["a"]  # first contact only, not every heartbeat
    fed.clock.t += 31  # past the 30 s heartbeat timeout: it counts as gone
    beat("a")
    fed.coord.peer_lost("a")
    beat("a")
    assert returned == ["a", "a", "a"]
    beat("b", version="99.0.0")  # refused for version skew and dropped: not a return
    assert returned == ["a", "a", "a"]
    beat("b", named="a")  # rejected, but b's authenticated connection is live
    assert returned == ["a", "a", "a", "b"]


def test_the_roster_in_force_reaches_connected_agents_and_an_older_one_is_refused(
        federation):
    """A site enrolled later is known to the others through the coordinator: the
    console's newer roster goes to every connected agent at once, and to a site when it
    (re)connects; the agents take it (the in-process agents verify it for real)."""
    from fedge.secagg.keys import Roster

    fed = federation(["a", "b"])
    for a in fed.agents.values():
        a.roster_key = fed.console.public_bytes()

    async def go():
        await fed.heartbeats()  # both connect: each gets the roster in force
        await fed.pump(until=lambda: not fed.inbox and not fed.coord.outbox)

    asyncio.run(go())
    entries = {s: i.public_bytes() for s, i in fed.identities.items()}
    newer = Roster.build(entries, fed.console, serial=5)
    fed.coord.set_roster(newer.to_bytes(), actor="test")
    sent = [(o.site, type(o.body)) for o in fed.coord.outbox]
    assert sent == [("a", m.RosterUpdate), ("b", m.RosterUpdate)]
    asyncio.run(fed.pump(until=lambda: all(a.roster.serial == 5
                                           for a in fed.agents.values())))
    with pytest.raises(ValueError, match="serial 4 is older than the one in force"):
        fed.coord.set_roster(Roster.build(entries, fed.console, serial=4).to_bytes())
    assert Roster.from_bytes(fed.coord.roster, fed.console.public_bytes()).serial == 5
    fed.coord.outbox.clear()
    fed.coord.peer_lost("b")
    asyncio.run(fed.agents["b"].heartbeat())  # b comes back: it is sent the roster again
    (site, frames), = fed.inbox
    fed.coord.handle_frames(site, frames)
    assert [(o.site, type(o.body)) for o in fed.coord.outbox] == [
        ("b", m.HeartbeatAck), ("b", m.RosterUpdate)]


def test_failed_attempts_limit_fails_job_without_checkpoints(federation):
    fed = federation(["a"])
    job = fed.coord.submit_job(PLAN)  # min_clients 2, only one site

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "failed",
                       advance=1.0)
    asyncio.run(go())
    j = fed.coord.store.job(job)
    assert "failed 3 times" in j.error and "below min_clients 2" in j.error
    assert [r.status for r in fed.coord.store.rounds(job)] == ["failed"] * 3
    w0 = fed.coord.state_dir / "jobs" / job / "round-0.safetensors"
    assert w0.exists() and not (w0.parent / "round-1.safetensors").exists()


def _block_final_checkpoint(fed, job):
    """A directory where final.safetensors goes: its atomic rename fails with a real
    OSError (IsADirectoryError), as a full disk or a dead disk would, even as root."""
    from fedge.coordinator import checkpoint as ck

    final = ck.final_path(fed.coord.state_dir, job)
    final.mkdir(parents=True)
    (final / "blocker").write_text("")
    return final


def _rounds_started(coord, job):
    import json

    return [json.loads(a["detail"])["round"] for a in coord.store.audit_log(
        action="round_started") if json.loads(a["detail"])["job"] == job]


def test_a_failing_final_checkpoint_is_retried_and_never_trains_a_round_past_the_plan(
        federation):
    """All rounds committed but final.safetensors cannot be written: the job stays
    'finishing' (failure audited, retried), and completes once the disk takes the file;
    it never starts round plan.rounds + 1."""
    import shutil

    from fedge.coordinator import checkpoint as ck

    fed = federation(["a", "b"])
    completed: list[str] = []
    fed.coord.on_job_completed = completed.append
    job = fed.coord.submit_job(PLAN.replace("rounds = 3", "rounds = 2"), actor="test")
    final = _block_final_checkpoint(fed, job)

    def finish_failures():
        return len(fed.coord.store.audit_log(action="job_finish_failed"))

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: finish_failures() >= 2, advance=1.0)  # retried
    asyncio.run(go())
    j = fed.coord.store.job(job)
    assert (j.status, j.committed_round) == ("running", 2)
    assert _rounds_started(fed.coord, job) == [1, 2]
    st = fed.coord.job_status(job)
    assert st["phase"] == "finishing" and "IsADirectoryError" in st["finish_error"]
    assert "IsADirectoryError" in fed.coord.store.audit_log(action="job_finish_failed")[0][
        "detail"]
    assert completed == []

    shutil.rmtree(final)  # space again
    asyncio.run(fed.pump(until=lambda: fed.coord.store.job(job).status == "completed",
                         advance=1.0))
    assert _rounds_started(fed.coord, job) == [1, 2]
    assert [r.round for r in fed.coord.store.rounds(job)] == [1, 2]
    assert completed == [job] and fed.coord.runner is None
    w2 = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, 2)).weights
    np.testing.assert_array_equal(ck.load_checkpoint(final).weights, w2)
    assert fed.coord.store.job(job).final_digest == fed.coord.store.rounds(job)[-1].model_digest


def test_a_coordinator_restarted_after_the_last_commit_completes_the_job_without_a_round(
        federation):
    """Killed after the last round's commit, before the job was marked completed: the
    next coordinator on the same state directory writes the final checkpoint from the
    last round and completes the job instead of training round plan.rounds + 1."""
    import shutil

    from fedge.coordinator import checkpoint as ck
    from fedge.coordinator.service import Coordinator

    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN.replace("rounds = 3", "rounds = 2"), actor="test")
    final = _block_final_checkpoint(fed, job)  # dies here: the final write never lands

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).committed_round == 2)
    asyncio.run(go())
    old = fed.coord
    shutil.rmtree(final)
    fed.coord = Coordinator(old.state_dir, roster=old.roster,
                            roster_public_key=old.roster_public_key, heartbeat_timeout_s=30.0,
                            initial_weights=old.initial_weights, clock=fed.clock)
    old.close()
    completed: list[str] = []
    fed.coord.on_job_completed = completed.append
    assert fed.coord.store.job(job).status == "running"

    async def again():
        await fed.heartbeats()  # the sites are back: a round could start if one were due
        await fed.pump(until=lambda: fed.coord.store.job(job).status != "running")
    asyncio.run(again())
    j = fed.coord.store.job(job)
    assert (j.status, j.committed_round) == ("completed", 2)
    assert completed == [job] and fed.coord.runner is None
    assert _rounds_started(fed.coord, job) == [1, 2]
    w2 = ck.load_checkpoint(ck.round_path(fed.coord.state_dir, job, 2)).weights
    np.testing.assert_array_equal(ck.load_checkpoint(final).weights, w2)
    assert j.final_digest == fed.coord.store.rounds(job)[-1].model_digest


def _wait_then_fail(fed, job):
    """Pump until the job's round waits for a cohort; return job_status then, and the
    job once it has failed."""
    def waiting():  # with every site's heartbeat handled
        wait = fed.coord.job_status(job).get("cohort_wait")
        return wait is not None and "not connected" not in wait["summary"]

    async def go():
        await fed.heartbeats()
        await fed.pump(until=waiting)
        status = fed.coord.job_status(job)
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "failed", advance=1.0)
        return status
    return asyncio.run(go()), fed.coord.store.job(job)


def test_a_job_for_a_data_set_no_site_holds_says_so_while_waiting_and_when_it_fails(
        federation):
    sites = ["a", "b", "c", "d", "e", "f", "g"]
    fed = federation(sites)
    job = fed.coord.submit_job(PLAN.replace('"synthetic"', '"fed_heart"'), actor="test")
    status, failed = _wait_then_fail(fed, job)
    nodata = "does not hold data set 'fed_heart'"
    assert status["phase"] == "waiting_cohort"
    assert status["cohort_wait"] == {
        "candidates": 0, "enrolled": 7, "min_clients": 2,
        "excluded": {s: nodata for s in sites[:5]}, "more_excluded": 2,
        "summary": "0 candidate site(s) of 7 enrolled, min_clients 2; excluded: "
                   + "; ".join(f"{s}: {nodata}" for s in sites[:5]) + "; and 2 more"}
    assert status["cohort_wait"]["summary"] in failed.error  # bounded: 5 named, 2 counted
    assert "f: " not in failed.error and "below min_clients 2" in failed.error


def test_a_job_needing_more_sites_than_enrolled_names_both_numbers(federation):
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN.replace("min_clients = 2", "min_clients = 5"),
                               actor="test")
    status, failed = _wait_then_fail(fed, job)
    why = "2 candidate site(s) (a, b) of 2 enrolled, min_clients 5"
    assert status["cohort_wait"]["summary"] == why
    assert (status["cohort_wait"]["excluded"], status["cohort_wait"]["more_excluded"]) == ({}, 0)
    assert f"cohort deadline (5 s) passed: {why}" in failed.error


def test_a_key_refused_again_and_again_is_audited_once_then_once_a_minute_with_a_count(
        federation):
    """An unenrolled key reconnecting every few milliseconds: its first refusal is
    audited, the rest are counted into at most one row per key per minute (written by
    the next refusal or tick once the minute is up), never one fsync'd row each."""
    import json

    fed = federation(["a"])
    coord, clock = fed.coord, fed.clock
    key, why = "K" * 40, "unknown key (from 10.0.0.9)"

    def rows():
        return [json.loads(r["detail"]) for r in coord.store.audit_log(
            action="connection_refused")]

    t0 = clock.t
    for _ in range(500):
        coord.refused(key, why)
        clock.t += 0.01
    assert rows() == [{"curve_public": key, "reason": why}]
    clock.t = t0 + 59.0
    coord.refused(key, why)
    coord.tick()
    assert len(rows()) == 1  # not a minute yet
    clock.t = t0 + 60.0
    coord.refused(key, why)  # the minute is up: this one writes the summary
    summary = rows()[1]
    assert (summary["curve_public"], summary["reason"], summary["repeated"]) == (key, why, 501)
    assert summary["since"] == pytest.approx(t0 + 0.01)
    assert summary["summary"].startswith("refused 501 more times since 1970-")
    coord.refused(key, "revoked: key removed from the allow-list")  # another reason: audited
    assert len(rows()) == 3
    for _ in range(3):
        coord.refused(key, why)
    coord.tick()
    assert len(rows()) == 3
    clock.t += 61.0  # the key has gone quiet: tick writes what is still counted
    coord.tick()
    assert rows()[3]["repeated"] == 3 and len(rows()) == 4
    clock.t += 600.0
    coord.tick()
    assert len(rows()) == 4  # nothing new, nothing written


def test_a_flood_of_distinct_keys_costs_a_bounded_number_of_rows(federation):
    """Every key of a flood of fresh keys is new, so per-key throttling alone would
    cost one row each: past 60 new keys a minute they are counted together under one
    overflow row, summarised a minute later. Memory stays bounded too."""
    import json

    fed = federation(["a"])
    coord, clock = fed.coord, fed.clock
    for _ in range(3):
        coord.refused("first", "unknown key")
    for i in range(1024):
        coord.refused(f"key{i}", "unknown key")
    rows = [json.loads(r["detail"]) for r in coord.store.audit_log(
        action="connection_refused", limit=5000)]
    assert len(rows) == 1 + 59 + 1  # "first", key0-key58, then the overflow row
    assert rows[-1]["overflow"] == "more than 60 new keys in 60 s; counted together"
    assert rows[-1]["last"]["curve_public"] == "key59"
    assert len(coord._refusals) == 61
    clock.t += 61
    coord.tick()
    rows = [json.loads(r["detail"]) for r in coord.store.audit_log(
        action="connection_refused", limit=5000)]
    assert [r.get("repeated") for r in rows if r.get("curve_public") == "first"] == [None, 2]
    (overflow,) = [r for r in rows if "overflow" in r and "repeated" in r]
    assert overflow["repeated"] == 1024 - 60 and overflow["last"]["curve_public"] == "key1023"
    coord.refused("later", "unknown key")  # a new window: new keys are audited again
    assert json.loads(coord.store.audit_log(action="connection_refused",
                                            limit=5000)[-1]["detail"])["curve_public"] == "later"


def test_the_throttle_remembers_a_bounded_number_of_keys_and_audits_what_it_forgets():
    from fedge.coordinator.auditlimit import AuditThrottle

    rows = []
    t = AuditThrottle(lambda actor, action, detail: rows.append(detail), verb="refused",
                      max_keys=3, max_new_keys=100)
    t.event("k1", "transport", "connection_refused", {"k": 1}, 0.0)
    t.event("k1", "transport", "connection_refused", {"k": 1}, 1.0)  # counted
    for k in ("k2", "k3", "k4"):
        t.event(k, "transport", "connection_refused", {"k": k}, 2.0)
    assert len(t) == 3  # k1 forgotten, least recently seen; its count audited as it went
    assert rows == [{"k": 1}, {"k": "k2"}, {"k": "k3"}, {"k": "k4"},
                    {"k": 1, "repeated": 1, "since": 1.0,
                     "summary": "refused 1 more time since 1970-01-01T00:00:01Z"}]


def test_jobs_watch_shows_why_a_round_waits_and_why_the_job_failed(federation):
    """What the ML engineer's `fedge console jobs watch` prints for a plan no site can
    run: the waiting phase with its reason, then the failure with it."""
    from fedge.console.cli import watch_job

    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN.replace('"synthetic"', '"fed_heart"'), actor="test")
    waiting, _ = _wait_then_fail(fed, job)  # job_status as the round waited
    lines: list[str] = []
    seen = iter([waiting, fed.coord.job_status(job)])  # then as it ended
    status = watch_job(lambda op, args: (next(seen), {}), job, interval_s=0, out=lines.append)
    assert status["status"] == "failed"
    assert lines[0] == ("round 1/3: waiting_cohort (0 candidate site(s) of 2 enrolled, "
                        "min_clients 2; excluded: a: does not hold data set 'fed_heart'; "
                        "b: does not hold data set 'fed_heart')")
    assert lines[-1].startswith(f"job {job} failed: ") and "does not hold data set" in lines[-1]


def test_a_site_sending_malformed_messages_in_a_loop_is_answered_each_time_audited_once(
        federation):
    """Each malformed message is answered with Rejected, but only the first of its kind
    is logged and audited in full; the rest become one summary row a minute (written by
    tick once the site goes quiet), not a fsync'd row each."""
    import json

    fed = federation(["a"])
    coord, clock = fed.coord, fed.clock
    for _ in range(500):
        coord.handle_frames("a", [b"\x00not a message"])
    assert [type(o.body) for o in coord.outbox] == [m.Rejected] * 500
    rows = coord.store.audit_log(action="malformed_message")
    assert len(rows) == 1 and rows[0]["actor"] == "a"
    clock.t += 61
    coord.tick()
    rows = coord.store.audit_log(action="malformed_message")
    assert len(rows) == 2
    summary = json.loads(rows[1]["detail"])
    assert summary["repeated"] == 499 and summary["summary"].startswith("rejected 499 more")
    assert summary["reason"].startswith("FrameCountMismatch: frames:")  # the last one
    # another kind of malformation from the same site is audited in full at once
    hb = m.Heartbeat(site="a", version="0.1.0", health_json="{}", eligible=True, reason="",
                     datasets=[], current_task="")
    coord.handle_frames("a", [*(bytes(f) for f in codec.encode(hb, sender="a")),
                              b"x" * (2 << 20)])
    rows = coord.store.audit_log(action="malformed_message")
    assert len(rows) == 3 and "OversizeMessage" in rows[2]["detail"]


def test_after_a_restart_a_site_whose_first_message_is_no_heartbeat_waits_for_one(federation):
    """A restarted coordinator hears from site a first by a late answer, not a heartbeat:
    a is connected but what it speaks is unknown. It is shown as waiting for its first
    heartbeat (no "update the appliance" advice, which would be wrong: it is current),
    and sits in the cohort as soon as that heartbeat comes."""
    fed = federation(["a", "b"])

    async def beat(*sites):
        for s in sites:
            await fed.agents[s].heartbeat()
        while fed.inbox:
            fed.coord.handle_frames(*fed.inbox.pop(0))

    asyncio.run(beat("a", "b"))  # both declared their data sets before the restart
    coord = fed.restart()
    job = coord.submit_job(PLAN.replace("enabled = false", "enabled = true"), actor="test")
    late = codec.encode(m.TaskRefused("t-old", "train", "too late"), sender="a",
                        job="job-old", round=1)
    coord.handle_frames("a", [bytes(f) for f in late])  # stale: rejected, but a is back
    asyncio.run(beat("b"))
    coord.tick()
    assert coord.connected_sites() == {"a", "b"}
    wait = coord.job_status(job)["cohort_wait"]
    assert wait["excluded"] == {"a": "connected, waiting for its first heartbeat"}, wait
    assert "update the appliance" not in wait["summary"]
    asyncio.run(beat("a"))
    coord.tick()
    status = coord.job_status(job)
    assert status["phase"] == "training" and "cohort_wait" not in status
    assert coord.runner.round.cohort == ["a", "b"]


def test_a_wall_clock_step_moves_no_throttle_interval_but_since_shows_the_wall_time(
        federation):
    """The throttle's minute is measured on the monotonic clock: the wall clock stepping
    back an hour neither delays the summary row nor brings it early. Its "since" is
    the wall clock's reading when the first counted refusal came, step included."""
    import json

    from tests.coordinator.conftest import Clock, SteppingWall

    mono = Clock()
    wall = SteppingWall(mono)
    fed = federation(["a"], clock=mono, wall=wall)
    coord, key, why = fed.coord, "K" * 40, "unknown key"

    def rows():
        return [json.loads(r["detail"]) for r in coord.store.audit_log(
            action="connection_refused")]

    t0 = mono.t
    coord.refused(key, why)  # audited in full
    wall.step(-3600.0)
    mono.t += 1.0
    counted_at = wall()  # the first counted refusal's time of day, an hour back
    coord.refused(key, why)
    mono.t = t0 + 59.5
    coord.tick()
    assert len(rows()) == 1  # 59.5 s on the monotonic clock: not a minute yet
    wall.step(+7200.0)  # and forward past the minute: still not due
    coord.tick()
    assert len(rows()) == 1
    mono.t = t0 + 60.0
    coord.tick()  # a minute by the monotonic clock, whatever the wall clock did
    summary = rows()[1]
    assert summary["repeated"] == 1
    assert summary["since"] == pytest.approx(counted_at)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(counted_at))
    assert summary["summary"] == f"refused 1 more time since {stamp}"


def _heard_from(fed, *sites):
    """Each of ``sites`` sends its heartbeat (declaring its data sets) and is handled."""
    async def go():
        for s in sites:
            await fed.agents[s].heartbeat()
    asyncio.run(go())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))


def test_a_job_for_a_data_set_no_site_declares_is_refused_at_submit_naming_theirs(federation):
    """A typo in job.dataset would block the queue for cohort_s x max_failed_attempts:
    once min_clients sites have declared their data sets and none holds the plan's, the
    submission is refused, naming what they declare; nothing is stored."""
    fed = federation(["a", "b", "c"])
    coord = fed.coord
    typo = PLAN.replace('"synthetic"', '"synthetc"')
    job = coord.submit_job(typo, actor="test")  # just started, heard from nobody: taken
    coord.cancel_job(job, actor="test")
    _heard_from(fed, "a")  # one site heard from, below min_clients 2: taken, with a word
    warnings: list[str] = []
    job = coord.submit_job(typo, actor="test", warnings=warnings)
    coord.cancel_job(job, actor="test")
    assert warnings == ["job.dataset 'synthetc' is declared by 0 of the 1 site(s) heard "
                        "from, fewer than job.min_clients = 2 (2 enrolled site(s) not heard "
                        "from yet): unless more sites holding it connect, its rounds wait "
                        "for a cohort and the job fails after 3 attempt(s) of 5 s"]
    _heard_from(fed, "b", "c")
    with pytest.raises(CoordinatorError) as refused:
        coord.submit_job(typo, actor="test")
    assert str(refused.value) == (
        "plan field job.dataset = 'synthetc': no enrolled site declares this data set; the "
        "3 site(s) heard from declare 'synthetic' (a, b, c), and the 0 not heard from yet "
        "could not make job.min_clients = 2 even if they all held it. Nothing was "
        "submitted")
    assert [j["status"] for j in coord.list_jobs()] == ["cancelled", "cancelled"]
    warnings = []
    coord.submit_job(PLAN, actor="test", warnings=warnings)  # held by all three: no word
    assert warnings == []
    coord.submit_job(PLAN.replace("min_clients = 2", "min_clients = 4"), actor="test",
                     warnings=warnings)
    assert warnings == ["job.dataset 'synthetic' is declared by 3 of the 3 site(s) heard "
                        "from (a, b, c), fewer than job.min_clients = 4 (0 enrolled site(s) "
                        "not heard from yet): unless more sites holding it connect, its "
                        "rounds wait for a cohort and the job fails after 3 attempt(s) of "
                        "5 s"]
    coord.revoke("c", actor="test")  # a revoked site's data sets count no more
    coord.revoke("b", actor="test")
    coord.submit_job(typo, actor="test")  # a alone is known now: below min_clients


def test_sites_not_heard_from_that_could_hold_the_data_set_turn_the_refusal_to_a_warning(
        federation):
    """Overnight, two of four sites are up and neither holds the plan's data set: the
    two not heard from could (min_clients 2), so the job is taken, with a word."""
    fed = federation(["a", "b", "c", "d"])
    _heard_from(fed, "a", "b")
    warnings: list[str] = []
    other = PLAN.replace('"synthetic"', '"held_by_c_and_d"')
    fed.coord.submit_job(other, actor="test", warnings=warnings)
    assert warnings == ["job.dataset 'held_by_c_and_d' is declared by 0 of the 2 site(s) "
                        "heard from, fewer than job.min_clients = 2 (2 enrolled site(s) not "
                        "heard from yet): unless more sites holding it connect, its rounds "
                        "wait for a cohort and the job fails after 3 attempt(s) of 5 s"]
    _heard_from(fed, "c")  # d alone is left: it could not make min_clients 2
    with pytest.raises(CoordinatorError, match=r"the 1 not heard from yet could not make "
                                               r"job\.min_clients = 2"):
        fed.coord.submit_job(other, actor="test")


@pytest.mark.parametrize(("delta", "warned"), [(None, False), (1e-5, False), (1e-6, False),
                                               (1e-3, True)])
def test_a_delta_above_1e_5_is_taken_with_a_word_on_which_sites_refuse_it(
        federation, delta, warned):
    """The plan check weighs delta against min_site_examples (the smallest site); each
    site refuses DP-SGD with delta >= 1/n for its own n, which a large site meets."""
    fed = federation(["a", "b"])
    body = "noise_multiplier = 1.0" + (f", delta = {delta}" if delta else "")
    plan = PLAN + f"[privacy]\ndp = {{ {body} }}\n"
    warnings: list[str] = []
    fed.coord.submit_job(plan, actor="test", warnings=warnings)
    said = [w for w in warnings if w.startswith("privacy.dp.delta")]
    assert said == ([f"privacy.dp.delta = {delta:g}: each site refuses DP-SGD when its "
                     "training records number 1/delta = 1000 or more (such a delta allows "
                     "publishing one of them outright); 1e-5 or less suits sites of up to "
                     "100000 records"] if warned else [])


def test_a_jobs_name_data_set_and_model_are_listed_and_a_name_in_use_is_warned_of(
        federation):
    fed = federation(["a", "b"])
    coord = fed.coord
    named = PLAN.replace("[job]\n", '[job]\nname = "sbp baseline"\n')
    warnings: list[str] = []
    first = coord.submit_job(named, actor="alice", warnings=warnings)
    assert warnings == []
    second = coord.submit_job(named, actor="bob", warnings=warnings)  # taken, with a word
    assert warnings == [f"job.name 'sbp baseline' is also the name of 1 queued or running "
                        f"job(s) ({first}): tell them apart by their ids"]
    unnamed = coord.submit_job(PLAN, actor="bob")
    listed = {j["job_id"]: (j["name"], j["dataset"], j["model"]) for j in coord.list_jobs()}
    assert listed == {first: ("sbp baseline", "synthetic", "linear"),
                      second: ("sbp baseline", "synthetic", "linear"),
                      unnamed: ("", "synthetic", "linear")}
    status = coord.job_status(second)
    assert (status["name"], status["dataset"], status["model"]) == ("sbp baseline",
                                                                    "synthetic", "linear")
    coord.cancel_job(first, actor="alice")
    coord.cancel_job(second, actor="bob")
    warnings = []
    coord.submit_job(named, actor="bob", warnings=warnings)  # ended jobs' names are free
    assert warnings == []
    with pytest.raises(PlanError, match=r"job\.name"):
        coord.submit_job(PLAN.replace("[job]\n", "[job]\nname = 7\n"), actor="bob")


def test_who_cancelled_a_running_job_and_when_is_its_reason_and_its_sites_are_told(
        federation):
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="operator:bob")
    sent = []
    fed.kill_hook = lambda site, body: sent.append((site, body)) and False

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.runner is not None
                       and fed.coord.runner.round is not None
                       and fed.coord.runner.round.cohort)
        fed.coord.cancel_job(job, actor="operator:alice")
        cancelled_at = fed.wall()
        await fed.pump(until=lambda: not fed.coord.outbox)
        return cancelled_at
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(asyncio.run(go())))
    reason = f"cancelled by operator:alice at {when}"
    assert fed.coord.store.job(job).error == reason
    status = fed.coord.job_status(job)
    assert (status["status"], status["error"]) == ("cancelled", reason)
    aborts = {s: b.reason for s, b in sent if isinstance(b, m.RoundAbort)}
    assert aborts == {"a": f"job {reason}", "b": f"job {reason}"}
