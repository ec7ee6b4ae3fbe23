"""The plan's model image_size meets the site's data: another size is refused at the
site, naming both, before a step is trained on images of another scale."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from PIL import Image

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.checkpoint import model_digest
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "scans"
rounds = 1
min_clients = 2
[model]
name = "resnet_small"
params = {{ classes = 2, width = 4, image_size = {size} }}
[train]
steps = 1
batch_size = 2
learning_rate = 0.1
[strategy]
name = "fedavg"
[secagg]
enabled = false
"""


def _site(tmp_path: Path) -> TorchTrainer:
    for k, name in enumerate(["blob", "ring"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * (k + i), np.uint8)).save(
                tmp_path / name / f"{i}.png")
    return TorchTrainer([{"name": "scans", "kind": "images", "path": str(tmp_path),
                          "task": "binary", "classes": ["blob", "ring"], "image_size": 16}])


def _refusals(agent: Agent, body: object) -> list[m.TaskRefused]:
    sent: list[codec.Envelope] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24))

    agent.send_frames = send
    frames = [bytes(f) for f in codec.encode(body, sender="coordinator", job="j", round=1)]
    asyncio.run(agent.handle_frames(frames))
    return [e.body for e in sent if isinstance(e.body, m.TaskRefused)]


def test_a_plan_whose_image_size_differs_from_the_sites_is_refused_naming_both(tmp_path):
    agent = Agent("h1", _site(tmp_path), policy=PrivacyPolicy(require_secure_aggregation=False))
    w = np.zeros(64, np.float32)
    train = m.TrainTask(task_id="t1", plan=PLAN.format(size=32), weights=w,
                        model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                        quant_seed=b"\x01" * 16)
    (refused,) = _refusals(agent, train)
    assert "loaded at 16x16 pixels at this site (agent.toml datasets.image_size = 16)" \
        in refused.reason
    assert "takes 32x32 (model.params.image_size = 32" in refused.reason
    ev = m.EvalTask(task_id="e1", plan=PLAN.format(size=32), weights=w, split="test")
    (refused,) = _refusals(agent, ev)
    assert refused.task == m.TASK_EVAL and "model.params.image_size = 32" in refused.reason


def test_a_plan_of_the_sites_image_size_trains(tmp_path):
    from fedge.coordinator.plan import parse_plan
    from fedge.coordinator.service import torch_initial_weights

    plan = parse_plan(PLAN.format(size=16))
    out = _site(tmp_path).train("h1", "j", plan, torch_initial_weights(plan), round=1, seed=1)
    assert out.n_examples > 0
