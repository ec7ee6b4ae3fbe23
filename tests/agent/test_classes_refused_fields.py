"""A coordinator built before DatasetClasses.tasks/input_shapes (725d344, which also
reports version 0.2.0) refuses every DatasetClasses that carries them with
"UnexpectedField: body.tasks ...". The agent then sends it the class lists alone, the
form it reads, logging the fallback once: it used to resend the whole message before
every heartbeat and log each refusal (~86 000 lines a day), and the class lists never
arrived, so image jobs naming job.classes left the site out."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import msgpack

from fedge.agent import runtime
from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer
from fedge.wire import codec
from fedge.wire import messages as m

TABLES = [
    {"name": "brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca", "site": 1},
    {"name": "scans", "kind": "images", "path": "/nonexistent/scans", "task": "multiclass",
     "classes": ["a", "b", "c"], "image_size": 48},
]


@dataclass(frozen=True)
class DatasetClasses:
    """DatasetClasses as the 725d344 coordinator declared it: the class lists only."""

    classes: dict[str, list[str]]


class CoordinatorBeforeTheFields:
    """Stands in for the 725d344 coordinator's message handling: its schema of
    DatasetClasses, this codec's decoding rules (which it shared), and its answer to a
    message it cannot decode (Rejected with the error's class and text)."""

    def __init__(self, version: str = "0.2.0") -> None:
        self.version = version
        self.received: list[DatasetClasses] = []
        self.rejected: list[str] = []
        self.heartbeats = 0

    async def take(self, agent: Agent, frames: list) -> None:
        frames = [bytes(f) for f in frames]
        env = codec.decode(frames, max_bytes=1 << 24)
        if isinstance(env.body, m.Heartbeat):
            self.heartbeats += 1
            return
        assert isinstance(env.body, m.DatasetClasses)
        try:
            self.received.append(codec._dec(
                codec._struct_node(DatasetClasses), msgpack.unpackb(frames[1], raw=False),
                "body", codec._DecodeContext([], None)))
        except codec.WireError as exc:
            reason = f"{type(exc).__name__}: {exc}"  # fedge.coordinator.service._reject
            self.rejected.append(reason)
            await agent.handle_frames([bytes(f) for f in codec.encode(
                m.Rejected(reason), sender="coordinator")])

    def ack(self, agent: Agent) -> None:
        asyncio.run(agent.handle_frames([bytes(f) for f in codec.encode(
            m.HeartbeatAck(time=1.0, coordinator_version=self.version),
            sender="coordinator")]))


def _connect(agent: Agent, coordinator: CoordinatorBeforeTheFields) -> None:
    async def send(frames: list) -> None:
        await coordinator.take(agent, frames)

    agent.send_frames = send
    coordinator.ack(agent)


def test_refused_later_fields_make_the_agent_send_the_class_lists_alone_logged_once(caplog):
    agent = Agent("h1", TorchTrainer(TABLES))
    coordinator = CoordinatorBeforeTheFields()
    _connect(agent, coordinator)
    with caplog.at_level(logging.DEBUG, logger="fedge.agent"):
        for _ in range(5):
            asyncio.run(agent.heartbeat())
    assert coordinator.rejected == [
        "UnexpectedField: body.tasks: 'tasks' is not a field of DatasetClasses"]
    assert coordinator.received == [DatasetClasses({"scans": ["a", "b", "c"]})] * 4
    assert coordinator.heartbeats == 5
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1
    assert "refused the data sets' tasks and input shapes" in warned[0].getMessage()
    assert "sent the class lists alone" in warned[0].getMessage()


def test_a_site_with_tables_only_sends_the_heartbeat_alone_after_the_refusal():
    agent = Agent("h1", TorchTrainer(TABLES[:1]))
    coordinator = CoordinatorBeforeTheFields()
    _connect(agent, coordinator)
    for _ in range(3):
        asyncio.run(agent.heartbeat())
    assert len(coordinator.rejected) == 1 and coordinator.received == []
    assert coordinator.heartbeats == 3


def test_a_coordinator_of_another_version_is_sent_the_whole_message_again():
    agent = Agent("h1", TorchTrainer(TABLES))
    sent: list[object] = []
    _connect(agent, CoordinatorBeforeTheFields())
    asyncio.run(agent.heartbeat())  # refused: the class lists alone from now on

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    CoordinatorBeforeTheFields("0.2.1").ack(agent)  # upgraded: its version changed
    asyncio.run(agent.heartbeat())
    assert sent[0] == m.DatasetClasses(classes={"scans": ["a", "b", "c"]},
                                       tasks={"brca": "survival", "scans": "multiclass"},
                                       input_shapes={"brca": [39], "scans": [1, 48, 48]},
                                       standardise={"brca": "continuous", "scans": "none"})


def test_the_whole_message_is_tried_again_later_and_a_repeated_refusal_is_not_logged_again(
        caplog, monkeypatch):
    """A rebuilt coordinator may report the same version: the whole message is tried
    again after CLASSES_ONLY_RETRY_S, and the same coordinator refusing it again is not
    a new warning."""
    monkeypatch.setattr(runtime, "CLASSES_ONLY_RETRY_S", -1.0)  # retry at each heartbeat
    agent = Agent("h1", TorchTrainer(TABLES))
    coordinator = CoordinatorBeforeTheFields()
    _connect(agent, coordinator)
    with caplog.at_level(logging.DEBUG, logger="fedge.agent"):
        for _ in range(3):
            asyncio.run(agent.heartbeat())
    assert len(coordinator.rejected) == 3
    refusals = [r for r in caplog.records if "refused the data sets' tasks" in r.getMessage()]
    assert [r.levelno for r in refusals] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
