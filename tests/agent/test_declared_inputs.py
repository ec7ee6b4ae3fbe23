"""Before each heartbeat an agent declares each data set's task and input shape from
its agent.toml [[datasets]] tables (DatasetClasses.tasks / input_shapes), without
reading any data, so that the coordinator can refuse at submission a plan whose model
the data rules out (fedge.coordinator.service.submission_warnings)."""

from __future__ import annotations

import asyncio

from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer, TorchTrainer
from fedge.wire import codec
from fedge.wire import messages as m

TABLES = [
    {"name": "brca", "kind": "fed_tcga_brca", "path": "/nonexistent/brca", "site": 1},
    {"name": "brca-12", "kind": "fed_tcga_brca", "path": "/nonexistent/brca", "site": 2,
     "features": [f"f{j}" for j in range(12)]},
    {"name": "admissions", "kind": "tabular", "path": "/nonexistent/a.csv",
     "task": "regression", "target": "days", "features": ["age", "bmi", "sex"]},
    {"name": "scans", "kind": "images", "path": "/nonexistent/scans", "task": "multiclass",
     "classes": ["a", "b", "c"], "image_size": 48},
    {"name": "arrays", "kind": "numpy", "path": "/nonexistent/x.npz", "task": "binary"},
]


def _sent_by_heartbeat(agent: Agent) -> list[object]:
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    return sent


def test_each_data_sets_task_and_input_shape_go_before_the_heartbeat():
    sent = _sent_by_heartbeat(Agent("h1", TorchTrainer(TABLES)))
    assert [type(b) for b in sent] == [m.DatasetClasses, m.Heartbeat]
    declared = sent[0]
    assert declared.tasks == {"brca": "survival", "brca-12": "survival",
                              "admissions": "regression", "scans": "multiclass",
                              "arrays": "binary"}
    # FLamby's 39 columns unless declared; images load single-channel at image_size;
    # a numpy file's shape is known only once it is read
    assert declared.input_shapes == {"brca": [39], "brca-12": [12], "admissions": [3],
                                     "scans": [1, 48, 48]}
    assert declared.classes == {"scans": ["a", "b", "c"]}


def test_a_site_with_only_a_table_now_declares_it():
    sent = _sent_by_heartbeat(Agent("h1", TorchTrainer(TABLES[:1])))
    assert [type(b) for b in sent] == [m.DatasetClasses, m.Heartbeat]
    assert sent[0] == m.DatasetClasses(classes={}, tasks={"brca": "survival"},
                                       input_shapes={"brca": [39]},
                                       standardise={"brca": "continuous"})


def test_a_trainer_without_agent_toml_tables_sends_the_heartbeat_alone():
    sent = _sent_by_heartbeat(Agent("h1", SyntheticTrainer("h1")))
    assert [type(b) for b in sent] == [m.Heartbeat]


def test_a_coordinator_that_refuses_the_message_is_not_sent_it_again():
    """A release-0.2.0 coordinator does not know DatasetClasses: one Rejected, then the
    heartbeats go alone until its version changes."""
    agent = Agent("h1", TorchTrainer(TABLES[:1]))
    frames = [bytes(f) for f in codec.encode(
        m.HeartbeatAck(time=1.0, coordinator_version="0.2.0"), sender="coordinator")]
    asyncio.run(agent.handle_frames(frames))
    reason = f"UnknownMessageType: header.type: {m.DatasetClasses.__wire_type__!r} unknown"
    frames = [bytes(f) for f in codec.encode(m.Rejected(reason), sender="coordinator")]
    asyncio.run(agent.handle_frames(frames))
    assert [type(b) for b in _sent_by_heartbeat(agent)] == [m.Heartbeat]
