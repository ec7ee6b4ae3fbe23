"""The O(n log n) C-index and the vectorised AUC ranks give exactly the values of the
pairwise definitions they replaced, kept here as the references.

Exact equality, not a tolerance: both sides count integer pairs and do the same
float arithmetic on the counts, so any difference is a miscount. Their speed at
1M rows is measured in bench/metrics.py, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedge.train import metrics as M
from fedge.train.api import (
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    load_site_data,
    local_train,
    predict,
)


def pairwise_cindex(time: object, risk: object, event: object) -> float:
    """The quadratic C-index fedge shipped until session 15, verbatim after validation."""
    t = M._as_1d("time", time)
    r = M._as_1d("risk", risk)
    e = M._as_1d("event", event)
    M._same_length(time=t, risk=r, event=e)
    if not np.all((e == 0) | (e == 1)):
        raise ValueError("event must contain only 0 and 1")
    died = np.flatnonzero(e == 1)
    if died.size == 0:
        raise ValueError("concordance_index: no observed event, so no comparable pair")
    concordant = 0.0
    comparable = 0
    for start in range(0, died.size, 512):
        idx = died[start : start + 512]
        ti = t[idx][:, None]
        later = (t[None, :] > ti) | ((t[None, :] == ti) & (e[None, :] == 0))
        ri = r[idx][:, None]
        concordant += float(np.sum(later & (ri > r[None, :])))
        concordant += 0.5 * float(np.sum(later & (ri == r[None, :])))
        comparable += int(np.sum(later))
    if comparable == 0:
        raise ValueError("concordance_index: no comparable pair (all events tie the last time)")
    return concordant / comparable


def looped_auc_ranks(s: np.ndarray) -> np.ndarray:
    """The average ranks roc_auc computed in a Python loop until session 15."""
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    ranks = looped_auc_ranks(s)
    n_pos = int(np.sum(y == 1))
    n_neg = y.size - n_pos
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def outcome(fn: Callable[..., float], *args: object) -> float | str:
    """The value, or the ValueError's message: both versions must refuse alike."""
    try:
        return fn(*args)
    except ValueError as exc:
        return f"ValueError: {exc}"


def tied_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small survival split with heavy ties: few distinct times and risks, and an
    event rate anywhere from all censored to all dead."""
    n = int(rng.integers(1, 48))
    time = rng.integers(1, int(rng.integers(2, 7)), size=n).astype(float)
    event = (rng.random(n) < rng.choice([0.0, 0.05, 0.3, 0.7, 1.0])).astype(float)
    risk = rng.integers(-2, int(rng.integers(-1, 4)), size=n) * 0.5
    return time, risk, event


@pytest.mark.parametrize("seed", range(4))
def test_cindex_equals_the_pairwise_definition_on_heavily_tied_splits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    raised = 0
    for _ in range(600):
        time, risk, event = tied_case(rng)
        expected = outcome(pairwise_cindex, time, risk, event)
        raised += isinstance(expected, str)
        assert outcome(M.concordance_index, time, risk, event) == expected, (time, risk, event)
    assert 0 < raised < 300  # both the raising and the counting paths were exercised


def test_cindex_edge_cases_match_the_pairwise_definition() -> None:
    cases = [
        ([5.0], [0.3], [1.0]),  # one subject: nothing to compare
        ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0]),  # all censored
        ([2.0, 2.0, 2.0], [0.1, 0.2, 0.3], [1.0, 1.0, 1.0]),  # all die at once
        ([1.0, 3.0, 3.0, 2.0], [0.1, 0.1, 0.1, 0.1], [1.0, 0.0, 1.0, 0.0]),  # all risks tie
        ([3.0, 3.0, 1.0], [0.9, 0.1, 0.5], [1.0, 0.0, 0.0]),  # one event, censored at its time
        ([3.0, 3.0, 3.0], [0.2, 0.2, 0.7], [1.0, 0.0, 0.0]),  # same time, risk tie and not
        ([1.0, 2.0], [0.0, -0.0], [1.0, 0.0]),  # -0.0 == 0.0 is a tie, as before
        ([-1.5, 0.0, 1e300], [1e-300, -1e300, 0.0], [1.0, 1.0, 0.0]),  # extreme finite values
        ([1.0, 2.0], [0.1, np.nan], [1.0, 0.0]),  # NaN risk is refused
        ([1.0, np.inf], [0.1, 0.2], [1.0, 0.0]),  # infinite time is refused
        ([1.0, 2.0], [0.1, 0.2], [1.0, 0.5]),  # event not 0/1
        ([1.0, 2.0, 3.0], [0.1, 0.2], [1.0, 0.0, 1.0]),  # length mismatch
    ]
    for time, risk, event in cases:
        expected = outcome(pairwise_cindex, time, risk, event)
        assert outcome(M.concordance_index, time, risk, event) == expected, (time, risk, event)


def test_cindex_equals_the_pairwise_definition_past_several_merge_levels() -> None:
    """Thousands of rows, > 512 deaths (two of the old blocks), continuous and tied
    times mixed, risks as a float32 model would give them (many exact repeats)."""
    rng = np.random.default_rng(11)
    n = 5000
    time = np.where(rng.random(n) < 0.5, rng.integers(1, 300, size=n), rng.random(n) * 300)
    event = (rng.random(n) < 0.3).astype(float)
    risk = np.round(rng.normal(size=n), 2).astype(np.float32)
    assert int(event.sum()) > 512
    assert M.concordance_index(time, risk, event) == pairwise_cindex(time, risk, event)


def test_cindex_on_fed_tcga_brca_equals_the_pairwise_definition(tcga_dir: Path) -> None:
    """The demo's data: a Cox model trained on centre 0, scored on every centre's
    train and test rows and on all of them pooled (the demo's pooled figure)."""
    spec = ModelSpec("cox_linear", {"in_features": 39})
    sites = [load_site_data(DatasetSpec.from_config(
        {"name": f"centre{i}", "kind": "fed_tcga_brca", "path": str(tcga_dir), "site": i,
         "val_fraction": 0.0, "standardise": "continuous"})) for i in range(6)]
    w = local_train(spec, np.zeros(40, np.float32), sites[0],
                    TrainConfig(steps=150, batch_size=8, lr=0.05, seed=1), round=0).weights
    splits = [split for site in sites for split in (site.train, site.test)]
    pooled = (np.concatenate([sp.x for sp in splits]), np.concatenate([sp.y for sp in splits]))
    for x, y in [(sp.x, sp.y) for sp in splits] + [pooled]:
        risk = predict(spec, w, x).reshape(-1)
        expected = outcome(pairwise_cindex, y[:, 1], risk, y[:, 0])
        assert outcome(M.concordance_index, y[:, 1], risk, y[:, 0]) == expected


@pytest.mark.parametrize("seed", range(3))
def test_roc_auc_ranks_equal_the_looped_average_ranks(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    for _ in range(400):
        n = int(rng.integers(2, 60))
        y = (rng.random(n) < rng.choice([0.1, 0.5, 0.9])).astype(float)
        if y.min() == y.max():
            y[0] = 1.0 - y[0]
        s = rng.integers(0, int(rng.integers(1, 6)), size=n) * 0.25
        assert M.roc_auc(y, s) == pairwise_auc(y, s), (y, s)
