"""A queued job whose turn comes while the coordinator's disk cannot take its starting
model (full: ENOSPC) stays queued, is said once in one line naming the file and the
cause, and starts once there is room, tried again every FINISH_RETRY_S as a round's
commit is; the jobs queued behind it are not failed either. It was failed for good
("cannot prepare the starting model ...: No space left on device"), and every queued
job after it the same way, one after the other. A plan whose model cannot be built
still fails.

The full disk is real: the state directory on its own tmpfs with 2 MB left and a
4.4 MB starting model (skipped where a tmpfs cannot be mounted). The real serve loop,
SQLite, and the model built in its child process."""

from __future__ import annotations

import asyncio
import logging

from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.service import Coordinator
from fedge.transport import CurveKeyPair
from tests.coordinator.test_s17_disk_export_retried import BIG_PLAN, leave_free
from tests.update.test_audit_crash_full_disk import small_disk

LOGGER = "fedge.coordinator"


def _config(coord: Coordinator) -> CoordinatorConfig:
    keys = CurveKeyPair.generate()
    return CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                             b"", b"", tick_s=0.02)


async def _until(cond, timeout_s: float) -> bool:
    for _ in range(int(timeout_s / 0.05)):
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


def test_a_queued_job_waits_for_room_for_its_starting_model(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(process, "FINISH_RETRY_S", 0.5)
    with small_disk(tmp_path / "coord", "16m") as state_dir:
        coord = Coordinator(state_dir)  # the starting model built by torch, in a child
        first = coord.submit_job(BIG_PLAN, actor="test")
        second = coord.submit_job(BIG_PLAN, actor="test")
        filler = leave_free(state_dir, 2 << 20)
        round0 = ck.round_path(state_dir, first, 0)

        async def go():
            stop = asyncio.Event()
            served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                       coordinator=coord))
            # the first try builds the model (~2 s) and cannot write it; it waits
            assert await _until(lambda: len(waits()) >= 1, 30), caplog.text
            await asyncio.sleep(3.0)
            during = [(coord.store.job(j).status, coord.store.job(j).error)
                      for j in (first, second)]
            filler.unlink()  # room again
            started = await _until(lambda: coord.store.job(first).status == "running", 30)
            stop.set()
            assert await served == 0
            return during, started

        def waits():
            return [r.getMessage() for r in caplog.records
                    if r.name == LOGGER and r.levelno == logging.ERROR]

        with caplog.at_level(logging.INFO, logger=LOGGER):
            during, started = asyncio.run(go())
    assert during == [("queued", ""), ("queued", "")]
    assert started
    (line,) = waits()
    assert line == (f"job {first} waits: its starting model cannot be written to {round0}: "
                    "No space left on device; tried again in 0.5 s, then at twice the last "
                    "pause each time (up to 300 s), and not before the disk has room for it; "
                    "the job left queued")
    written = [r.getMessage() for r in caplog.records if "waiting for the disk" in
               r.getMessage()]
    assert len(written) == 1 and written[0].startswith(
        f"job {first}: its starting model {round0} written after "), written


def test_a_plan_whose_model_cannot_be_built_still_fails(tmp_path):
    coord = Coordinator(tmp_path / "coord")
    try:
        job = coord.store.create_job(
            "job-bad", BIG_PLAN.replace("params = { in_features = 39, hidden = [1024, 1024] }",
                                        ""), actor="test").job_id
        asyncio.run(process._prepare_initial_model(coord))
        j = coord.store.job(job)
        assert j.status == "failed" and "in_features" in j.error, j
    finally:
        coord.close()
