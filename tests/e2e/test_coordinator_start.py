"""What a real `fedge coordinator` process does with a state directory that is not as
it left it: a job directory it cannot write, a job finished but not reported, a
database it cannot open, temporary files from a write that was killed."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e.conftest import REPO

pytestmark = pytest.mark.e2e

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2
seed = {seed}
[model]
name = "cox_linear"
params = {{ in_features = 4 }}
[train]
steps = 1
batch_size = 4
learning_rate = 0.01
[strategy]
name = "fedavg"
"""


def _coordinator(federation):
    fed = federation()
    fed.add_site("a", [])
    fed.enrol_in_store()
    fed.write_coordinator_config()
    return fed


def test_a_job_whose_directory_cannot_be_written_fails_naming_it_and_the_next_job_runs(
        federation):
    fed = _coordinator(federation)
    blocked = fed.submit(PLAN.format(seed=1))
    following = fed.submit(PLAN.format(seed=2))
    in_the_way = fed.coord_dir / "jobs" / blocked
    in_the_way.parent.mkdir()
    in_the_way.write_text("a plain file where the job's directory belongs\n")
    fed.start_coordinator()
    job = fed.wait_job(blocked, 60, statuses=("failed",))
    assert str(in_the_way) in job["error"]
    assert "File exists" in job["error"] or "Not a directory" in job["error"]
    failed = [json.loads(r["detail"]) for r in fed.audit("job_failed")]
    assert failed == [{"job": blocked, "error": job["error"]}]
    fed.wait_job(following, 120, statuses=("running",))
    assert fed.job(blocked)["status"] == "failed"
    assert "never retrieved" not in fed.coordinator.output()
    assert (fed.coord_dir / "jobs" / following / "round-0.safetensors").is_file()


def test_a_job_completed_without_its_report_is_finished_when_the_coordinator_starts(
        federation):
    # the coordinator was killed between the job's last commit and its report
    import onnx

    from fedge.coordinator import checkpoint as ck
    from tests.coordinator.test_export_on_completion import PLAN as EXPORT_PLAN
    from tests.coordinator.test_export_on_completion import completed_job

    fed = _coordinator(federation)
    digest = completed_job(fed.coord_dir, "job-cut-short", EXPORT_PLAN)
    fed.start_coordinator()
    jdir = ck.job_dir(fed.coord_dir, "job-cut-short")
    # report.md is written last: its presence says the report is whole
    fed.wait_for(lambda: (jdir / "report.md").is_file(), 120, "the job's report")
    meta = {p.key: p.value for p in onnx.load(str(jdir / "model.onnx")).metadata_props}
    assert meta["model_digest"] == digest
    assert json.loads((jdir / "report.json").read_text())["committed_round"] == 1
    assert (jdir / "report.md").read_text().startswith("# Job job-cut-short: completed")
    (resumed,) = fed.audit("job_finish_resumed")
    assert json.loads(resumed["detail"]) == {
        "job": "job-cut-short", "missing": ["model.onnx", "report.md", "report.json"]}
    assert [r["action"] for r in fed.audit() if r["id"] > resumed["id"]] == [
        "model_exported", "report_written"]
    assert fed.job("job-cut-short")["status"] == "completed"


def _run_coordinator_cli(fed, timeout=60):
    cfg = fed.write_coordinator_config()
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "--config",
                          str(cfg)], capture_output=True, text=True, env=fed.env,
                         timeout=timeout, cwd=REPO)
    return out, time.monotonic() - t0


def test_a_corrupt_database_is_refused_in_one_line_naming_it(federation):
    fed = _coordinator(federation)
    db = fed.coord_dir / "coordinator.sqlite3"
    for sidecar in fed.coord_dir.glob("coordinator.sqlite3-*"):
        sidecar.unlink()
    db.write_bytes(b"garbage" * 1000)
    out, _ = _run_coordinator_cli(fed)
    assert out.returncode == 2
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line == (f"fedge coordinator: cannot open database {db}: file is not a database "
                    "(corrupt: restore it from a backup, or move it aside to start empty)")
    assert db.read_bytes() == b"garbage" * 1000
    assert not (fed.coord_dir / "endpoint").exists()
    # the operator's other coordinator commands say the same, in one line each
    cfg = fed.write_coordinator_config()
    plan = fed.coord_dir.parent / "plan.toml"
    plan.write_text(PLAN.format(seed=1))
    for action in (["status"], ["submit", str(plan)]):
        r = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", *action[:1],
                            "--config", str(cfg), *action[1:]], capture_output=True,
                           text=True, env=fed.env, timeout=60, cwd=REPO)
        assert r.returncode == 2, (action, r.stderr)
        (line,) = r.stderr.splitlines()
        assert line.startswith(f"fedge coordinator {action[0]}: cannot open database {db}")
    assert db.read_bytes() == b"garbage" * 1000


def test_a_database_locked_by_another_process_is_refused_in_one_line_naming_it(federation):
    fed = _coordinator(federation)
    db = fed.coord_dir / "coordinator.sqlite3"
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        out, seconds = _run_coordinator_cli(fed)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"fedge coordinator: database {db} is locked by another process")
    assert "another coordinator on the same state dir" in line
    assert seconds < 20
    assert not (fed.coord_dir / "endpoint").exists()


def test_temp_files_left_by_a_killed_checkpoint_write_are_removed_at_start(federation):
    import os

    from fedge.coordinator import checkpoint as ck

    fed = _coordinator(federation)
    jdir = fed.coord_dir / "jobs" / "job-old"
    jdir.mkdir(parents=True)
    stale = jdir / ".round-2.safetensors.tmp-31337"
    stale.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    other = jdir / "model.onnx.tmp-1"  # not a checkpoint write's temp file
    other.write_bytes(b"kept")
    os.utime(other, (an_hour_ago, an_hour_ago))
    ck.save_checkpoint(ck.round_path(fed.coord_dir, "job-old", 1),
                       ck.Checkpoint(weights=np.zeros(3, np.float32), round=1, plan=""))
    fed.start_coordinator()  # returns once the endpoint is written, after the clean-up
    assert not stale.exists()
    assert other.read_bytes() == b"kept"
    assert ck.load_checkpoint(ck.round_path(fed.coord_dir, "job-old", 1)).round == 1
    assert str(stale) in fed.coordinator.output()
