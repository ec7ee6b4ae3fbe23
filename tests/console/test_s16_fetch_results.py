"""The coordinator marks a job completed, then exports its model to ONNX (a `fedge
export` child) and writes its report, report.md last. `jobs fetch` right after the
status says completed waits for them, and says what it waits for; with `--wait 0` it
fails naming what is still being written. An export or report that failed for good
is named, not awaited. Through the real CLI, a real coordinator (SQLite, its admin
channel on loopback) and its real finish_job (the export child, the report)."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import onnxruntime as ort

from fedge.cli import main
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.process import finish_job
from tests.console.test_s16_watch_exit_codes import PLAN  # one round, cox_linear on 3

RESULTS = {"final.safetensors", "model.onnx", "report.json", "report.md"}


def _completed(tmp_path, server, capsys, weights: np.ndarray) -> tuple[list[str], str]:
    """A job submitted through the CLI, left as the coordinator leaves one at its last
    commit (service._finish_job): round and final checkpoints, the round recorded, the
    job completed; its export and report not yet begun. Returns (the CLI's leading
    arguments, the job id)."""
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    job = capsys.readouterr().out.strip()
    coord = server.coordinator

    def commit() -> None:
        text = coord.store.job(job).plan_toml
        checkpoint = ck.Checkpoint(weights=weights, round=1, plan=text)
        digest = ck.save_checkpoint(ck.round_path(coord.state_dir, job, 1), checkpoint)
        coord.store.set_job_status(job, "running", actor="test")
        coord.store.commit_round(job, 1, started_at=time.time() - 5, cohort=["h1", "h2"],
                                 survivors=["h1", "h2"], dropped=[], model_digest=digest,
                                 metrics=[("*", "val", "c_index", 0.61, 20)])
        ck.save_final(coord.state_dir, job, checkpoint,
                      coord.job_outcome(job, "completed"))
        coord.store.set_job_status(job, "completed", actor="test", final_digest=digest)

    server.call_in_loop(commit)
    return base, job


def _finish(server, job: str, *, after_s: float = 0.0):
    """The coordinator process's finish_job (ONNX export in a child, then the report)
    on the coordinator's loop, started ``after_s`` from now. Returns its future."""
    async def later() -> None:
        await asyncio.sleep(after_s)
        await finish_job(server.coordinator, job)

    return asyncio.run_coroutine_threadsafe(later(), server.loop)


