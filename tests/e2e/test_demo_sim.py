"""The in-process federation and the federated cross-validation of the recipe."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedge.coordinator.plan import StrategySettings
from fedge.coordinator.strategies import Strategy
from fedge.demo.recipe import CVRow, best, cross_validate, survival_candidates
from fedge.demo.sim import run_federation
from fedge.demo.tcga import load_centres
from fedge.train.api import ClientState, ModelSpec, TrainConfig, build_model, flatten, local_train

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"
COX = ModelSpec("cox_linear", {"in_features": 39})


@pytest.fixture(scope="module")
def centres():  # type: ignore[no-untyped-def]
    if not (DATA / "brca.csv").is_file():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    return load_centres(DATA, "none")[3:]  # three smallest centres keep this fast


def test_in_process_federation_is_local_train_plus_the_coordinators_strategy(centres) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(steps=10, batch_size=8, lr=0.01)
    strat = StrategySettings(
        "fedadam", {"server_learning_rate": 0.1, "beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
    )
    res = run_federation(COX, centres, cfg, strat, 2, eval_split="test")
    w = flatten(build_model(COX))
    server = Strategy(strat)
    # each site keeps its state between rounds (its place in its stream of epochs)
    states = {c.name: ClientState(job="sim") for c in centres}
    for r in range(2):
        outs = [local_train(COX, w, c, cfg, round=r, state=states[c.name]) for c in centres]
        n = sum(o.n_examples for o in outs)
        mean = sum(o.n_examples * (o.weights.astype(np.float64) - w) for o in outs) / n
        w = server.step(w, mean)
    np.testing.assert_allclose(res.weights, w, rtol=1e-6, atol=1e-7)
    last = res.history[-1]["test"]
    assert set(last["sites"]) == {c.name for c in centres}
    sizes = [len(c.test) for c in centres]
    vals = [last["sites"][c.name]["c_index"] for c in centres]
    assert last["weighted"]["c_index"] == pytest.approx(np.dot(sizes, vals) / sum(sizes))


def test_cross_validation_never_sees_test_rows_and_picks_the_lowest_held_out_loss(centres) -> None:  # type: ignore[no-untyped-def]
    grid = [
        replace(c, rounds=5, train=replace(c.train, steps=20)) for c in survival_candidates()[:2]
    ]
    seen: list[CVRow] = []
    # test rows are removed: a poisoned test split would break evaluation if it were used
    poisoned = [replace(c, test=replace(c.test, y=np.full_like(c.test.y, np.nan))) for c in centres]
    rows = cross_validate(COX, poisoned, grid, folds=2, on_row=seen.append)
    assert len(rows) == 2 and seen == rows
    for row in rows:
        assert set(row.scores) == {5} and all(0 <= s <= 1 for s in row.scores.values())
        assert len(row.fold_scores[5]) == len(row.fold_losses[5]) == 2
        assert all(0 < v < 10 for v in row.losses.values())
    # the held-out Cox partial likelihood chooses (the C-index is shown)
    winner, rounds = best(rows)
    assert rounds == 5 and winner.losses[5] == min(r.losses[5] for r in rows)
    with pytest.raises(ValueError, match="folds=1"):
        cross_validate(COX, centres, grid, folds=1)
