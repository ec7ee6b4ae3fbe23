"""A finished job's report (fedge.coordinator.report), written from the real
coordinator's records of a real job run in memory with SecAgg+."""

from __future__ import annotations

import asyncio
import json

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.process import write_report
from tests.coordinator.test_federation_inproc import plan, run

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_finished_jobs_report_holds_every_round_and_the_final_metrics(federation):
    fed = federation(["a", "b", "c"])
    job = run(fed, plan(rounds=3))
    assert asyncio.run(write_report(fed.coord, job)) is True
    jdir = ck.job_dir(fed.coord.state_dir, job)
    assert (jdir / "learning_curve.png").read_bytes()[:8] == PNG
    assert not (jdir / "privacy.png").exists()  # no DP-SGD in this plan
    report = json.loads((jdir / "report.json").read_text())
    assert [a["round"] for a in report["attempts"]] == [1, 2, 3]
    assert report["status"] == "completed" and report["committed_round"] == 3
    assert report["metrics"] == fed.coord.store.metrics(job)
    split = report["eval_split"]
    last = {(m["site"], m["name"]): m["value"] for m in fed.coord.store.metrics(job)
            if m["round"] == 3 and m["split"] == split}
    for name, final in report["final"].items():
        assert final["aggregate"] == last["*", name]
        assert final["sites"] == {s: last[s, name] for s in "abc"}
        assert report["curves"][name]["rounds"] == [1, 2, 3]
    md = (jdir / "report.md").read_text()
    assert md.startswith(f"# Job {job}: completed") and "![learning_curve.png]" in md
    assert "| **aggregate** |" in md and 'name = "fedavg"' in md
    (entry,) = fed.coord.store.audit_log(action="report_written")
    assert json.loads(entry["detail"])["files"] == ["report.json", "report.md",
                                                   "learning_curve.png"]


def test_a_report_that_cannot_be_written_is_audited_and_the_job_stays_completed(federation):
    fed = federation(["a", "b", "c"])
    job = run(fed, plan(rounds=1))
    assert fed.coord.store.job(job).status == "completed"
    (ck.job_dir(fed.coord.state_dir, job) / "report.md").mkdir()  # in the way
    assert asyncio.run(write_report(fed.coord, job)) is False
    (entry,) = fed.coord.store.audit_log(action="report_failed")
    assert job in entry["detail"]
    assert fed.coord.store.job(job).status == "completed"
    assert ck.final_path(fed.coord.state_dir, job).exists()


def test_the_report_says_what_a_cox_models_epsilon_bounds() -> None:
    from fedge.coordinator.report import privacy_bound, summarise

    rows = [{"site": "a", "split": "privacy", "name": "epsilon_job", "round": 1,
             "value": 1.5}]
    status = {"job_id": "j", "metrics": rows, "rounds": []}
    from tests.coordinator.test_plan_cox_dp import PLAN

    cox = PLAN.format(model="cox_linear", extra=", cox_per_term = true")
    assert summarise(status, cox)["privacy_bound"] == "per loss term, not a record-level bound"
    assert summarise(status, PLAN.format(model="logistic", extra=""))["privacy_bound"] == \
        "per record"
    assert summarise({**status, "metrics": []}, cox)["privacy_bound"] is None  # no DP-SGD
    assert privacy_bound("not toml [") == "per record"


def test_a_named_jobs_report_carries_its_name_in_the_title(federation):
    fed = federation(["a", "b", "c"])
    # TOML "\\q": the name holds "$\q$", which matplotlib could not parse as mathtext
    job = run(fed, plan(rounds=1).replace("[job]\n", '[job]\nname = "sbp $\\\\q$ | try 2"\n'))
    assert asyncio.run(write_report(fed.coord, job)) is True
    jdir = ck.job_dir(fed.coord.state_dir, job)
    md = (jdir / "report.md").read_text()
    assert md.startswith(f"# Job {job} (sbp \\$\\q\\$ \\| try 2): completed\n")
    assert json.loads((jdir / "report.json").read_text())["name"] == "sbp $\\q$ | try 2"
    assert (jdir / "learning_curve.png").read_bytes()[:8] == PNG
