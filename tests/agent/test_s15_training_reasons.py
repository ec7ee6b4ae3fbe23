"""When a site's training fails on the plan (a model that does not fit the data, a
learning rate that diverges, memory that runs out), the reason the coordinator keeps
for good says what to change in the plan, with the sizes and steps involved: never a
value of the data, the data set's path or a library's own text (which may quote a
cell). Each reason is read as the coordinator decodes the agent's TaskRefused."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import TorchTrainer, public_reason
from fedge.coordinator.checkpoint import model_digest
from fedge.wire import codec
from fedge.wire import messages as m

TCGA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
MRN = "0012345"
# cells of the site's table: none of them may reach the coordinator
CELLS = ("41.734519", "-7.281903", "913.570241")

PLAN = """
[job]
dataset = "{dataset}"
rounds = 1
[model]
name = "{model}"
params = {params}
[train]
epochs = 2
batch_size = 4
learning_rate = {lr}
[strategy]
name = "fedavg"
[secagg]
enabled = false
"""


def _table(tmp_path: Path) -> Path:
    """A regression table (features a, b; target y) in a folder named after a patient."""
    rng = np.random.default_rng(3)
    rows = [f"{a:.6f},{b:.6f},{y:.6f}" for a, b, y in rng.normal(size=(37, 3)) * 10]
    rows[5] = ",".join(CELLS)
    path = tmp_path / f"MRN{MRN}" / "outcomes.csv"
    path.parent.mkdir()
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return path


def _agent(datasets: list[dict[str, object]]) -> Agent:
    return Agent("h1", TorchTrainer(datasets),
                 policy=PrivacyPolicy(require_secure_aggregation=False))


def _refused(agent: Agent, plan: str, d: int) -> str:
    """The reason ``agent`` refuses a TrainTask of ``plan`` with ``d`` weights, as the
    coordinator decodes it (asserting it refuses)."""
    sent: list[codec.Envelope] = []

    async def send(frames: list) -> None:
        sent.append(codec.decode([bytes(f) for f in frames], max_bytes=1 << 24))

    agent.send_frames = send
    w = np.zeros(d, np.float32)
    task = m.TrainTask(task_id="t1", plan=plan, weights=w,
                       model_digest=bytes.fromhex(model_digest(w)), train_seed=1,
                       quant_seed=b"\x01" * 16)
    frames = [bytes(f) for f in codec.encode(task, sender="coordinator", job="j", round=1)]
    asyncio.run(agent.handle_frames(frames))
    refusals = [e.body.reason for e in sent if isinstance(e.body, m.TaskRefused)]
    assert refusals, [type(e.body).__name__ for e in sent]
    return refusals[0]


def _holds_nothing_of_the_site(reason: str, path: Path) -> None:
    for secret in (MRN, str(path), str(path.parent), "outcomes.csv", *CELLS):
        assert secret not in reason, (secret, reason)


def test_a_model_whose_input_width_is_not_the_data_sets_is_refused_naming_both(tmp_path):
    path = _table(tmp_path)
    agent = _agent([{"name": "outcomes", "kind": "tabular", "path": str(path),
                     "task": "regression", "target": "y", "features": ["a", "b"]}])
    plan = PLAN.format(dataset="outcomes", model="linear",
                       params="{ in_features = 3, out_features = 1 }", lr=0.01)
    reason = _refused(agent, plan, 4)
    assert reason == ("local training failed: ValueError: data set 'outcomes' has 2 "
                      "features at this site but model.params.in_features is 3")
    _holds_nothing_of_the_site(reason, path)


def test_a_regression_model_with_more_outputs_than_targets_is_refused_not_broadcast(
        tmp_path):
    """Torch broadcast the one target over two outputs and trained without error."""
    path = _table(tmp_path)
    agent = _agent([{"name": "outcomes", "kind": "tabular", "path": str(path),
                     "task": "regression", "target": "y", "features": ["a", "b"]}])
    plan = PLAN.format(dataset="outcomes", model="mlp",
                       params="{ in_features = 2, hidden = [3], out_features = 2 }", lr=0.01)
    reason = _refused(agent, plan, 2 * 3 + 3 + 3 * 2 + 2)
    assert reason == ("local training failed: ValueError: data set 'outcomes' is a "
                      "regression task with 1 target column at this site but model 'mlp' "
                      "has model.params.out_features = 2: give it out_features = 1")
    _holds_nothing_of_the_site(reason, path)


def test_a_survival_mlp_with_two_outputs_is_refused_naming_the_parameter():
    """It failed mid-training with torch's shape error, sent as 'RuntimeError' alone."""
    if not TCGA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {TCGA}")
    agent = _agent([{"name": "brca", "kind": "fed_tcga_brca", "path": str(TCGA), "site": 0}])
    plan = PLAN.format(dataset="brca", model="mlp",
                       params="{ in_features = 39, hidden = [4], out_features = 2 }", lr=0.01)
    reason = _refused(agent, plan, 39 * 4 + 4 + 4 * 2 + 2)
    assert reason == ("local training failed: ValueError: data set 'brca' is a survival "
                      "task (one log-risk per example) at this site but model 'mlp' has "
                      "model.params.out_features = 2: give it out_features = 1")


