"""Evaluating a Cox model: what a split without events reports."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.train.api import ModelSpec, build_model, evaluate, flatten


def test_an_all_censored_split_reports_no_cox_loss_rather_than_zero() -> None:
    """A loss of 0.0 from a split without events entered the sites' weighted mean with
    the split's whole weight."""
    from fedge.train import metrics as M
    from fedge.train.data import SiteData, Split

    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    censored = np.stack([np.zeros(20), np.arange(20)], 1).astype(np.float32)
    events = censored.copy()
    events[::3, 0] = 1.0
    spec = ModelSpec("cox_linear", {"in_features": 3})
    w = flatten(build_model(spec))
    quiet = evaluate(spec, w, SiteData("cens", "survival", list("abc"), Split(x, censored),
                                       test=Split(x, censored)), "test")
    busy = evaluate(spec, w, SiteData("ev", "survival", list("abc"), Split(x, events),
                                      test=Split(x, events)), "test")
    assert quiet.n_examples == 20 and "loss" not in quiet.metrics
    assert busy.metrics["loss"] > 0
    together = M.weighted_mean([(quiet.n_examples, quiet.metrics),
                                (busy.n_examples, busy.metrics)])
    assert together["loss"] == pytest.approx(busy.metrics["loss"])
