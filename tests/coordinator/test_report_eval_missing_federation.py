"""Through the real coordinator, agents and SQLite store in memory: a survivor that
trained but refused the evaluation, and one that answered no metric, are named in
the job's status and its report, each with its reason."""

from __future__ import annotations

import json

from fedge.agent.trainer import SyntheticTrainer, TaskRefusal
from fedge.coordinator.report import write_job_report
from fedge.coordinator.rounds import EVAL_EMPTY
from tests.coordinator.test_federation_inproc import run
from tests.coordinator.test_report_federation import PLAN

NO_VAL = "site 'surv' has no 'val' split (hold one out with a 'split' column)"


class NoValSplit(SyntheticTrainer):
    def evaluate(self, plan, weights, split, *, job=None):
        raise TaskRefusal(NO_VAL)


class AllCensored(SyntheticTrainer):
    def evaluate(self, plan, weights, split, *, job=None):
        n, _ = super().evaluate(plan, weights, split, job=job)
        return n, {}


def test_survivors_not_evaluated_reach_the_status_and_the_report(federation, tmp_path):
    fed = federation(["a", "b", "c"])
    fed.agents["b"].trainer = AllCensored("b", n_examples=30)
    fed.agents["c"].trainer = NoValSplit("c", n_examples=30)
    job = run(fed, PLAN.format(rounds=2, secure="false"))
    coord = fed.coord
    assert coord.store.job(job).status == "completed", coord.store.job(job).error
    status = coord.job_status(job)
    assert [(r["round"], r["survivors"], r["eval_missing"]) for r in status["rounds"]] == \
        [(n, ["a", "b", "c"], {"b": EVAL_EMPTY, "c": NO_VAL}) for n in (1, 2)]
    write_job_report(tmp_path, status, coord.store.job(job).plan_toml)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_missing"] == {str(n): {"b": EVAL_EMPTY, "c": NO_VAL} for n in (1, 2)}
    md = (tmp_path / "report.md").read_text()
    assert f"Not evaluated: b: {EVAL_EMPTY}; c: {NO_VAL}." in md
    assert f"| 2 | c | {NO_VAL} |" in md


def test_sites_left_out_of_a_rounds_cohort_reach_the_status_and_the_report(
        federation, tmp_path):
    """An enrolled, connected site the cohort left out (here: it does not hold the data
    set; in a mixed fleet, an agent too old for the job) was named only while a round
    waited; a job that went on without it said nothing of it afterwards."""
    fed = federation(["a", "b", "c"])
    fed.agents["c"].trainer = SyntheticTrainer("c", dataset="other", n_examples=30)
    job = run(fed, PLAN.format(rounds=2, secure="false"))
    coord = fed.coord
    assert coord.store.job(job).status == "completed", coord.store.job(job).error
    status = coord.job_status(job)
    why = "does not hold data set 'synthetic'"
    assert [(r["round"], r["cohort"], r["left_out"]) for r in status["rounds"]] == \
        [(n, ["a", "b"], {"c": why}) for n in (1, 2)]
    write_job_report(tmp_path, status, coord.store.job(job).plan_toml)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["left_out"] == {str(n): {"c": why} for n in (1, 2)}
    md = (tmp_path / "report.md").read_text()
    assert "## Sites left out of a round's cohort, and why" in md
    assert f"| 1 | c | {why} |" in md and f"| 2 | c | {why} |" in md
    from fedge.console.cli import watch_job

    lines: list[str] = []
    watch_job(lambda op, a: (coord.job_status(a["job_id"]), None), job, interval_s=0,
              out=lines.append, results_wait_s=0)
    assert lines.count(f"  left out c: {why}") == 1  # said once, not every round
