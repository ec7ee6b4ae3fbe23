"""An ended job's ONNX export that failed (for want of space, say) while its smaller
report was written is tried again when the coordinator next starts, and the report is
written again after it; until then `jobs fetch` says that a restart tries it again. It
was never tried again: the job counted as finished once its report was there.

The full disk is real: the coordinator's state directory on its own tmpfs with 2 MB
left, a 4.4 MB model to export (skipped where a tmpfs cannot be mounted). Real SQLite,
the real `fedge export` child and report."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.process import _resume_finishing, finish_job, unfinished_jobs
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store
from tests.coordinator.test_export_on_completion import completed_job
from tests.update.test_audit_crash_full_disk import small_disk

# cox_mlp with two hidden layers of 1024: 1,091,585 weights, a 4.4 MB model and export
BIG_PLAN = """
[job]
dataset = "brca"
rounds = 1
[model]
name = "cox_mlp"
params = { in_features = 39, hidden = [1024, 1024] }
[train]
steps = 1
batch_size = 4
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def _coordinator(state_dir: Path) -> Coordinator:
    return Coordinator(state_dir, initial_weights=lambda plan: np.zeros(5, np.float32))


def fetch_note(coord: Coordinator, job: str) -> str:
    service = AdminService(coord, {"k": Operator("eng", "viewer")})
    reply = service.handle("k", AdminRequest("jobs_fetch", json.dumps({"job_id": job}), {}))
    assert reply.ok, reply.error
    return json.loads(reply.result_json).get("note", "")


def test_a_job_with_its_report_but_no_onnx_export_is_unfinished(tmp_path):
    completed_job(tmp_path, "job-e")
    coord = _coordinator(tmp_path)
    try:
        # its report written, its export not (it failed): not finished
        from fedge.coordinator.process import write_report

        assert asyncio.run(write_report(coord, "job-e")) is True
        assert "model.onnx" not in ck.results(tmp_path, "job-e")
        assert unfinished_jobs(coord) == ["job-e"]
    finally:
        coord.close()


def _big_completed_job(state_dir: Path, job: str) -> None:
    """completed_job's records, with BIG_PLAN's model (round 1 and final checkpoints)."""
    from fedge.train.api import ModelSpec, build_model, flatten

    weights = flatten(build_model(ModelSpec("cox_mlp", {"in_features": 39,
                                                        "hidden": [1024, 1024]})))
    ckpt = ck.Checkpoint(weights=weights, round=1, plan=BIG_PLAN,
                         metrics={"test/c_index": 0.7})
    digest = ck.save_checkpoint(ck.round_path(state_dir, job, 1), ckpt)
    ck.save_checkpoint(ck.final_path(state_dir, job), ckpt)
    store = Store(state_dir)
    try:
        store.create_job(job, BIG_PLAN, actor="test")
        store.set_job_status(job, "running", actor="test")
        store.commit_round(job, 1, started_at=time.time() - 5, cohort=["a", "b"],
                           survivors=["a", "b"], dropped=[], model_digest=digest,
                           metrics=[("*", "test", "c_index", 0.7, 20)])
        store.set_job_status(job, "completed", actor="test", final_digest=digest)
    finally:
        store.close()


def leave_free(disk: Path, free: int) -> Path:
    """Take all but ``free`` bytes of ``disk``."""
    import os

    st = os.statvfs(disk)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - free))
    return filler


def test_an_export_failed_for_space_is_done_at_the_next_start(tmp_path):
    with small_disk(tmp_path / "coord", "24m") as state_dir:
        job = "job-full"
        _big_completed_job(state_dir, job)
        coord = _coordinator(state_dir)
        filler = leave_free(state_dir, 2 << 20)
        asyncio.run(finish_job(coord, job))  # what the job's end runs
        (failed,) = coord.store.audit_log(action="model_export_failed")
        assert "No space left on device" in failed["detail"], failed
        assert {"report.md", "report.json"} <= set(ck.results(state_dir, job))
        assert "model.onnx" not in ck.results(state_dir, job)
        assert unfinished_jobs(coord) == [job]
        note = fetch_note(coord, job)
        assert "no ONNX export: it failed (" in note and note.endswith(
            "); a restart of the coordinator tries it again (and writes the report again "
            "after it)"), note
        coord.close()

        filler.unlink()  # room again; the coordinator restarts
        coord = _coordinator(state_dir)
        try:
            assert unfinished_jobs(coord) == [job]
            asyncio.run(_resume_finishing(coord, unfinished_jobs(coord)))
            assert "model.onnx" in ck.results(state_dir, job)
            assert len(coord.store.audit_log(action="model_exported")) == 1
            assert len(coord.store.audit_log(action="report_written")) == 2
            (resumed,) = coord.store.audit_log(action="job_finish_resumed")
            assert json.loads(resumed["detail"]) == {"job": job, "missing": ["model.onnx"]}
            assert unfinished_jobs(coord) == []
            assert "ONNX" not in fetch_note(coord, job)
        finally:
            coord.close()

