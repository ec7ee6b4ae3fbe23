"""A job that ends while the coordinator's disk is full: its finish (the ONNX export,
then the report) says why each failed, and is done once the disk has room again,
while the coordinator runs. The finishing task died on its own audit write
(sqlite3 "database or disk is full") before the export's failure was logged and
before the report was tried; asyncio said "Task exception was never retrieved" at
exit, and nothing tried again until the coordinator restarted.

The disk is real: the state directory on its own tmpfs, filled (skipped where one
cannot be mounted). The real serve loop, SQLite, the `fedge export` child and the
report; the job ends through the Coordinator's own hook (on_job_completed)."""

from __future__ import annotations

import asyncio
import logging

from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from fedge.coordinator.service import Coordinator
from tests.coordinator.test_export_on_completion import completed_job
from tests.coordinator.test_s17_disk_queued_job_waits import LOGGER, _config, _until
from tests.update.test_audit_crash_full_disk import fill, small_disk


def test_a_finish_on_a_full_disk_is_logged_and_done_once_there_is_room(
        tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(process, "FINISH_RETRY_S", 0.3)
    job = "job-full"
    with small_disk(tmp_path / "coord", "16m") as state_dir:
        coord = Coordinator(state_dir)
        results = lambda: set(ck.results(state_dir, job))  # noqa: E731

        async def go() -> tuple[set[str], list[str]]:
            stop = asyncio.Event()
            served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                       coordinator=coord))
            assert await _until(lambda: (state_dir / "endpoint").exists(), 10)
            completed_job(state_dir, job)  # its last commit, written while serving
            filler = fill(state_dir)
            coord.on_job_completed(job)  # as the Coordinator calls it at the job's end
            # the finish ends having said why both failed (on a full disk)
            said = await _until(lambda: any("report failed" in r.getMessage()
                                            for r in caplog.records), 120)
            assert said, [r.getMessage() for r in caplog.records]
            await asyncio.sleep(1.0)  # a few of FINISH_RETRY_S: still full, tried again
            during = results()
            filler.unlink()  # room again: no restart
            done = await _until(lambda: {"model.onnx", "report.md", "report.json"}
                                <= results(), 120)
            actions = [a["action"] for a in coord.store.audit_log()]
            stop.set()
            assert await served == 0  # which closes the database
            assert done, results()
            return during, actions

        try:
            with caplog.at_level(logging.INFO, logger=LOGGER):
                during, actions = asyncio.run(go())
        finally:
            coord.close()
    assert "model.onnx" not in during and "report.md" not in during
    lines = [r.getMessage() for r in caplog.records]
    failed = [t for t in lines if t.startswith(f"job {job}: ONNX export failed: ")]
    assert failed, lines  # the export's reason, logged although its audit failed
    assert any(t.startswith(f"model_export_failed of job {job} not written to the "
                            f"database {coord.store.path}: OperationalError: ")
               for t in lines), lines
    assert any(t.startswith(f"job {job}: report failed: ") for t in lines), lines
    assert any(t.startswith(f"ended job(s) {job}: results not all written; finishing "
                            "again") for t in lines), lines
    # once written, the records are there too
    assert "model_exported" in actions and "report_written" in actions, actions
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_finish_task_that_raises_is_logged_naming_its_job(tmp_path, caplog):
    """What escapes a finish (here: a job the database does not know) is logged by the
    task's done-callback, naming the job, not left for asyncio to say at exit."""
    coord = Coordinator(tmp_path / "coord")

    async def go() -> None:
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                   coordinator=coord))
        assert await _until(lambda: (coord.state_dir / "endpoint").exists(), 10)
        coord.on_job_completed("no-such-job")
        said = await _until(lambda: any("no-such-job failed" in r.getMessage()
                                        for r in caplog.records), 10)
        stop.set()
        assert await served == 0
        assert said, [r.getMessage() for r in caplog.records]

    try:
        with caplog.at_level(logging.INFO, logger=LOGGER):
            asyncio.run(go())
    finally:
        coord.close()
    (line,) = [r for r in caplog.records if "no-such-job failed" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert line.getMessage().startswith(
        "writing the ONNX model and report of job no-such-job failed: StoreError: "), line
