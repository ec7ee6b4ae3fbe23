"""An agent refuses a task whose plan names job.classes other than the class list its
data set declares (agent.toml datasets.classes): its labels would be summed flipped."""

from __future__ import annotations

import asyncio

import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
classes = {classes}
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
"""


class ImageLikeTrainer(SyntheticTrainer):
    def __init__(self, site: str, classes: tuple[str, ...] | None) -> None:
        super().__init__(site)
        self.classes = classes

    def class_names(self, name: str) -> tuple[str, ...] | None:
        return self.classes if name == self.dataset else None


def _answers(agent: Agent, body: object) -> list[object]:
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job="j", round=1)]
    asyncio.run(agent.handle_frames(frames))
    return sent


def _tasks(classes: str) -> tuple[m.TrainTask, m.EvalTask]:
    w = np.zeros(4, np.float32)
    plan = PLAN.format(classes=classes)
    return (m.TrainTask(task_id="t1", plan=plan, weights=w,
                        model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                        quant_seed=b"\x01" * 16),
            m.EvalTask(task_id="e1", plan=plan, weights=w, split="test"))


def _agent(classes: tuple[str, ...] | None) -> Agent:
    return Agent("h2", ImageLikeTrainer("h2", classes),
                 policy=PrivacyPolicy(require_secure_aggregation=False))


def test_train_and_eval_tasks_naming_another_class_order_are_refused_with_both_lists():
    agent = _agent(("ring", "blob"))
    for body in _tasks('["blob", "ring"]'):
        (refused,) = _answers(agent, body)
        assert isinstance(refused, m.TaskRefused)
        assert refused.reason.startswith(
            "the plan's job.classes ['blob', 'ring'] differs from the classes ['ring', "
            "'blob'] that h2 declares for data set 'synthetic' in agent.toml")


def test_a_plan_naming_classes_for_a_data_set_that_declares_none_is_refused():
    (refused, _) = (*_answers(_agent(None), _tasks('["a", "b"]')[0]), None)
    assert isinstance(refused, m.TaskRefused) and "declares none at h2" in refused.reason


def test_tasks_of_the_sites_own_order_run():
    agent = _agent(("blob", "ring"))
    train, ev = _tasks('["blob", "ring"]')
    assert [type(b) for b in _answers(agent, train)] == [m.TrainDone]
    assert [type(b) for b in _answers(agent, ev)] == [m.EvalResult]


def test_each_heartbeat_is_preceded_by_the_class_lists():
    agent = _agent(("blob", "ring"))
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    assert [type(b) for b in sent] == [m.DatasetClasses, m.Heartbeat]
    assert sent[0].classes == {"synthetic": ["blob", "ring"]}


def test_class_lists_past_the_wires_bounds_are_refused_in_the_config_and_never_stop_a_heartbeat(
):
    """1001 classes passed the agent config and then made building DatasetClasses raise
    inside the heartbeat, so the site sent no heartbeat at all, silently."""
    import pytest

    from fedge.train.data import DatasetSpec

    many = [f"c{i}" for i in range(1001)]
    with pytest.raises(ValueError, match="lists 1001 classes, at most 1000"):
        DatasetSpec.from_config(dict(name="scans", kind="images", path="/x",
                                     task="multiclass", classes=many))
    with pytest.raises(ValueError, match="a class name of 256 characters, at most 255"):
        DatasetSpec.from_config(dict(name="scans", kind="images", path="/x",
                                     task="binary", classes=["a", "b" * 256]))
    agent = _agent(tuple(many))  # a trainer that bypasses the config check
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    assert [type(b) for b in sent] == [m.Heartbeat]


def test_class_lists_too_large_together_for_one_message_never_stop_a_heartbeat():
    """Each data set within the bounds, five of them together over the message's 1 MiB:
    the lists are not sent (logged), the heartbeat is."""

    class FiveSets(SyntheticTrainer):
        def datasets(self) -> list[str]:
            return [f"set{i}" for i in range(5)]

        def class_names(self, name: str) -> tuple[str, ...] | None:
            return tuple(f"{i:04d}" + "c" * 251 for i in range(1000))

    agent = Agent("h2", FiveSets("h2"), policy=PrivacyPolicy(require_secure_aggregation=False))
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    assert [type(b) for b in sent] == [m.Heartbeat]


def test_the_heartbeat_names_the_software_the_launcher_runs(monkeypatch):
    """Under the unit's launcher a slot's fedge may carry no metadata of its own, so
    fedge.__version__ named the packaged install's version while the slot's code ran."""
    from fedge.update.ab import SLOT_ENV

    monkeypatch.setenv(SLOT_ENV, "9.9.9")
    agent = _agent(None)
    sent: list[object] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24).body)

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    (beat,) = [b for b in sent if isinstance(b, m.Heartbeat)]
    assert beat.version == "9.9.9"
