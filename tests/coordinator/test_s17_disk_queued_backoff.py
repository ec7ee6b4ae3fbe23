"""A queued job whose starting model the disk cannot take waits (3bbc2b5) without
rebuilding the model at every try, and without trying every few seconds for ever: the
model built once is kept for the next try; on a full disk no try is made until the
disk has the model's size free (os.statvfs); a disk that refuses it for another
cause (read-only, failing) is tried again after a pause that doubles each time, up to
DISK_WAIT_MAX_S. A torch child was started every FINISH_RETRY_S (10 s) for as long as
the wait lasted, for ever on a permanent EIO.

The disks are real: a 16 MB tmpfs with 2 MB left and a 4.4 MB starting model; a tmpfs
mounted read-only where the job's directory is (EROFS). Skipped where a tmpfs cannot
be mounted. The real serve loop, SQLite, and the model built in its child process,
whose starts are counted."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time

import pytest

from fedge.coordinator import checkpoint as ck
from fedge.coordinator import initmodel, process
from fedge.coordinator.service import Coordinator
from tests.coordinator.test_s17_disk_export_retried import BIG_PLAN, leave_free
from tests.coordinator.test_s17_disk_queued_job_waits import LOGGER, _config, _until
from tests.update.test_audit_crash_full_disk import small_disk


@pytest.fixture
def children(monkeypatch) -> list[float]:
    """When each starting model's child was started (the real one runs)."""
    started: list[float] = []
    real = initmodel.initial_weights_subprocess

    def counted(plan, **kwargs):
        started.append(time.monotonic())
        return real(plan, **kwargs)

    monkeypatch.setattr(initmodel, "initial_weights_subprocess", counted)
    return started


def test_on_a_full_disk_the_model_is_built_once_and_not_tried_until_there_is_room(
        tmp_path, caplog, monkeypatch, children):
    monkeypatch.setattr(process, "FINISH_RETRY_S", 0.2)
    tries: list[str] = []
    real_save = ck.save_checkpoint

    def save(path, ckpt):
        tries.append(str(path))
        return real_save(path, ckpt)

    monkeypatch.setattr(ck, "save_checkpoint", save)
    with small_disk(tmp_path / "coord", "16m") as state_dir:
        coord = Coordinator(state_dir)
        job = coord.submit_job(BIG_PLAN, actor="test")
        filler = leave_free(state_dir, 2 << 20)
        round0 = str(ck.round_path(state_dir, job, 0))

        async def go():
            stop = asyncio.Event()
            served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                       coordinator=coord))
            assert await _until(lambda: tries.count(round0) == 1 and coord.start_wait, 30)
            await asyncio.sleep(3.0)  # 15 of FINISH_RETRY_S: the disk still full
            during = (len(children), tries.count(round0), coord.store.job(job).status)
            filler.unlink()  # room again: written from the model kept, no new child
            started = await _until(lambda: coord.store.job(job).status == "running", 10)
            stop.set()
            assert await served == 0
            return during, started

        with caplog.at_level(logging.INFO, logger=LOGGER):
            during, started = asyncio.run(go())
    assert during == (1, 1, "queued")
    assert started and len(children) == 1 and tries.count(round0) == 2


def test_a_read_only_disk_is_tried_again_less_and_less_often(tmp_path, monkeypatch,
                                                             children, caplog):
    monkeypatch.setattr(process, "FINISH_RETRY_S", 0.1)
    monkeypatch.setattr(process, "DISK_WAIT_MAX_S", 0.4, raising=False)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only tmpfs (a real EROFS)")
    coord = Coordinator(tmp_path / "coord")
    job = coord.submit_job(BIG_PLAN, actor="test")
    job_dir = ck.round_path(coord.state_dir, job, 0).parent
    job_dir.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(job_dir)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        coord.close()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        wait = process._DiskWait()
        pauses = []
        for _ in range(4):
            deadline = time.monotonic() + 5
            while not wait.due(job, time.monotonic()):
                assert time.monotonic() < deadline, wait
                time.sleep(0.02)
            with caplog.at_level(logging.INFO, logger=LOGGER):
                asyncio.run(process._prepare_initial_model(coord, wait))
            failed_at = time.monotonic()
            pauses.append(round(wait.retry_at - failed_at, 1))
        assert coord.store.job(job).status == "queued"
        assert coord.start_wait == (job, "Read-only file system: its starting model cannot "
                                         f"be written to {job_dir / 'round-0.safetensors'}")
    finally:
        subprocess.run(["umount", "-l", str(job_dir)], check=False)
        coord.close()
    assert pauses == [0.1, 0.2, 0.4, 0.4]
    assert len(children) == 1  # the model built once, kept for each try
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.endswith("Read-only file system; tried again in 0.1 s, then at twice the "
                         "last pause each time (up to 0.4 s); the job left queued"), line
