"""A site's mini-batches form one stream of shuffled epochs across a job's rounds
(FLamby's DataLoaderWithMemory), and a retried round reproduces its update."""

from __future__ import annotations

import numpy as np
import torch

from fedge.train.api import (
    ClientState,
    ModelSpec,
    SiteData,
    TrainConfig,
    build_model,
    flatten,
    local_train,
    minibatches,
)
from fedge.train.data import Split

COX = ModelSpec("cox_linear", {"in_features": 3})


def _stream(n: int, batch: int, steps_per_round: int, rounds: int) -> list[np.ndarray]:
    cursor = None
    out: list[np.ndarray] = []
    for r in range(rounds):
        batches, cursor = minibatches(
            n, batch, steps_per_round, torch.Generator().manual_seed(r), cursor
        )
        out += [b.numpy() for b in batches]
    return out


def test_batches_continue_across_calls_as_whole_epochs_with_a_short_last_batch() -> None:
    # 21 rows, batch 8: epochs of 8 + 8 + 5; 4 steps per round cut epochs mid-way
    batches = _stream(21, 8, 4, 6)
    assert [len(b) for b in batches[:6]] == [8, 8, 5, 8, 8, 5]
    for e in range(len(batches) // 3):
        epoch = np.concatenate(batches[3 * e : 3 * e + 3])
        assert sorted(epoch.tolist()) == list(range(21)), f"epoch {e} is not a permutation"


def test_every_row_is_visited_equally_often_whatever_the_steps_per_round() -> None:
    # 100 steps of 8 over 129 rows (FLamby's centres 3 and 4) is not a whole number of
    # epochs; a fresh shuffle each round would favour the rows it happens to put first
    counts = np.bincount(np.concatenate(_stream(129, 8, 100, 17)), minlength=129)
    assert counts.min() == counts.max() == 100


def _toy_site(n: int = 30) -> SiteData:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    t = rng.exponential(1.0, n).astype(np.float32)
    e = (rng.random(n) < 0.7).astype(np.float32)
    return SiteData(
        name="toy",
        task="survival",
        feature_names=["a", "b", "c"],
        train=Split(x, np.stack([e, t], 1)),
    )


def test_a_retried_round_reproduces_its_update_and_the_next_round_continues() -> None:
    data, w0 = _toy_site(), flatten(build_model(COX))
    cfg = TrainConfig(steps=3, batch_size=8, lr=0.1, seed=1)
    state = ClientState(job="j")
    local_train(COX, w0, data, cfg, round=0, state=state)
    first = local_train(COX, w0, data, cfg, round=1, state=state).weights
    retried = local_train(COX, w0, data, cfg, round=1, state=state).weights
    np.testing.assert_array_equal(first, retried)
    # without the cursor, round 1 would start a fresh epoch: different batches
    fresh = local_train(COX, w0, data, cfg, round=1, state=ClientState(job="j")).weights
    assert not np.array_equal(first, fresh)
