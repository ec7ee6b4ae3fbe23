"""A finished job's model is exported to ONNX by a child process (`fedge export`),
and the outcome, good or bad, is in the audit log; a failed export loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.process import export_final_model, finish_job, unfinished_jobs
from fedge.coordinator.service import Coordinator
from fedge.coordinator.store import Store

PLAN = """
[job]
dataset = "brca"
rounds = 1
[model]
name = "cox_linear"
params = { in_features = 4 }
[train]
steps = 1
batch_size = 4
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def test_export_failure_is_audited_and_the_checkpoint_stays(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    final = ck.final_path(tmp_path, "job-x")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not a safetensors file")
    ok = asyncio.run(export_final_model(coord, "job-x", timeout_s=120))
    assert ok is False
    (entry,) = coord.store.audit_log(action="model_export_failed")
    assert "job-x" in str(entry["detail"]) and "safetensors" in str(entry["detail"])
    assert final.read_bytes() == b"not a safetensors file"
    assert not final.with_name("model.onnx").exists()
    coord.close()


def test_export_success_writes_the_onnx_beside_the_checkpoint(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    weights = np.arange(5, dtype=np.float32) / 10
    ck.save_checkpoint(ck.final_path(tmp_path, "job-y"),
                       ck.Checkpoint(weights=weights, round=1, plan=PLAN))
    assert asyncio.run(export_final_model(coord, "job-y", timeout_s=120)) is True
    assert coord.store.audit_log(action="model_exported")
    assert ck.final_path(tmp_path, "job-y").with_name("model.onnx").stat().st_size > 0
    coord.close()


IMAGE_PLAN = """
[job]
dataset = "scans"
rounds = 1
[model]
name = "resnet_small"
params = { classes = 2, width = 8 }
"""


def test_an_image_model_is_exported_at_job_end(tmp_path):
    # the input shape comes from the model registry (1x64x64), not a Linear layer's width
    from fedge.train.api import ModelSpec, build_model, flatten

    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    weights = flatten(build_model(ModelSpec("resnet_small", {"classes": 2, "width": 8})))
    ck.save_checkpoint(ck.final_path(tmp_path, "job-cnn"),
                       ck.Checkpoint(weights=weights, round=1, plan=IMAGE_PLAN))
    assert asyncio.run(export_final_model(coord, "job-cnn", timeout_s=120)) is True
    assert coord.store.audit_log(action="model_exported")
    assert not coord.store.audit_log(action="model_export_failed")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ck.final_path(tmp_path, "job-cnn").with_name("model.onnx")),
                                providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 64, 64]
    coord.close()


def completed_job(state_dir: Path, job_id: str, plan: str = PLAN) -> str:
    """A job as a coordinator leaves it at its last commit, before finish_job: the round
    and final checkpoints, the round and its metrics recorded, the job completed.
    Returns the final model's digest."""
    weights = np.linspace(-0.5, 0.5, 5, dtype=np.float32)
    ckpt = ck.Checkpoint(weights=weights, round=1, plan=plan, metrics={"test/c_index": 0.7})
    digest = ck.save_checkpoint(ck.round_path(state_dir, job_id, 1), ckpt)
    ck.save_checkpoint(ck.final_path(state_dir, job_id), ckpt)
    store = Store(state_dir)
    try:
        store.create_job(job_id, plan, actor="test")
        store.set_job_status(job_id, "running", actor="test")
        store.commit_round(job_id, 1, started_at=time.time() - 5, cohort=["a", "b"],
                           survivors=["a", "b"], dropped=[], model_digest=digest,
                           metrics=[("a", "test", "c_index", 0.65, 10),
                                    ("b", "test", "c_index", 0.75, 10),
                                    ("*", "test", "c_index", 0.7, 20)])
        store.set_job_status(job_id, "completed", actor="test", final_digest=digest)
    finally:
        store.close()
    return digest


