"""A queued job whose turn comes on a full disk that holds both the coordinator's state
directory and its temp directory (the .deb's default: /var/lib/fedge-coordinator and
PrivateTmp's /tmp on one file system) waits for room, as one whose temp directory is
elsewhere does. It was failed for good: the starting model went through a file in
$TMPDIR, and the child's failure to write it came back as the model not being
buildable ("plan field model = 'cox_mlp': cannot be built: initmodel: cannot write
/tmp/fedge-init-.../w.npy: 1091585 requested and 523232 written"). The weights now
come back through a pipe: the only write is the round-0 checkpoint, named when it
cannot be made.

The full disk is real: one tmpfs with 2 MB left and a 4.4 MB starting model, $TMPDIR
on it (skipped where a tmpfs cannot be mounted). Real SQLite and the model built in
its child process."""

from __future__ import annotations

import asyncio
import logging
import tempfile

from fedge.coordinator import checkpoint as ck
from fedge.coordinator import process
from fedge.coordinator.service import Coordinator
from tests.coordinator.test_s15_joblog_lines import LOGGER, lines
from tests.coordinator.test_s17_disk_export_retried import BIG_PLAN, leave_free
from tests.update.test_audit_crash_full_disk import small_disk


def test_a_queued_job_waits_when_its_temp_dir_is_on_the_full_disk(tmp_path, caplog,
                                                                   monkeypatch):
    with small_disk(tmp_path / "disk", "16m") as disk:
        tmp = disk / "tmp"
        tmp.mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp))
        monkeypatch.setattr(tempfile, "tempdir", None)
        coord = Coordinator(disk / "state")
        try:
            job = coord.submit_job(BIG_PLAN, actor="test")
            filler = leave_free(disk, 2 << 20)
            wait = process._DiskWait()
            with caplog.at_level(logging.INFO, logger=LOGGER):
                asyncio.run(process._prepare_initial_model(coord, wait))
                during = coord.store.job(job)
                filler.unlink()  # room again: the same job's model is written
                wait.retry_at = float("-inf")
                asyncio.run(process._prepare_initial_model(coord, wait))
            round0 = ck.round_path(coord.state_dir, job, 0)
            assert (during.status, during.error) == ("queued", ""), during
            (line,) = lines(caplog, f"job {job} waits", level=logging.ERROR)
            assert f"cannot be written to {round0}: No space left on device;" in line, line
            assert str(tmp) not in caplog.text
            assert ck.load_checkpoint(round0).round == 0
            assert coord.store.job(job).status == "queued" and wait.job_id == ""
        finally:
            coord.close()
