"""`jobs fetch --wait` ends as soon as the coordinator records that the job's report
failed while the console waits (diff review s16 L2): the wait watched only for
report.md in jobs_status, which a failed report never adds, so the console sat out
all of --wait (180 s by default) before its last fetch named the failure. Through the
real CLI, a real coordinator (SQLite, its admin channel on loopback) and its real
finish_job (the ONNX export child, then the report, which fails)."""

from __future__ import annotations

import json
import time

import numpy as np

from fedge.cli import main
from fedge.coordinator import checkpoint as ck
from tests.console.test_s16_fetch_results import _completed, _finish

WAIT_S = 60  # --wait: the old console sat it all out


def test_a_report_failing_during_the_wait_ends_it_with_the_failure_named(
        tmp_path, make_server, capsys):
    server = make_server()
    base, job = _completed(tmp_path, server, capsys,
                           np.array([0.3, -0.2, 0.1, 0.0], np.float32))
    jdir = ck.job_dir(server.coordinator.state_dir, job)
    (jdir / "report.json").mkdir()  # the report's write cannot replace a directory
    finishing = _finish(server, job, after_s=1.0)  # begins once the console waits
    out = tmp_path / "r"
    started = time.monotonic()
    assert main([*base, "jobs", "fetch", job, "--wait", str(WAIT_S), "--out",
                 str(out)]) == 0
    waited = time.monotonic() - started
    finishing.result(timeout=120)
    (failed,) = server.coordinator.store.audit_log(action="report_failed", job=job)
    reason = json.loads(failed["detail"])["reason"]
    captured = capsys.readouterr()
    assert "its results are still being written" in captured.err  # it did wait
    # the export child and the failing report take seconds, not the whole --wait
    assert waited < WAIT_S - 15, waited
    assert {p.name for p in (out / job).iterdir()} == {"final.safetensors", "model.onnx"}
    assert captured.out.splitlines()[-1] == (
        f"note: job {job} completed; its report could not be written ({reason}); a "
        "restart of the coordinator tries again")
