"""A coordinator stopped (SIGTERM's stop) while a job's finish runs its ONNX export
child: the child is killed and waited for before serve returns, nothing is written
into the job directory afterwards, and the next start finishes the job.

serve's finally cancelled neither its finishes nor their children: asyncio.run
cancelled the finish after serve had closed the database, inside the child's
communicate(), and nothing killed or waited for the child. It outlived the event loop
("Loop ... that handles pid N is closed") and wrote model.onnx seconds after serve
returned, its outcome never audited.

The real serve loop, SQLite and `fedge export` child (torch: several seconds, which is
what leaves the stop time to arrive while it runs); the children are read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from fedge.coordinator.service import Coordinator
from tests.coordinator.test_export_on_completion import completed_job
from tests.coordinator.test_s17_disk_queued_job_waits import _config, _until

JOB = "job-stop"


def _children() -> list[int]:
    """This process's children that run fedge.coordinator.child (zombies included:
    a child not waited for is one)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == me and b"fedge.coordinator.child" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_stop_during_an_export_kills_its_child_and_the_next_start_finishes_the_job(
        tmp_path):
    state_dir = tmp_path / "coord"
    completed_job(state_dir, JOB)  # ended, no model.onnx nor report: finished at start
    job_dir = ck.job_dir(state_dir, JOB)
    coord = Coordinator(state_dir)

    async def stopped_while_exporting() -> tuple[int, list[int]]:
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                   coordinator=coord))
        assert await _until(_children, 30), "the export child never started"
        assert "model.onnx" not in ck.results(state_dir, JOB)  # still exporting
        stop.set()  # as SIGTERM does
        code = await asyncio.wait_for(served, 30)
        return code, _children()  # when serve has returned, before asyncio.run ends

    try:
        code, left = asyncio.run(stopped_while_exporting())
        assert code == 0
        assert left == [], f"export child(ren) {left} outlived serve"
        assert _children() == []
        # nothing written into the job directory after the stop (the child took several
        # seconds to write model.onnx after the loop closed)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert "model.onnx" not in ck.results(state_dir, JOB)
            time.sleep(0.1)
    finally:
        for pid in _children():  # old code: the child is not left to write on
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # asyncio's child watcher thread reaps it
        for _ in range(100):
            if not _children():
                break
            time.sleep(0.05)
        coord.close()

    # cut short, not failed: the job is still unfinished, and no export failure counts
    # towards admin.export_given_up
    again = Coordinator(state_dir)
    try:
        assert process.unfinished_jobs(again) == [JOB]
        actions = [a["action"] for a in again.store.audit_log()]
        assert "model_export_failed" not in actions, actions
    finally:
        again.close()

    # the next start finishes it
    second = Coordinator(state_dir)
    wanted = {"model.onnx", "report.md", "report.json"}

    async def restarted() -> bool:
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(_config(second), stop=stop,
                                                   coordinator=second))
        done = await _until(lambda: wanted <= set(ck.results(state_dir, JOB)), 120)
        stop.set()
        assert await served == 0
        return done

    try:
        assert asyncio.run(restarted()), sorted(p.name for p in job_dir.iterdir())
    finally:
        second.close()
    third = Coordinator(state_dir)
    try:
        assert process.unfinished_jobs(third) == []
        assert "model_exported" in [a["action"] for a in third.store.audit_log()]
    finally:
        third.close()
