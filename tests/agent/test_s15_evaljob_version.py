"""A job's evaluation reads the data version the job trains on (the runtime's
EvalTask path, real Agent over TorchTrainer, real wire encoding).

A data manager re-exports the site's file in place while a job runs: the job keeps
the rows it began on for all its rounds (tests/agent/test_s15_datacache.py), and its
evaluations must use the same rows, or its metrics describe data its model never
trained on."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent, rounded_metrics
from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.coordinator.plan import parse_plan
from fedge.secagg.keys import Identity, Roster
from fedge.wire import codec
from fedge.wire import messages as m
from tests.agent.test_s15_datacache import MONTHS, YEARS, export

SITE = "site-0"
PLAN = """
[job]
dataset = "onc"
rounds = 3
seed = 5
eval_split = "val"
[model]
name = "cox_linear"
params = { in_features = 1 }
[train]
steps = 3
batch_size = 8
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = false
"""


def table(path: Path) -> dict:
    return {"name": "onc", "kind": "tabular", "path": str(path), "task": "survival",
            "features": ["age"], "event": "E", "time": "T", "standardise": "none",
            "val_fraction": 0.25}


class Coordinator:
    """The coordinator, played by the test: sends one message, keeps the replies."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.inbox: list[object] = []

        async def send(frames: list) -> None:
            self.inbox.append(codec.decode([bytes(f) for f in frames],
                                           max_bytes=1 << 24).body)

        agent.send_frames = send

    def deliver(self, job: str, body: object) -> list[object]:
        self.inbox.clear()
        frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job=job,
                                                  round=1)]
        asyncio.run(self.agent.handle_frames(frames))
        return list(self.inbox)


def test_a_jobs_evaluation_after_a_re_export_reads_the_rows_the_job_trains_on(tmp_path):
    """job-1 trains round 1 on ages in months; the file is then corrected to years in
    place. job-1's EvalTask is answered with the metrics of the months (those its
    training keeps), not of the years; a job that begins now is evaluated on the
    years. Before the runtime passed the job to evaluate(), job-1's evaluation read
    the years."""
    path = tmp_path / "onc.csv"
    export(path, MONTHS)
    trainer = TorchTrainer([table(path)])
    console = Identity.generate()
    identity = Identity.generate()
    agent = Agent(SITE, trainer, identity=identity,
                  roster=Roster.build({SITE: identity.public_bytes()}, console),
                  roster_key=console.public_bytes(),
                  policy=PrivacyPolicy(require_secure_aggregation=False, min_cohort=2))
    coord = Coordinator(agent)
    w0 = np.zeros(2, np.float32)
    [done] = coord.deliver("job-1", m.TrainTask(
        task_id="t1", plan=PLAN, weights=w0, model_digest=bytes.fromhex(model_digest(w0)),
        train_seed=42, quant_seed=b"\x01" * 16))
    assert isinstance(done, m.TrainDone), done

    first = os.stat(path)
    export(path, YEARS)  # the same size, inode and modification time
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))

    weights = np.array([0.3, -0.2], np.float32)
    plan = parse_plan(PLAN)
    months = rounded_metrics(trainer.evaluate(plan, weights, "val", job="job-1")[1])
    years = rounded_metrics(trainer.evaluate(plan, weights, "val")[1])
    assert months["loss"] != years["loss"]  # the versions tell apart

    [result] = coord.deliver("job-1", m.EvalTask(task_id="e1", plan=PLAN, weights=weights,
                                                 split="val"))
    assert isinstance(result, m.EvalResult), result
    assert result.metrics == months
    [later] = coord.deliver("job-2", m.EvalTask(task_id="e2", plan=PLAN, weights=weights,
                                                split="val"))
    assert isinstance(later, m.EvalResult) and later.metrics == years
