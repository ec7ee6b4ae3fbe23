"""What keeps a job from going on is said by the console (review s16 M3 and L6):

- `jobs watch` prints a job's resume_error (its checkpoint cannot be read after a
  restart), and commit_error/finish_error the same way, when it appears; `jobs list`
  shows such a job as "running (blocked: …)"; the watch of a job queued behind it
  says the one ahead is blocked, not only running;
- `jobs watch` prints the sites the coordinator sidelined after a failed attempt and
  the pause before the next attempt, as it prints contested sites;
- a queued job's watch says its place in the queue again each time it changes, and
  "started" when it leaves the queue.

A real coordinator (SQLite, its admin channel on loopback, its own resume of a job
from a truncated checkpoint) and the real CLI; the retry case through the real
coordinator and agents in memory (tests/coordinator's InProcFederation), the
console's calls going to the admin service's handler."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from fedge.cli import main
from fedge.console.cli import WatchGaveUp, watch_job
from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import AdminService, Operator
from tests.console.test_s16_watch_exit_codes import PLAN, _submitted
from tests.coordinator.conftest import InProcFederation
from tests.coordinator.test_attempt_backoff import PLAN as RETRY_PLAN
from tests.coordinator.test_attempt_backoff import broken_site, failed_attempts, settle


def _cannot_resume(server, job: str) -> str:
    """Leave `job` as a coordinator restarted after round 1 of 3 committed finds it
    when the round's checkpoint was cut short by a crash, and let the coordinator try
    to resume it. Returns the resume error jobs_status reports."""
    coord = server.coordinator

    def commit_then_truncate() -> None:
        text = coord.store.job(job).plan_toml
        path = ck.round_path(coord.state_dir, job, 1)
        digest = ck.save_checkpoint(path, ck.Checkpoint(
            weights=np.zeros(4, np.float32), round=1, plan=text))
        coord.store.set_job_status(job, "running", actor="test")
        coord.store.commit_round(job, 1, started_at=time.time() - 5, cohort=["h1", "h2"],
                                 survivors=["h1", "h2"], dropped=[], model_digest=digest,
                                 metrics=[("*", "val", "c_index", 0.61, 20)])
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        coord.tick()  # no job runs: it tries to resume this one, and cannot

    server.call_in_loop(commit_then_truncate)
    error = coord.job_status(job).get("resume_error")
    assert error and "round-1.safetensors" in error, error
    return error


def test_a_job_that_cannot_resume_is_said_blocked_by_watch_list_and_the_queue(
        tmp_path, make_server, capsys):
    server = make_server()
    base, ended = _submitted(tmp_path, server, capsys)
    server.call_in_loop(lambda: server.coordinator.store.set_job_status(
        ended, "cancelled", actor="test"))  # an ended job: not ahead of any
    plan = tmp_path / "three.toml"
    plan.write_text(PLAN.replace("rounds = 1", "rounds = 3"))
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    job = capsys.readouterr().out.strip()
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    behind = capsys.readouterr().out.strip()
    error = _cannot_resume(server, job)

    assert main([*base, "--operator", "viewer", "jobs", "watch", job, "--interval", "0.1",
                 "--max-wait", "0.5"]) == 3
    got = capsys.readouterr()
    assert got.out.splitlines()[-1] == (
        f"job {job} blocked: cannot resume: {error} (the coordinator tries again; jobs "
        "queued behind it wait)"), got.out
    assert got.out.count("blocked") == 1  # said once, not at each poll
    assert f"still running (round 1 of 3 committed) after 0.5 s; blocked: cannot " \
           f"resume: {error}" in got.err

    assert main([*base, "--operator", "viewer", "jobs", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "running (blocked: cannot resume: checkpoint " in rows[job], rows[job]
    assert " queued " in rows[behind] and "blocked" not in rows[behind]

    assert main([*base, "--operator", "viewer", "jobs", "watch", behind, "--interval",
                 "0.1", "--max-wait", "0.3"]) == 3
    assert capsys.readouterr().out.splitlines() == [
        f"job {behind} queued: 1 job(s) ahead of it (running: {job}; {job} is blocked: "
        f"cannot resume: {error})"]


def test_a_queued_jobs_place_is_said_again_as_it_changes_and_its_start(
        tmp_path, make_server, capsys, monkeypatch):
    monkeypatch.setattr("fedge.console.cli.QUEUE_POLL_S", 0.0)  # the queue each poll
    server = make_server()
    base, first = _submitted(tmp_path, server, capsys)
    plan = tmp_path / "plan.toml"
    ids = [first]
    for _ in range(2):
        assert main([*base, "jobs", "submit", str(plan)]) == 0
        ids.append(capsys.readouterr().out.strip())
    first, second, third = ids
    admin, viewer = server.client("admin"), server.client("viewer")
    polls = {"n": 0}

    def polled(op, args):
        if op == "jobs_status" and args["job_id"] == third:
            polls["n"] += 1
            if polls["n"] == 3:  # the first job ahead goes
                admin.call("jobs_cancel", {"job_id": first})
            if polls["n"] == 6:  # and the second: this one runs
                admin.call("jobs_cancel", {"job_id": second})
                server.call_in_loop(lambda: server.coordinator.store.set_job_status(
                    third, "running", actor="test"))
        return viewer.call(op, args)

    lines: list[str] = []
    with pytest.raises(WatchGaveUp):
        watch_job(polled, third, interval_s=0.05, max_wait_s=1.0, out=lines.append,
                  results_wait_s=0)
    assert lines == [f"job {third} queued: 2 job(s) ahead of it",
                     f"job {third} queued: 1 job(s) ahead of it",
                     f"job {third} started"], lines


def test_watch_prints_the_sidelined_site_and_the_pause_before_the_next_attempt(tmp_path):
    # min_clients 3 of 3, c cannot save its privacy ledger: round 1's attempt fails,
    # c is sidelined, and the next attempt waits RETRY_BACKOFF_S
    fed = InProcFederation(tmp_path / "coord", ["a", "b", "c"])
    try:
        broken_site(fed, "c", tmp_path)

        async def go() -> str:
            await fed.heartbeats()
            job = fed.coord.submit_job(RETRY_PLAN.format(min_clients=3), actor="test")
            await fed.pump(until=lambda: failed_attempts(fed, job), max_steps=400)
            await settle(fed)
            return job

        job = asyncio.run(go())
        service = AdminService(fed.coord, {"k": Operator("eng", "viewer")},
                               send=lambda site, body: None)

        def call(op, args):
            reply = service.handle("k", AdminRequest(op, json.dumps(args), {}))
            assert reply.ok, reply.error
            return json.loads(reply.result_json), {}

        status = fed.coord.job_status(job)
        lines: list[str] = []
        with pytest.raises(WatchGaveUp):  # the federation's clock does not move
            watch_job(call, job, interval_s=0.02, max_wait_s=0.3, out=lines.append,
                      results_wait_s=0)
        in_s = status["retry"]["in_s"]
        assert f"round 1/3: 1 failed attempt(s) of at most 3; the next opens in " \
               f"{in_s:.0f} s" in lines, lines
        sidelined = [ln for ln in lines if "sidelined" in ln]
        assert sidelined == [f"  sidelined c: {status['sidelined']['c']}"], lines
        assert status["sidelined"]["c"].startswith("left out after attempt 1 at round 1")
        # the pause's own line, not the phase's: its reason is the failed attempt's line
        assert not any(ln.startswith("round 1/3: retrying") for ln in lines), lines
    finally:
        fed.pool.shutdown(wait=True)
        fed.coord.close()


def test_a_queued_jobs_watch_asks_the_queue_once_per_queue_poll(tmp_path, make_server,
                                                                capsys):
    # diff review 2 s16 L4: the watch asked jobs_list (every stored plan parsed on the
    # coordinator's loop: 0.18 s at 1,000 jobs) at every poll of a queued job
    server = make_server()
    base, _ = _submitted(tmp_path, server, capsys)
    assert main([*base, "jobs", "submit", str(tmp_path / "plan.toml")]) == 0
    behind = capsys.readouterr().out.strip()
    viewer = server.client("viewer")
    asked: list[str] = []

    def counted(op, args):
        asked.append(op)
        return viewer.call(op, args)

    lines: list[str] = []
    with pytest.raises(WatchGaveUp):
        watch_job(counted, behind, interval_s=0.02, max_wait_s=1.0, out=lines.append,
                  results_wait_s=0)
    assert asked.count("jobs_status") >= 10
    assert asked.count("jobs_list") == 1, asked.count("jobs_list")
    assert lines[0].startswith(f"job {behind} queued: 1 job(s) ahead of it")
