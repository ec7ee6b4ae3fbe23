"""Metrics against independent references (lifelines for the C-index)."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex

from fedge.train import metrics as M


@pytest.mark.parametrize("seed", range(6))
def test_cindex_matches_lifelines_with_ties_in_time_and_risk(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    time = rng.integers(1, 40, size=n).astype(float)  # many tied times
    event = (rng.random(n) < 0.4).astype(float)
    risk = np.round(rng.normal(size=n), 1)  # many tied risks
    ours = M.concordance_index(time, risk, event)
    ref = lifelines_cindex(time, -risk, event)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_cindex_matches_lifelines_past_one_block_of_deaths() -> None:
    """The C-index walks the deaths in blocks of 512: ~900 deaths span two blocks,
    so a block that drops or repeats a death at its edge changes the answer."""
    rng = np.random.default_rng(7)
    n = 1500
    time = rng.integers(1, 400, size=n).astype(float)
    event = (rng.random(n) < 0.6).astype(float)
    risk = np.round(rng.normal(size=n), 1)
    assert 512 < int(event.sum()) < 1024
    ours = M.concordance_index(time, risk, event)
    ref = lifelines_cindex(time, -risk, event)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_cindex_perfect_and_reversed_risk() -> None:
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.ones(4)
    assert M.concordance_index(time, -time, event) == 1.0
    assert M.concordance_index(time, time, event) == 0.0


def test_cindex_rejects_unusable_input() -> None:
    with pytest.raises(ValueError, match="no observed event"):
        M.concordance_index([1, 2], [0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="length mismatch"):
        M.concordance_index([1, 2, 3], [0.1, 0.2], [1, 0])
    with pytest.raises(ValueError, match="only 0 and 1"):
        M.concordance_index([1, 2], [0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="NaN"):
        M.concordance_index([1, np.nan], [0.1, 0.2], [1, 0])


def test_roc_auc_equals_pairwise_probability() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(rng.normal(size=300) + y, 1)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert M.roc_auc(y, s) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        M.roc_auc([1, 1], [0.2, 0.3])


def test_accuracy_balanced_accuracy_brier() -> None:
    y = np.array([0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0])
    assert M.accuracy(y, pred) == 0.75
    assert M.balanced_accuracy(y, pred) == 0.5
    assert M.brier_score([0, 1], [0.25, 0.5]) == pytest.approx((0.0625 + 0.25) / 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.brier_score([0, 1], [0.2, 1.5])


def test_weighted_mean_is_size_weighted() -> None:
    agg = M.weighted_mean([(10, {"c_index": 0.9}), (30, {"c_index": 0.5})])
    assert agg["c_index"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        M.weighted_mean([])