def test_fetch_right_after_completed_waits_for_the_onnx_and_report(
        tmp_path, make_server, capsys):
    server = make_server()
    base, job = _completed(tmp_path, server, capsys,
                           np.array([0.3, -0.2, 0.1, 0.0], np.float32))
    jdir = ck.job_dir(server.coordinator.state_dir, job)
    # what the report's reviewer saw: status completed, only the final weights there
    assert main([*base, "jobs", "status", job]) == 0
    assert '"status": "completed"' in capsys.readouterr().out
    assert ck.results(server.coordinator.state_dir, job) == ["final.safetensors"]
    finishing = _finish(server, job, after_s=1.0)
    out = tmp_path / "r"
    assert main([*base, "--operator", "viewer", "jobs", "fetch", job, "--out",
                 str(out)]) == 0
    finishing.result(timeout=120)
    captured = capsys.readouterr()
    assert f"job {job} completed: its results are still being written (model.onnx, " \
           "report.json, report.md not yet); waiting up to 180 s (--wait)" in captured.err
    got = {p.name for p in (out / job).iterdir()}
    assert got >= RESULTS, got
    assert "note:" not in captured.out
    for name in got:
        assert (out / job / name).read_bytes() == (jdir / name).read_bytes()
    sess = ort.InferenceSession(str(out / job / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[-1] == 3
    assert (out / job / "report.md").read_text().startswith(f"# Job {job}")


def test_fetch_with_no_wait_names_what_is_still_being_written(tmp_path, make_server, capsys):
    server = make_server()
    base, job = _completed(tmp_path, server, capsys, np.zeros(4, np.float32))
    out = tmp_path / "r"
    assert main([*base, "jobs", "fetch", job, "--wait", "0", "--out", str(out)]) == 3
    captured = capsys.readouterr()
    said = (f"job {job} completed; its results are still being written (model.onnx, "
            "report.json, report.md not yet): fetch again in a few seconds (`fedge "
            f"console jobs watch {job}` says when they are ready; if they never come, "
            "the coordinator's audit log says why)")
    assert captured.out.splitlines()[-1] == f"note: {said}"
    assert f"job {job}: only part of its results fetched (model.onnx, report.json, " \
           "report.md still being written); fetch again in a few seconds" in captured.err
    assert {p.name for p in (out / job).iterdir()} == {"final.safetensors"}
    # a console that does not wait (an older one) gets the same note with the weights,
    # which it prints: not the final weights alone as if they were all the results
    result, blobs = server.client("viewer").call("jobs_fetch", {"job_id": job})
    assert (result["note"], result["still_writing"], set(blobs)) == (
        said, ["model.onnx", "report.json", "report.md"], {"final.safetensors"})


def test_an_export_that_failed_is_named_not_awaited(tmp_path, make_server, capsys):
    server = make_server()
    # seven weights for a model of four: the export child refuses them (a real failure)
    base, job = _completed(tmp_path, server, capsys, np.zeros(7, np.float32))
    _finish(server, job).result(timeout=120)
    (failed,) = server.coordinator.store.audit_log(action="model_export_failed", job=job)
    out = tmp_path / "r"
    started = time.monotonic()
    assert main([*base, "jobs", "fetch", job, "--out", str(out)]) == 0
    assert time.monotonic() - started < 30  # not the 180 s wait for an ONNX never coming
    printed = capsys.readouterr().out.splitlines()
    assert {p.name for p in (out / job).iterdir()} >= RESULTS - {"model.onnx"}
    assert not (out / job / "model.onnx").exists()
    reason = json.loads(failed["detail"])["reason"]
    assert reason
    # a checkpoint the model cannot take fails the same way at every start: the note
    # says to fix it and run the export by hand (s17 diff review L2)
    state_dir = server.coordinator.state_dir
    assert printed[-1] == (f"note: job {job} completed; no ONNX export: it failed ({reason}); "
                           "a restart of the coordinator tries it again, which helps only "
                           "where the disk or memory was the cause: fix the cause, then run "
                           f"`fedge export --job {job} --state-dir {state_dir}` on the "
                           "coordinator's host, which writes the job's model.onnx")


def test_a_report_that_failed_is_named_and_the_model_still_fetched(
        tmp_path, make_server, capsys):
    server = make_server()
    base, job = _completed(tmp_path, server, capsys,
                           np.array([0.3, -0.2, 0.1, 0.0], np.float32))
    jdir = ck.job_dir(server.coordinator.state_dir, job)
    (jdir / "report.json").mkdir()  # the report's write cannot replace a directory
    _finish(server, job).result(timeout=120)
    (failed,) = server.coordinator.store.audit_log(action="report_failed", job=job)
    reason = json.loads(failed["detail"])["reason"]
    out = tmp_path / "r"
    started = time.monotonic()
    assert main([*base, "jobs", "fetch", job, "--out", str(out)]) == 0
    assert time.monotonic() - started < 30  # not the 180 s wait for a report never coming
    printed = capsys.readouterr().out.splitlines()
    assert {p.name for p in (out / job).iterdir()} == {"final.safetensors", "model.onnx"}
    assert printed[-1] == (f"note: job {job} completed; its report could not be written "
                           f"({reason}); a restart of the coordinator tries again")


def test_an_export_failed_before_the_report_is_written_is_named_not_listed_as_pending(
        tmp_path, make_server, capsys):
    # diff review s16 (helper note): with the export failed and the report not yet
    # written, still_writing named model.onnx (never coming) and the note that the
    # export failed was dropped
    from fedge.coordinator.process import export_final_model

    server = make_server()
    _, job = _completed(tmp_path, server, capsys, np.zeros(7, np.float32))
    fut = asyncio.run_coroutine_threadsafe(
        export_final_model(server.coordinator, job), server.loop)  # no report after it
    fut.result(timeout=120)
    (failed,) = server.coordinator.store.audit_log(action="model_export_failed", job=job)
    reason = json.loads(failed["detail"])["reason"]
    result, _ = server.client("viewer").call("jobs_fetch", {"job_id": job})
    assert result["still_writing"] == ["report.json", "report.md"]
    assert f"no ONNX export: it failed ({reason})" in result["note"]


def test_a_waiting_fetchs_pending_asks_are_not_audited(tmp_path, make_server, capsys):
    # a console waiting for the results asks jobs_fetch each second: only the fetch
    # that hands the files over is an audit entry, not one a second while it waits
    server = make_server()
    base, job = _completed(tmp_path, server, capsys,
                           np.array([0.3, -0.2, 0.1, 0.0], np.float32))
    client = server.client("viewer")
    for _ in range(3):
        result, blobs = client.call("jobs_fetch", {"job_id": job, "pending_ok": True})
        assert result["pending"] and not blobs
    finishing = _finish(server, job, after_s=1.5)
    assert main([*base, "--operator", "viewer", "jobs", "fetch", job, "--out",
                 str(tmp_path / "r")]) == 0
    finishing.result(timeout=120)
    fetches = server.coordinator.store.audit_log(action="admin.jobs_fetch", job=None)
    assert len(fetches) == 1, fetches
