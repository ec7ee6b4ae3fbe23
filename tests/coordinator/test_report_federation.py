"""What an ML engineer running a job learns from the coordinator's records, through
the real coordinator, agents and SQLite store in memory (tests/coordinator/conftest.py):
why a site was dropped from a round that still committed, the final model's test,
and a failed job's last committed model."""

from __future__ import annotations

import asyncio
import json

import numpy as np

from fedge.agent.trainer import SyntheticTrainer, TaskRefusal
from fedge.console.cli import watch_job
from fedge.console.protocol import AdminRequest
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.report import write_job_report
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import run

PLAN = """
[job]
dataset = "synthetic"
rounds = {rounds}
min_clients = 2
seed = 11
eval_split = "val"
max_failed_attempts = 1
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = {secure}
alpha = 0.1
delta = 0.25
clip = 1.0
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 3
eval_s = 3
"""

MISSING = ("/srv/data/bin_missing.csv, line 1, column 'sbp': missing column in the header; "
           "the data set's agent.toml features name it")


class MissingColumn(SyntheticTrainer):
    """A site whose CSV lacks a declared column: it refuses to train, saying so."""

    def train(self, *args, **kwargs):
        raise TaskRefusal(MISSING)


class NoTestSplit(SyntheticTrainer):
    def evaluate(self, plan, weights, split, *, job=None):
        if split == "test":
            raise TaskRefusal("evaluation failed: ValueError: this site has no 'test' split")
        return super().evaluate(plan, weights, split, job=job)


def _watch(coord, job):
    lines: list[str] = []
    watch_job(lambda op, a: (coord.job_status(a["job_id"]), None), job, interval_s=0,
              out=lines.append, results_wait_s=0)
    return lines


def test_why_a_site_was_dropped_reaches_watch_status_and_the_report(federation, tmp_path):
    fed = federation(["a", "b", "c", "d"])  # SecAgg+ over the three that train
    fed.agents["c"].trainer = MissingColumn("c", n_examples=30)
    job = run(fed, PLAN.format(rounds=2, secure="true"))
    coord = fed.coord
    assert coord.store.job(job).status == "completed", coord.store.job(job).error
    rounds = coord.job_status(job)["rounds"]  # what `jobs status` prints
    assert [(r["round"], r["status"], r["dropped"], r["dropped_reasons"]) for r in rounds] \
        == [(1, "committed", ["c"], {"c": MISSING}), (2, "committed", ["c"], {"c": MISSING})]
    lines = _watch(coord, job)
    committed = [i for i, line in enumerate(lines) if " committed in " in line]
    assert [lines[i + 1] for i in committed] == [f"  dropped c: {MISSING}"] * 2
    assert "3 of 4 site(s)" in lines[committed[0]]
    write_job_report(tmp_path, coord.job_status(job), coord.store.job(job).plan_toml)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dropped"] == {"1": {"c": MISSING}, "2": {"c": MISSING}}
    assert f"| c | c: {MISSING} |" in (tmp_path / "report.md").read_text()


def test_the_final_model_is_evaluated_once_on_the_sites_test_split(federation, tmp_path):
    fed = federation(["a", "b", "c"])
    fed.agents["c"].trainer = NoTestSplit("c", n_examples=30)
    job = run(fed, PLAN.format(rounds=2, secure="false"))
    coord = fed.coord
    assert coord.store.job(job).status == "completed", coord.store.job(job).error
    rows = coord.store.metrics(job)
    tested = {(r["round"], r["site"]) for r in rows if r["split"] == "test"}
    assert tested == {(2, "a"), (2, "b"), (2, "*")}  # once, after the last round
    assert {r["round"] for r in rows if r["split"] == "val" and r["site"] == "*"} == {1, 2}
    status = coord.job_status(job)
    test = status["final_test"]
    assert test["round"] == 2 and set(test["metrics"]["loss"]["sites"]) == {"a", "b"}
    want = {r["site"]: r["value"] for r in rows if r["split"] == "test"}
    assert test["metrics"]["loss"]["aggregate"] == want["*"]
    assert test["missing"] == {
        "c": "evaluation failed: ValueError: this site has no 'test' split"}
    lines = _watch(coord, job)
    assert (f"final test (round 2's model, test split): loss {want['*']:.4f} over 2 site(s); "
            "not evaluated: c: evaluation failed: ValueError: this site has no 'test' "
            "split") in lines
    # the round lines stay the rounds' own evaluation (val), not the final test
    assert all(" test " not in line for line in lines if " committed in " in line)
    write_job_report(tmp_path, status, coord.store.job(job).plan_toml)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_split"] == "val"
    assert report["final_test"]["metrics"]["loss"]["aggregate"] == want["*"]
    md = (tmp_path / "report.md").read_text()
    assert "## Final test: round 2's model on each site's `test` split" in md
    assert "Not in the final test: c: evaluation failed" in md
    # the final checkpoint's metrics (the ONNX metadata's) hold the final test too
    final = ck.load_checkpoint(ck.final_path(coord.state_dir, job))
    assert final.metrics["test/loss"] == want["*"]


def test_a_job_that_fails_after_a_committed_round_keeps_that_model_as_its_result(
        federation):
    fed = federation(["a", "b", "c"])
    coord = fed.coord
    ended: list[str] = []
    coord.on_job_completed = ended.append
    job_box: list[str] = []

    def kill(site, body):  # two sites go dark once round 1 is committed
        return (site in "bc" and isinstance(body, m.TrainTask) and bool(job_box)
                and coord.store.job(job_box[0]).committed_round >= 1)

    fed.kill_hook = kill

    async def go():
        await fed.heartbeats()
        job_box.append(coord.submit_job(PLAN.format(rounds=3, secure="false"), actor="t"))
        await fed.pump(until=lambda: coord.store.job(job_box[0]).status == "failed")

    asyncio.run(go())
    job = job_box[0]
    assert coord.store.job(job).committed_round == 1 and ended == [job]
    kept = ck.load_checkpoint(ck.final_path(coord.state_dir, job))
    one = ck.load_checkpoint(ck.round_path(coord.state_dir, job, 1))
    assert kept.round == 1
    np.testing.assert_array_equal(kept.weights, one.weights)
    (failed,) = [r for r in coord.job_status(job)["rounds"] if r["status"] == "failed"]
    assert failed["dropped_reasons"] == {"b": "did not answer before the train deadline",
                                         "c": "did not answer before the train deadline"}
    service = AdminService(coord, {"k": Operator("eng", "viewer")})
    reply = service.handle("k", AdminRequest("jobs_fetch", json.dumps({"job_id": job}), {}))
    assert reply.ok, reply.error
    note = json.loads(reply.result_json)["note"]
    assert note.startswith(f"job {job} failed after 1 of 3 round(s) (round 2 failed 1 times")
    assert "this is a failed job's last committed model (round 1)" in note
    assert "final.safetensors" in reply.blobs
