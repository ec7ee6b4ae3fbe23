"""A job cancelled (or failed) after committing rounds has spent its sites' privacy
budget and trained a model: `jobs fetch` returns that last committed model and its
report, marked as what they are. One cancelled before any commit says it has none,
and why. Through the real CLI, a real coordinator and its SQLite store."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedge.cli import main
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.report import write_job_report

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 5
min_clients = 2
[model]
name = "cox_linear"
params = { in_features = 3 }
[train]
epochs = 1
batch_size = 32
learning_rate = 0.01
[strategy]
name = "fedavg"
"""


def _submit(tmp_path, server, base, capsys) -> str:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    return capsys.readouterr().out.strip()


def _commit(coord, job: str, rnd: int) -> np.ndarray:
    """Round ``rnd`` committed as the coordinator commits one: checkpoint, then row."""
    weights = np.full(4, rnd / 10, np.float32)
    plan = coord.store.job(job).plan_toml
    digest = ck.save_checkpoint(ck.round_path(coord.state_dir, job, rnd),
                                ck.Checkpoint(weights=weights, round=rnd, plan=plan))
    coord.store.commit_round(job, rnd, started_at=float(rnd), cohort=["h1", "h2", "h3"],
                             survivors=["h1", "h2"], dropped=["h3"], model_digest=digest,
                             metrics=[("*", "val", "c_index", 0.6 + rnd / 100, 20)])
    return weights


def test_a_job_cancelled_after_two_rounds_returns_its_last_committed_model(
        tmp_path, make_server, capsys):
    server = make_server()
    coord = server.coordinator
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    job = _submit(tmp_path, server, base, capsys)
    _commit(coord, job, 1)
    last = _commit(coord, job, 2)
    # what the coordinator process does with a job that ends (fedge.coordinator.process
    # finish_job: the ONNX export in a child, then the report)
    ended = []
    coord.on_job_completed = lambda j: (ended.append(j), write_job_report(
        ck.job_dir(coord.state_dir, j), coord.job_status(j), coord.store.job(j).plan_toml))
    assert main([*base, "jobs", "cancel", job]) == 0
    capsys.readouterr()
    assert ended == [job]
    out = tmp_path / "results"
    assert main([*base, "--operator", "viewer", "jobs", "fetch", job, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    got = out / job
    assert {p.name for p in got.iterdir()} >= {"final.safetensors", "report.md",
                                               "report.json"}
    np.testing.assert_array_equal(load_file(str(got / "final.safetensors"))["weights"], last)
    # who cancelled it, and when: the job's error, in its status, the note and the report
    who = coord.store.job(job).error
    assert re.fullmatch(r"cancelled by operator:admin at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                        who), who
    assert printed[-1] == (
        f"note: job {job} cancelled after 2 of 5 round(s) ({who}): this is a cancelled job's "
        "last committed model (round 2) and its report, not a finished training; no ONNX "
        "export (not written, or not yet: fetch again later)")
    assert main([*base, "--operator", "viewer", "jobs", "status", job]) == 0
    assert json.loads(capsys.readouterr().out)["error"] == who
    report = json.loads((got / "report.json").read_text())
    assert (report["status"], report["committed_round"], report["partial"]) == \
        ("cancelled", 2, True)
    assert report["error"] == who
    md = (got / "report.md").read_text()
    assert md.startswith(f"# Job {job}: cancelled, last committed round 2 of 5\n")
    assert f"Why: {who}" in md
    assert coord.store.job(job).final_digest == ck.model_digest(last)


def test_a_job_cancelled_before_any_commit_says_it_has_no_results_and_why(
        tmp_path, make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    job = _submit(tmp_path, server, base, capsys)
    assert main([*base, "jobs", "cancel", job]) == 0
    capsys.readouterr()
    assert main([*base, "jobs", "fetch", job, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"job {job} (cancelled) has no results and will not have any: it was " \
           "cancelled before any round was committed" in err
    assert not ck.final_path(server.coordinator.state_dir, job).exists()


def test_a_job_whose_directory_the_operator_removed_says_so(tmp_path, make_server, capsys):
    """README.Debian lets hospital IT delete a finished job's directory: fetching it
    then says that, not that its results are still to come."""
    import shutil

    server = make_server()
    coord = server.coordinator
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    job = _submit(tmp_path, server, base, capsys)
    _commit(coord, job, 1)
    assert main([*base, "jobs", "cancel", job]) == 0
    capsys.readouterr()
    shutil.rmtree(ck.job_dir(coord.state_dir, job))
    assert main([*base, "jobs", "fetch", job, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert f"job {job} (cancelled) has no results any more: its directory " in err
    assert "was removed from the coordinator" in err


@pytest.mark.parametrize(("umask", "mode"), [(0o077, 0o600), (0o022, 0o644)])
def test_fetched_results_follow_the_operators_umask(tmp_path, make_server, capsys, umask,
                                                    mode):
    """A model trained on patient data and the report's per-site metrics are not made
    readable by every local user when the operator's umask says otherwise."""
    server = make_server()
    coord = server.coordinator
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    job = _submit(tmp_path, server, base, capsys)
    _commit(coord, job, 1)
    coord.on_job_completed = lambda j: write_job_report(
        ck.job_dir(coord.state_dir, j), coord.job_status(j), coord.store.job(j).plan_toml)
    assert main([*base, "jobs", "cancel", job]) == 0
    old = os.umask(umask)
    try:
        assert main([*base, "jobs", "fetch", job, "--out", str(tmp_path / "r")]) == 0
    finally:
        os.umask(old)
    files = list((tmp_path / "r" / job).iterdir())
    assert {p.name for p in files} >= {"final.safetensors", "report.md", "report.json"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.name: mode for p in files}
