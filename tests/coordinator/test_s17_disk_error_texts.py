"""What the coordinator records and logs when the disk refuses a write names the file
(or the database) and leads with the cause: a write's ENOSPC names no file by itself
("OSError: [Errno 28] No space left on device" was all job_finish_failed and
report_failed said), "coordinator tick failed ... database or disk is full" did not name
the database as its sibling lines do, and an attempt that failed because the survivor
set of its unmasking could not be recorded was recorded as "ReconstructionFailed:
cannot recover the secret of 'a': 0 shares given ...", the cause last (and cut).

The failures are real: the jobs directory on its own full tmpfs (skipped where a tmpfs
cannot be mounted), SQLite out of pages (test_disk_faults.fill_database)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time

import numpy as np

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.process import serve, write_report
from fedge.coordinator.rounds import Phase
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store
from fedge.transport import CurveKeyPair
from tests.coordinator.test_disk_faults import PLAN, fill_database
from tests.coordinator.test_export_on_completion import completed_job
from tests.coordinator.test_federation_inproc import plan as secure_plan
from tests.update.test_audit_crash_full_disk import fill, small_disk

LOGGER = "fedge.coordinator"
ENOSPC = "OSError: [Errno 28] No space left on device"


def _last_round_committed(state_dir, job: str) -> None:
    """A one-round job as a coordinator killed after its last commit leaves it: the
    round recorded and its checkpoint written, the job still running."""
    text = PLAN.replace("rounds = 3", "rounds = 1")
    ckpt = ck.Checkpoint(weights=np.linspace(-1, 1, 8, dtype=np.float32), round=1, plan=text)
    digest = ck.save_checkpoint(ck.round_path(state_dir, job, 1), ckpt)
    store = Store(state_dir)
    try:
        store.create_job(job, text, actor="test")
        store.set_job_status(job, "running", actor="test")
        store.commit_round(job, 1, started_at=time.time() - 5, cohort=["a", "b"],
                           survivors=["a", "b"], dropped=[], model_digest=digest, metrics=[])
    finally:
        store.close()


def test_a_final_model_the_disk_cannot_take_is_named_with_its_file(tmp_path, caplog):
    state_dir = tmp_path / "coord"
    with small_disk(state_dir / "jobs", "1m") as jobs:
        _last_round_committed(state_dir, "job-f")
        fill(jobs)
        coord = Coordinator(state_dir, initial_weights=lambda plan: np.zeros(8, np.float32))
        try:
            with caplog.at_level(logging.ERROR, logger=LOGGER):
                coord.tick()  # resumes the job: all rounds committed, so it finishes it
            final = ck.final_path(state_dir, "job-f")
            expected = f"cannot write {final}: {ENOSPC}"
            assert coord.job_status("job-f")["finish_error"] == expected
            (audited,) = coord.store.audit_log(action="job_finish_failed")
            assert json.loads(audited["detail"])["error"] == expected
            assert any(expected in r.getMessage() for r in caplog.records)
        finally:
            coord.close()


def test_a_report_the_disk_cannot_take_is_named_with_its_directory(tmp_path):
    state_dir = tmp_path / "coord"
    with small_disk(state_dir / "jobs", "1m") as jobs:
        completed_job(state_dir, "job-r")
        fill(jobs)
        coord = Coordinator(state_dir, initial_weights=lambda plan: np.zeros(8, np.float32))
        try:
            assert asyncio.run(write_report(coord, "job-r")) is False
            (failed,) = coord.store.audit_log(action="report_failed")
            reason = json.loads(failed["detail"])["reason"]
            assert reason.startswith(
                f"cannot write the report in {ck.job_dir(state_dir, 'job-r')}: "), reason
            assert "No space left on device" in reason, reason
        finally:
            coord.close()


def test_a_tick_the_database_refuses_names_the_database(tmp_path, caplog):
    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8, np.float32))
    job = coord.submit_job(PLAN, actor="test")
    ck.save_checkpoint(ck.round_path(coord.state_dir, job, 0),
                       ck.Checkpoint(weights=np.zeros(8, np.float32), round=0, plan=PLAN))
    fill_database(coord.store)
    keys = CurveKeyPair.generate()
    cfg = CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                            b"", b"", tick_s=0.02)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        await asyncio.sleep(0.5)
        stop.set()
        return await served

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert asyncio.run(go()) == 0
    (line,) = [r.getMessage() for r in caplog.records if "tick failed" in r.getMessage()]
    assert line == ("coordinator tick failed, retried every tick (next report in 10 s): "
                    f"database {coord.store.path}: OperationalError: database or disk is "
                    "full"), line


def _tolerant(call):
    """As the coordinator process runs a tick or a message: a write the database
    refuses (full) is logged there and tried again, not raised."""
    def run(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except sqlite3.OperationalError:
            return None
    return run


def test_an_attempt_failed_for_want_of_its_survivor_set_record_says_so_first(federation):
    fed = federation(["a", "b", "c"])
    coord = fed.coord
    coord.tick = _tolerant(coord.tick)
    coord.handle_frames = _tolerant(coord.handle_frames)
    job = coord.submit_job(secure_plan(rounds=1), actor="test")

    def aggregating():
        rnd = coord.runner.round if coord.runner is not None else None
        return rnd is not None and rnd.phase is Phase.AGGREGATING

    def attempt_failed():
        rnd = coord.runner.round if coord.runner is not None else None
        return rnd is not None and rnd.phase is Phase.FAILED

    async def go():
        await fed.heartbeats()
        await fed.pump(until=aggregating)
        give_room = fill_database(coord.store)  # the disk fills as the sum is formed
        await fed.pump(until=attempt_failed)  # the stage deadline, nobody asked to unmask
        give_room()
        await fed.pump(until=lambda: bool(coord.store.rounds(job)))

    asyncio.run(go())
    (attempt,) = coord.store.rounds(job)
    assert attempt.status == "failed"
    assert attempt.reason.startswith(
        "the survivor set of this attempt's unmasking could not be recorded (database "
        f"{coord.store.path}: OperationalError: database or disk is full), so no site was "
        "asked to unmask: aggregation failed: ReconstructionFailed: "), attempt.reason
    assert attempt.reason.count("could not be recorded") == 1, attempt.reason
