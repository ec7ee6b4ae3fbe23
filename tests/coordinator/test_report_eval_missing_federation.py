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
    def evaluate(self, plan, weights, split):
        raise TaskRefusal(NO_VAL)


class AllCensored(SyntheticTrainer):
    def evaluate(self, plan, weights, split):
        n, _ = super().evaluate(plan, weights, split)
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
