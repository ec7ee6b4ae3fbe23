"""A job's later rounds do not look at its data set's source again (bigsite review, M1
and M2). The agent loads a task's data set before the task's own clock starts; it used
to do so for no job, so before every task it walked the source (a folder: one ``stat``
per image, 3-5 s at 500k images) and, after a re-export that landed mid-job, read the
new version in full inside the running job's round, which then trained on the version
it began on anyway. Now only a job's first task looks at the source, once; a job that
begins after the re-export reads it.

Real agent (fedge.agent.runtime.Agent) and real TorchTrainer on a CSV file; the walks
are counted by wrapping the trainer's own ``source_version``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest

import fedge.agent.trainer as trainer_module
from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.wire import messages as m
from tests.agent.test_runtime import PLAIN_OK, Link, deliver

PLAN = """
[job]
dataset = "onc"
rounds = 3
min_clients = 2
eval_split = "val"
[model]
name = "cox_linear"
params = { in_features = 1 }
[train]
steps = 2
batch_size = 8
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = false
clip = 0.25
"""
W0 = np.zeros(2, np.float32)


def export(path: Path, ages: list[int]) -> None:
    """What a data manager's nightly export writes, in place."""
    with open(path, "w") as f:
        f.write("age,E,T\n" + "".join(f"{a},{i % 2},{100 + i}\n" for i, a in enumerate(ages)))


def train_task(task_id: str) -> m.TrainTask:
    return m.TrainTask(task_id=task_id, plan=PLAN, weights=W0,
                       model_digest=bytes.fromhex(model_digest(W0)), train_seed=1,
                       quant_seed=b"\x01" * 16)


@pytest.fixture
def walks(monkeypatch) -> list[str]:
    """Every look the trainer takes at a data set's source, by path."""
    seen: list[str] = []
    real = trainer_module.source_version

    def counted(path):  # type: ignore[no-untyped-def]
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(trainer_module, "source_version", counted)
    return seen


def test_a_re_export_mid_job_is_neither_looked_at_nor_read_by_the_jobs_later_rounds(
        tmp_path, caplog, walks):
    path = tmp_path / "onc.csv"
    export(path, list(range(40, 80)))
    trainer = TorchTrainer([{"name": "onc", "kind": "tabular", "path": str(path),
                             "task": "survival", "features": ["age"], "event": "E",
                             "time": "T", "standardise": "none", "val_fraction": 0.25}])
    agent = Agent("site-0", trainer, policy=PLAIN_OK)
    link = Link(agent)

    async def job1_round(rnd: int) -> None:
        await deliver(agent, train_task(f"t{rnd}"), job="job-1", rnd=rnd)
        await deliver(agent, m.EvalTask(task_id=f"e{rnd}", plan=PLAN, weights=W0,
                                        split="val"), job="job-1", rnd=rnd)

    asyncio.run(job1_round(1))
    assert len(walks) == 2  # its first task: before the read and after it, unchanged since
    began_on = trainer._data["onc"]

    export(path, list(range(50, 95)))  # the corrected export lands mid-job
    walks.clear()
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        asyncio.run(job1_round(2))
    assert walks == []  # neither looked at nor read: job-1 keeps what it began on
    assert trainer._data["onc"] is began_on
    assert "re-read" not in caplog.text
    done = link.bodies(m.TrainDone)
    assert len(done) == 2 and done[1].n_examples == 30  # 40 rows, 0.25 of them for val
    assert [r.n_examples for r in link.bodies(m.EvalResult)] == [10, 10]

    # a job that begins now reads the re-export, once
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        asyncio.run(deliver(agent, train_task("u1"), job="job-2", rnd=1))
    assert [r.getMessage().split(":")[0] for r in caplog.records
            if "re-read" in r.getMessage()] == ["data set 'onc' re-read"]
    assert trainer._data["onc"] is not began_on
    assert link.bodies(m.TrainDone)[-1].n_examples == 34  # 45 rows, 11 for val

    # and a job that begins on an unchanged source looks at it once, not once per call
    walks.clear()
    asyncio.run(deliver(agent, train_task("v1"), job="job-3", rnd=1))
    assert walks == [str(path)]
    assert link.bodies(m.TrainDone)[-1].n_examples == 34
