"""The agent declares each data set's standardisation (DatasetClasses.standardise,
plan-matrix review s16 MEDIUM 3) before its heartbeats: agent.toml's
datasets.standardise for tables ("continuous" by default), "none" for images (not
standardised), nothing for a numpy data set with a fitted mode (whether it is a
table is known only once read). A coordinator of the build before the field refuses
it by name: the agent then leaves it out and keeps sending the tasks and input
shapes that coordinator checks (it used to fall back to the class lists alone for
any later field)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import msgpack

from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer
from fedge.wire import codec
from fedge.wire import messages as m

TABLES = [
    {"name": "brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca", "site": 1},
    {"name": "cls", "kind": "tabular", "path": "/nonexistent/c.csv", "task": "binary",
     "target": "y", "features": ["a", "b"], "standardise": "all"},
    {"name": "raw", "kind": "tabular", "path": "/nonexistent/r.csv", "task": "binary",
     "target": "y", "features": ["a"], "standardise": "none"},
    {"name": "scans", "kind": "images", "path": "/nonexistent/scans", "task": "multiclass",
     "classes": ["a", "b", "c"], "image_size": 48},
    {"name": "arrays", "kind": "numpy", "path": "/nonexistent/a.npz", "task": "binary"},
]


def test_each_data_set_declares_how_it_is_standardised_here():
    agent = Agent("h1", TorchTrainer(TABLES))
    assert agent.declared_standardise() == {
        "brca": "continuous", "cls": "all", "raw": "none", "scans": "none"}


@dataclass(frozen=True)
class DatasetClasses:
    """DatasetClasses as the build before ``standardise`` declared it."""

    classes: dict[str, list[str]]
    tasks: dict[str, str] = field(default_factory=dict, metadata=codec.ADDED_LATER)
    input_shapes: dict[str, list[int]] = field(default_factory=dict,
                                               metadata=codec.ADDED_LATER)


class CoordinatorBeforeStandardise:
    """Stands in for a coordinator of the build before DatasetClasses.standardise: its
    schema of the message, this codec's decoding rules, and its answer to a message
    it cannot decode (Rejected with the error's class and text)."""

    def __init__(self) -> None:
        self.received: list[DatasetClasses] = []
        self.rejected: list[str] = []

    async def take(self, agent: Agent, frames: list) -> None:
        frames = [bytes(f) for f in frames]
        env = codec.decode(frames, max_bytes=1 << 24)
        if not isinstance(env.body, m.DatasetClasses):
            return
        try:
            self.received.append(codec._dec(
                codec._struct_node(DatasetClasses), msgpack.unpackb(frames[1], raw=False),
                "body", codec._DecodeContext([], None)))
        except codec.WireError as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.rejected.append(reason)
            await agent.handle_frames([bytes(f) for f in codec.encode(
                m.Rejected(reason), sender="coordinator")])


def test_a_coordinator_before_the_field_keeps_getting_tasks_and_shapes(caplog):
    agent = Agent("h1", TorchTrainer(TABLES[:1] + TABLES[3:4]))
    coordinator = CoordinatorBeforeStandardise()

    async def send(frames: list) -> None:
        await coordinator.take(agent, frames)

    agent.send_frames = send
    asyncio.run(agent.handle_frames([bytes(f) for f in codec.encode(
        m.HeartbeatAck(time=1.0, coordinator_version="0.3.0"), sender="coordinator")]))
    with caplog.at_level(logging.DEBUG, logger="fedge.agent"):
        for _ in range(3):
            asyncio.run(agent.heartbeat())
    assert coordinator.rejected == [
        "UnexpectedField: body.standardise: 'standardise' is not a field of DatasetClasses"]
    assert coordinator.received == [DatasetClasses(
        {"scans": ["a", "b", "c"]}, {"brca": "survival", "scans": "multiclass"},
        {"brca": [39], "scans": [1, 48, 48]})] * 2
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "refused the data sets' standardisation" in warned
    assert "DP-SGD plans are not checked against it there" in warned
