"""`jobs fetch` on a job whose ONNX export failed says what gets it done (s17 diff
review L2).

It said "a restart of the coordinator tries it again" whatever the cause. The retry
at the next start helps where the cause may pass (the disk, memory: 465c81c); an export
the parity check refuses (a diverged model's NaN weights) fails the same way at every
start. For such a cause the note now says to fix it and run `fedge export --job J` by
hand, which exports the job's final checkpoint to its model.onnx. Real SQLite, the
real `fedge export` child and its parity check, the admin service's jobs_fetch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.process import finish_job, write_report
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store
from tests.coordinator.test_export_on_completion import PLAN, completed_job

REPO = Path(__file__).resolve().parents[2]


def fetch_note(coord: Coordinator, job: str) -> str:
    service = AdminService(coord, {"k": Operator("eng", "viewer")})
    reply = service.handle("k", AdminRequest("jobs_fetch", json.dumps({"job_id": job}), {}))
    assert reply.ok, reply.error
    return json.loads(reply.result_json).get("note", "")


def diverged_job(state_dir: Path, job: str) -> None:
    """A completed job whose final model is NaN: the export's parity check refuses it."""
    weights = np.full(5, np.nan, dtype=np.float32)
    ckpt = ck.Checkpoint(weights=weights, round=1, plan=PLAN, metrics={"test/c_index": 0.7})
    digest = ck.save_checkpoint(ck.round_path(state_dir, job, 1), ckpt)
    ck.save_checkpoint(ck.final_path(state_dir, job), ckpt)
    store = Store(state_dir)
    try:
        store.create_job(job, PLAN, actor="test")
        store.set_job_status(job, "running", actor="test")
        store.commit_round(job, 1, started_at=time.time() - 5, cohort=["a", "b"],
                           survivors=["a", "b"], dropped=[], model_digest=digest,
                           metrics=[("*", "test", "c_index", 0.7, 20)])
        store.set_job_status(job, "completed", actor="test", final_digest=digest)
    finally:
        store.close()


def test_an_export_the_parity_check_refuses_names_the_command_to_run_by_hand(tmp_path):
    diverged_job(tmp_path, "job-nan")
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    try:
        asyncio.run(finish_job(coord, "job-nan"))  # what the job's end runs
        (failed,) = coord.store.audit_log(action="model_export_failed")
        reason = json.loads(failed["detail"])["reason"]
        assert reason.startswith("fedge export: export refused"), reason
        note = fetch_note(coord, "job-nan")
    finally:
        coord.close()
    command = f"fedge export --job job-nan --state-dir {tmp_path}"
    assert note.endswith(
        f"; no ONNX export: it failed ({reason}); a restart of the coordinator tries it "
        "again, which helps only where the disk or memory was the cause: fix the cause, "
        f"then run `{command}` on the coordinator's host, which writes the job's "
        "model.onnx"), note
    # that command is what the coordinator ran: it fails the same way until the cause is
    # fixed (here it cannot be: the model diverged)
    done = subprocess.run([sys.executable, "-m", "fedge.cli", *command.split()[1:]],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr.strip().splitlines()[-1]) == (2, reason)


def test_an_export_failed_for_the_disk_or_memory_is_left_to_the_restart(tmp_path):
    completed_job(tmp_path, "job-d")
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    try:
        assert asyncio.run(write_report(coord, "job-d")) is True  # the report is there
        for reason in (f"fedge export: cannot write {tmp_path}/model.onnx: No space left on "
                       "device", "MemoryError", "no output", "timed out after 600 s"):
            coord.store.audit("coordinator", "model_export_failed",
                              {"job": "job-d", "reason": reason})
            note = fetch_note(coord, "job-d")
            assert note.endswith(f"; no ONNX export: it failed ({reason}); a restart of the "
                                 "coordinator tries it again (and writes the report again "
                                 "after it)"), note
    finally:
        coord.close()
