"""A queued job whose starting model the coordinator's disk cannot take waits (s17
3bbc2b5), and the console now says so: `jobs list` shows it "queued (waiting: why)",
`jobs status` has ``start_wait`` (why, the file named), and `jobs watch` says it is
blocked, of it and of a job queued behind it. Only STATUS= and the journal said it;
the console showed a plain "queued".

A real coordinator (SQLite, its admin channel on loopback) whose state directory is a
16 MB tmpfs with 2 MB left (skipped where a tmpfs cannot be mounted), the starting model
(4.4 MB) built in its child process as the coordinator process does it, and the real
CLI."""

from __future__ import annotations

import asyncio
import json

from fedge.cli import main
from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from tests.coordinator.test_s17_disk_export_retried import BIG_PLAN, leave_free
from tests.update.test_audit_crash_full_disk import small_disk


def test_a_job_waiting_for_the_disk_is_said_so_by_list_status_and_watch(
        tmp_path, make_server, capsys):
    with small_disk(tmp_path / "coordinator", "16m") as state_dir:
        server = make_server()
        base = ["console", "--home", str(server.console.home), "--timeout", "5"]
        plan = tmp_path / "plan.toml"
        plan.write_text(BIG_PLAN)
        assert main([*base, "jobs", "submit", str(plan)]) == 0
        job = capsys.readouterr().out.strip()
        assert main([*base, "jobs", "submit", str(plan)]) == 0
        behind = capsys.readouterr().out.strip()
        filler = leave_free(state_dir, 2 << 20)
        wait = process._DiskWait()

        def prepare() -> None:  # on the coordinator's loop, as its process does
            asyncio.run_coroutine_threadsafe(
                process._prepare_initial_model(server.coordinator, wait),
                server.loop).result(60)

        prepare()
        round0 = ck.round_path(state_dir, job, 0)
        why = f"No space left on device: its starting model cannot be written to {round0}"

        assert main([*base, "--operator", "viewer", "jobs", "status", job]) == 0
        status = json.loads(capsys.readouterr().out)
        assert (status["status"], status["start_wait"]) == ("queued", why), status

        assert main([*base, "--operator", "viewer", "jobs", "list"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
        assert f"  queued (waiting: {why[:69]}…)  " in rows[job], rows[job]  # cut at 70
        assert "  queued  " in rows[behind] and "waiting" not in rows[behind], rows[behind]

        assert main([*base, "--operator", "viewer", "jobs", "watch", job, "--interval",
                     "0.1", "--max-wait", "0.3"]) == 3
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == (f"job {job} blocked: waiting for the disk: {why} (the "
                           "coordinator tries again; jobs queued behind it wait)"), out
        assert main([*base, "--operator", "viewer", "jobs", "watch", behind, "--interval",
                     "0.1", "--max-wait", "0.3"]) == 3
        assert capsys.readouterr().out.splitlines() == [
            f"job {behind} queued: 1 job(s) ahead of it ({job} is blocked: waiting for the "
            f"disk: {why})"]

        filler.unlink()  # room again: its model is written, the wait is over
        wait.retry_at = float("-inf")
        prepare()
        assert round0.exists()
        assert main([*base, "--operator", "viewer", "jobs", "status", job]) == 0
        assert "start_wait" not in json.loads(capsys.readouterr().out)
        assert main([*base, "--operator", "viewer", "jobs", "list"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
        assert "  queued  " in rows[job] and "waiting" not in rows[job], rows[job]