def test_a_learning_rate_that_diverges_is_named_with_the_epoch_and_step(tmp_path):
    path = _table(tmp_path)
    agent = _agent([{"name": "outcomes", "kind": "tabular", "path": str(path),
                     "task": "regression", "target": "y", "features": ["a", "b"]}])
    plan = PLAN.format(dataset="outcomes", model="linear",
                       params="{ in_features = 2, out_features = 1 }", lr=1e12)
    reason = _refused(agent, plan, 3)
    # the training split's rows in batches of 4; the loss overflows within the first epoch
    assert re.fullmatch(
        r"local training failed: TrainingDiverged: training diverged: the loss became "
        r"(NaN|infinite) at epoch 1 of 2, step [2-9] of [89] \(the plan's "
        r"train\.learning_rate = 1e\+12, train\.optimizer = 'sgd'; try a lower learning "
        r"rate, and check that the data set's features are standardised at the sites\)",
        reason), reason
    _holds_nothing_of_the_site(reason, path)


def test_a_library_errors_common_kinds_go_out_in_fedges_words_with_sizes_only():
    """Real torch errors (no mocks): out of memory, a layer's width, tensor sizes, an
    image's channels, a label outside the classes (whose text quotes the label)."""
    from fedge.agent.trainer import library_error_kind

    def raised(call) -> BaseException:
        try:
            call()
        except Exception as exc:  # what torch raises is the point
            return exc
        raise AssertionError("no error")

    oom = raised(lambda: torch.empty(2**60))  # 4 EiB: beyond any address space
    assert public_reason(oom) == (
        "out of memory (host memory) while training: lower the plan's train.batch_size, "
        "or use a smaller model, or free memory on this appliance (RuntimeError; details "
        "in this appliance's journal)")
    width = raised(lambda: torch.nn.Linear(40, 8)(torch.zeros(32, 39)))
    assert library_error_kind(width) == (
        "a layer of the plan's model takes 40 inputs but is given 39 (tensor shapes 32x39 "
        "and 40x8): the model's widths (model.params) do not fit this site's data")
    sizes = raised(lambda: torch.zeros(96) - torch.zeros(32))
    assert library_error_kind(sizes).startswith("tensor sizes 96 and 32 differ at "
                                                "dimension 0")
    channels = raised(lambda: torch.nn.Conv2d(3, 8, 3)(torch.zeros(2, 1, 16, 16)))
    assert library_error_kind(channels).startswith(
        "the plan's model takes 3-channel images but is given 1 channels")
    label = raised(lambda: torch.nn.functional.cross_entropy(torch.zeros(2, 3),
                                                             torch.tensor([0, 917])))
    assert "917" in str(label)  # torch quotes the label; the reason does not
    assert public_reason(label) == (
        "a label is outside the plan's model's classes (model.params.classes or "
        "out_features) (IndexError; details in this appliance's journal)")
    # anything else: its type alone, as before
    other = raised(lambda: np.asarray(["DOE^JANE"], dtype=float))
    assert public_reason(other) == "ValueError (details in this appliance's journal)"
