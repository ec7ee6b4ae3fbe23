"""An ended job's ONNX export that fails the same way for the same final model (a
diverged model's NaN weights, which the parity check refuses) is not tried again at
every start of the coordinator once it has failed EXPORT_GIVE_UP_AFTER times: it was,
for ever, a torch child and one more failure in the audit log at each start. `jobs
fetch`, `jobs status` and the start's WARNING name the command that writes it by hand.
A failure whose cause may pass (the disk, memory, time) stays tried at each start, and
so does one recorded under another fedge version or for another model.

Real SQLite, the real `fedge export` child and its parity check, the real finish path
(finish_job at the job's end, unfinished_jobs and _resume_finishing at each start), the
admin service's jobs_fetch and jobs_status."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np

from fedge import __version__
from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import EXPORT_GIVE_UP_AFTER, AdminService, Operator
from fedge.coordinator.process import _resume_finishing, finish_job, unfinished_jobs
from fedge.coordinator.service import Coordinator
from tests.coordinator.test_export_on_completion import completed_job
from tests.coordinator.test_s17_net_fetch_export_note import diverged_job


def _coordinator(state_dir) -> Coordinator:
    return Coordinator(state_dir, initial_weights=lambda plan: np.zeros(5, np.float32))


def _ask(coord: Coordinator, op: str, job: str) -> dict:
    service = AdminService(coord, {"k": Operator("eng", "viewer")})
    reply = service.handle("k", AdminRequest(op, json.dumps({"job_id": job}), {}))
    assert reply.ok, reply.error
    return json.loads(reply.result_json)


def _start(state_dir) -> tuple[Coordinator, list[str]]:
    """What a coordinator's start does for ended jobs: the unfinished ones finished."""
    coord = _coordinator(state_dir)
    unfinished = unfinished_jobs(coord)
    asyncio.run(_resume_finishing(coord, unfinished))
    return coord, unfinished


def test_an_export_refused_twice_for_the_same_model_is_not_tried_at_each_start(
        tmp_path, caplog):
    job = "job-nan"
    diverged_job(tmp_path, job)
    command = f"fedge export --job {job} --state-dir {tmp_path}"
    coord = _coordinator(tmp_path)
    asyncio.run(finish_job(coord, job))  # the job's end: its first try
    (first,) = coord.store.audit_log(action="model_export_failed")
    detail = json.loads(first["detail"])
    assert detail["final_digest"] == coord.store.job(job).final_digest
    assert detail["version"] == __version__
    reason = detail["reason"]
    assert reason.startswith("fedge export: export refused"), reason
    assert unfinished_jobs(coord) == [job]  # once is not yet "the same way again"
    coord.close()

    coord, resumed = _start(tmp_path)  # the next start tries it once more
    assert resumed == [job]
    assert len(coord.store.audit_log(action="model_export_failed")) == EXPORT_GIVE_UP_AFTER
    coord.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedge.coordinator"):
        coord, resumed = _start(tmp_path)  # and the one after does not
    try:
        assert resumed == []
        assert len(coord.store.audit_log(action="model_export_failed")) == EXPORT_GIVE_UP_AFTER
        said = [r.getMessage() for r in caplog.records if job in r.getMessage()]
        assert said == [f"job {job}: its ONNX export failed 2 times the same way for its "
                        f"final model ({reason}); not tried again at this start. Fix the "
                        f"cause, then run `{command}` on this host, which writes the job's "
                        "model.onnx"], said
        retry = (f"it failed 2 times the same way for this model, so the coordinator no "
                 f"longer tries it at its start: fix the cause, then run `{command}` on the "
                 "coordinator's host, which writes the job's model.onnx")
        note = _ask(coord, "jobs_fetch", job)["note"]
        assert note.endswith(f"; no ONNX export: it failed ({reason}); {retry}"), note
        status = _ask(coord, "jobs_status", job)
        assert status["status"] == "completed"
        assert status["onnx_export"] == {"failed": reason, "retry": retry}

        # its report lost too: the start writes the report, and still not the export
        (ck.job_dir(tmp_path, job) / "report.md").unlink()
        assert unfinished_jobs(coord) == [job]
        asyncio.run(_resume_finishing(coord, [job]))
        assert "report.md" in ck.results(tmp_path, job)
        assert len(coord.store.audit_log(action="model_export_failed")) == EXPORT_GIVE_UP_AFTER
        (skipped,) = coord.store.audit_log(action="model_export_skipped")
        assert json.loads(skipped["detail"])["reason"] == reason
        assert _ask(coord, "jobs_fetch", job)["note"] == note  # the failure still said
    finally:
        coord.close()


def _failed(coord: Coordinator, job: str, reason: str, **detail: str) -> None:
    """A failed export as export_final_model records it."""
    coord.store.audit("coordinator", "model_export_failed", {
        "job": job, "reason": reason, "final_digest": coord.store.job(job).final_digest,
        "version": __version__, **detail})


def test_a_disk_or_memory_failure_is_tried_at_every_start_however_often_it_came(tmp_path):
    job = "job-disk"
    completed_job(tmp_path, job)
    coord = _coordinator(tmp_path)
    try:
        for reason in (f"fedge export: cannot write {tmp_path}/model.onnx: [Errno 28] No "
                       "space left on device", "MemoryError", "no output",
                       "timed out after 600 s"):
            for _ in range(EXPORT_GIVE_UP_AFTER + 1):
                _failed(coord, job, reason)
            assert unfinished_jobs(coord) == [job], reason
            assert _ask(coord, "jobs_status", job)["onnx_export"] == {
                "failed": reason, "retry": "a restart of the coordinator tries it again "
                                           "(and writes the report again after it)"}
    finally:
        coord.close()


def test_a_refusal_under_another_version_or_for_another_model_is_tried_again(tmp_path):
    job = "job-nan"
    diverged_job(tmp_path, job)
    coord = _coordinator(tmp_path)
    try:
        asyncio.run(finish_job(coord, job))
        reason = json.loads(coord.store.audit_log(action="model_export_failed")[0]
                            ["detail"])["reason"]
        _failed(coord, job, reason, version="0.0.1")  # before an upgrade: tried again
        assert unfinished_jobs(coord) == [job]
        _failed(coord, job, reason, final_digest="0" * 64)  # another model's failure
        assert unfinished_jobs(coord) == [job]
        _failed(coord, job, reason + " (other words)")
        assert unfinished_jobs(coord) == [job]
        coord.store.audit("coordinator", "model_export_failed",  # recorded before s19
                          {"job": job, "reason": reason})
        assert unfinished_jobs(coord) == [job]
        _failed(coord, job, reason)  # twice the same way now, after the older one
        _failed(coord, job, reason)
        assert unfinished_jobs(coord) == []
        # an export written since (by hand), then lost: its failures start over
        coord.store.audit("coordinator", "model_exported", {"job": job, "path": "x"})
        _failed(coord, job, reason)
        assert unfinished_jobs(coord) == [job]
    finally:
        coord.close()
