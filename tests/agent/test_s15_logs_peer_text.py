"""What the coordinator sends cannot forge lines in the appliance's log.

DESIGN: the appliance does not trust the coordinator. A coordinator that put
"\\n<date> fedge-agent[1] ERROR ...\\x1b[31m" in a message's job wrote a fake ERROR
line, with terminal escapes, into the agent's log (logs review, session 15, M1).
Each log record the agent writes here must be one printable line.
"""

from __future__ import annotations

import asyncio
import logging

import msgpack
import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer, TaskRefusal
from fedge.coordinator.checkpoint import model_digest
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
[model]
name = "linear"
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = false
clip = 0.25
"""

FORGED = ("job-20261130181043-c497f8\n2026-11-30 18:00:00,000 fedge-agent[1] ERROR "
          "fedge.agent: FORGED \x1b[31mRED\x1b[0m\x1b]0;title\x07")


class Link:
    def __init__(self, agent: Agent) -> None:
        self.sent: list[codec.Envelope] = []
        agent.send_frames = self.send

    async def send(self, frames):
        self.sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24))


def train_task() -> m.TrainTask:
    w = np.zeros(4, np.float32)
    return m.TrainTask(task_id="t1", plan=PLAN, weights=w,
                       model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                       quant_seed=b"\x01" * 16)


def with_job(frames: list[bytes], job: str) -> list[bytes]:
    """The message as a hostile coordinator sends it: its header's job replaced
    (encode itself refuses such a job)."""
    header = msgpack.unpackb(frames[0])
    header["job"] = job
    return [msgpack.packb(header), *frames[1:]]


def one_printable_line_each(records: list[logging.LogRecord]) -> None:
    for r in records:
        text = r.getMessage()
        assert text.isprintable(), f"{r.levelname} {text!r}"


def test_a_job_with_a_forged_line_is_dropped_and_logged_escaped(caplog) -> None:
    # an appliance requiring secure aggregation refuses this plan, naming the job
    agent = Agent("site-a", SyntheticTrainer("site-a"))
    link = Link(agent)
    frames = [bytes(f) for f in codec.encode(train_task(), sender="coordinator",
                                             job="job-1", round=1)]
    with caplog.at_level(logging.DEBUG, logger="fedge"):
        asyncio.run(agent.handle_frames(with_job(frames, FORGED)))
    records = [r for r in caplog.records if r.name.startswith("fedge")]
    assert records
    one_printable_line_each(records)
    assert not any(r.levelno >= logging.ERROR for r in records)
    (dropped,) = [r.getMessage() for r in records if "malformed" in r.getMessage()]
    assert "header.job" in dropped and "must be printable" in dropped
    assert link.sent == [] and agent.task is None  # nothing done for such a message


def test_a_refusal_reason_quoting_peer_text_is_logged_on_one_line(caplog) -> None:
    class Refusing(SyntheticTrainer):
        def train(self, *a, **k):
            # a refusal that quotes what the coordinator sent, unescaped
            raise TaskRefusal("column 'age\nERROR fedge.agent: FORGED \x1b[31m' is missing")

    agent = Agent("site-a", Refusing("site-a"),
                  policy=PrivacyPolicy(require_secure_aggregation=False))
    link = Link(agent)
    frames = codec.encode(train_task(), sender="coordinator", job="job-1", round=1)
    with caplog.at_level(logging.DEBUG, logger="fedge"):
        asyncio.run(agent.handle_frames([bytes(f) for f in frames]))
    (refused,) = [e.body for e in link.sent if isinstance(e.body, m.TaskRefused)]
    assert "FORGED" in refused.reason
    lines = [r.getMessage() for r in caplog.records if "refusing train" in r.getMessage()]
    assert lines and "age\\nERROR" in lines[0] and "\\x1b[31m" in lines[0]
    one_printable_line_each([r for r in caplog.records if r.name.startswith("fedge")])