def test_finishing_again_keeps_a_whole_export_and_writes_the_missing_report(tmp_path):
    # the coordinator was killed after model.onnx was renamed into place, before the report
    completed_job(tmp_path, "job-r")
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    assert unfinished_jobs(coord) == ["job-r"]
    assert asyncio.run(export_final_model(coord, "job-r", timeout_s=120)) is True
    onnx_path = ck.job_dir(tmp_path, "job-r") / "model.onnx"
    before = (onnx_path.read_bytes(), onnx_path.stat().st_mtime_ns)
    asyncio.run(finish_job(coord, "job-r"))
    assert (onnx_path.read_bytes(), onnx_path.stat().st_mtime_ns) == before
    assert len(coord.store.audit_log(action="model_exported")) == 1
    (kept,) = coord.store.audit_log(action="model_export_kept")
    assert json.loads(kept["detail"]) == {"job": "job-r", "path": str(onnx_path)}
    report = json.loads((ck.job_dir(tmp_path, "job-r") / "report.json").read_text())
    assert report["status"] == "completed" and report["final"]["c_index"]["aggregate"] == 0.7
    assert unfinished_jobs(coord) == []
    coord.close()


def test_a_cancelled_job_that_kept_its_last_model_is_finished_after_a_restart(tmp_path):
    """A job cancelled (or failed) after a commit keeps its last committed model as its
    result; a coordinator killed before its report was written finishes it on restart,
    the report marked cancelled. One cancelled before any commit has nothing to finish."""
    completed_job(tmp_path, "job-c")
    store = Store(tmp_path)
    try:
        store.set_job_status("job-c", "cancelled", actor="test")
        store.create_job("job-n", PLAN, actor="test")
        store.set_job_status("job-n", "cancelled", actor="test")
    finally:
        store.close()
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    assert unfinished_jobs(coord) == ["job-c"]
    asyncio.run(finish_job(coord, "job-c"))
    report = json.loads((ck.job_dir(tmp_path, "job-c") / "report.json").read_text())
    assert report["status"] == "cancelled"
    assert unfinished_jobs(coord) == []
    coord.close()


def test_a_failed_job_killed_before_it_kept_its_last_model_keeps_it_after_a_restart(tmp_path):
    """The job's status said failed, then the coordinator died before writing its last
    committed model as final.safetensors: the restarted one writes it from the round's
    checkpoint, names its digest, and finishes the job (export kept on a second pass)."""
    from fedge.coordinator.process import _resume_finishing

    digest = completed_job(tmp_path, "job-f")
    ck.final_path(tmp_path, "job-f").unlink()
    store = Store(tmp_path)
    try:
        store.set_job_status("job-f", "failed", actor="test", error="round 2 failed 3 times")
    finally:
        store.close()
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    assert unfinished_jobs(coord) == ["job-f"]
    asyncio.run(_resume_finishing(coord, ["job-f"]))
    assert ck.final_path(tmp_path, "job-f").is_file()
    assert coord.store.job("job-f").final_digest == digest
    report = json.loads((ck.job_dir(tmp_path, "job-f") / "report.json").read_text())
    assert report["status"] == "failed"
    assert unfinished_jobs(coord) == []
    assert len(coord.store.audit_log(action="model_exported")) == 1
    coord.close()


def test_finishing_again_exports_over_a_model_onnx_that_is_not_the_final_models(tmp_path):
    import onnx

    digest = completed_job(tmp_path, "job-t")
    onnx_path = ck.job_dir(tmp_path, "job-t") / "model.onnx"
    onnx_path.write_bytes(b"\x08\x07 torn")
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    asyncio.run(finish_job(coord, "job-t"))
    assert not coord.store.audit_log(action="model_export_kept")
    assert coord.store.audit_log(action="model_exported")
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["model_digest"] == digest
    assert (ck.job_dir(tmp_path, "job-t") / "report.md").is_file()
    coord.close()


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has died


def test_a_child_started_through_coordinator_child_dies_with_a_sigkilled_parent(tmp_path):
    # what becomes of the export child when the coordinator is killed with SIGKILL
    (tmp_path / "sleeper.py").write_text(
        "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    parent_code = ("import os, subprocess, sys, time\n"
                   "subprocess.Popen([sys.executable, '-m', 'fedge.coordinator.child',"
                   " str(os.getpid()), 'sleeper'])\n"
                   "time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              env=env, cwd=tmp_path)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert _running(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        parent.stdout.close()
        if child and _running(child):
            os.kill(child, signal.SIGKILL)


def test_coordinator_child_refuses_to_run_for_a_parent_that_has_gone(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedge.coordinator.child", "1", "fedge.cli",
                          "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "parent 1 has exited" in out.stderr
