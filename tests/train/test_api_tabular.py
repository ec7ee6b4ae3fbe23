"""The tabular survival path of fedge.train.api on the real Fed-TCGA-BRCA data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex

from fedge.train.api import (
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    build_model,
    evaluate,
    flatten,
    load_flat,
    load_site_data,
    local_train,
    predict,
)

FLAMBY_SIZES = [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]
COX = ModelSpec("cox_linear", {"in_features": 39})


def _site(tcga_dir: Path, i: int, **kw: object):  # type: ignore[no-untyped-def]
    args = {"name": f"centre{i}", "kind": "fed_tcga_brca", "path": str(tcga_dir), "site": i}
    args.update(kw)
    return load_site_data(DatasetSpec.from_config(args))


def test_fed_tcga_brca_centre_sizes_match_flamby_readme(tcga_dir: Path) -> None:
    sizes = []
    for i in range(6):
        d = _site(tcga_dir, i, val_fraction=0.0)
        assert d.train.x.shape[1] == 39 and len(d.feature_names) == 39
        assert d.train.y.shape[1] == 2
        sizes.append((len(d.train), len(d.test)))
    assert sizes == FLAMBY_SIZES


def test_validation_split_is_fixed_by_seed_and_taken_from_train(tcga_dir: Path) -> None:
    a = _site(tcga_dir, 0, val_fraction=0.2, seed=3)
    b = _site(tcga_dir, 0, val_fraction=0.2, seed=3)
    c = _site(tcga_dir, 0, val_fraction=0.2, seed=4)
    assert len(a.train) + len(a.val) == 248 and len(a.val) == round(0.2 * 248)
    assert len(a.test) == 63
    np.testing.assert_array_equal(a.val.y, b.val.y)
    assert not np.array_equal(a.val.y, c.val.y)


def test_standardiser_fitted_on_site_training_rows_only(tcga_dir: Path) -> None:
    d = _site(tcga_dir, 1, val_fraction=0.25, seed=0, standardise="continuous")
    age = d.feature_names.index("age_at_index")
    assert abs(float(d.train.x[:, age].mean())) < 1e-5
    assert float(d.train.x[:, age].std()) == pytest.approx(1.0, abs=1e-4)
    # validation rows are transformed with the training statistics, not their own
    assert abs(float(d.val.x[:, age].mean())) > 1e-4
    # one-hot columns keep their 0/1 values under "continuous"
    onehot = d.feature_names.index("race_white")
    assert set(np.unique(d.train.x[:, onehot])) <= {0.0, 1.0}


def test_flat_weights_round_trip_and_build_is_deterministic() -> None:
    a, b = build_model(COX), build_model(COX)
    wa = flatten(a)
    assert wa.dtype == np.float32 and wa.shape == (40,)
    np.testing.assert_array_equal(wa, flatten(b))
    load_flat(b, wa * 2)
    np.testing.assert_array_equal(flatten(b), wa * 2)
    with pytest.raises(ValueError, match=r"needs \(40,\)"):
        load_flat(b, np.zeros(39, np.float32))


def test_local_train_improves_cindex_and_evaluate_matches_lifelines(tcga_dir: Path) -> None:
    data = _site(tcga_dir, 0, val_fraction=0.0, standardise="continuous")
    w0 = np.zeros(40, np.float32)
    cfg = TrainConfig(steps=150, batch_size=8, lr=0.05, seed=1)
    out = local_train(COX, w0, data, cfg, round=0)
    assert out.n_examples == 248 and out.weights.shape == (40,)
    assert np.isfinite(out.metrics["train_loss"])
    ev = evaluate(COX, out.weights, data, "test")
    assert ev.n_examples == 63
    risk = predict(COX, out.weights, data.test.x).reshape(-1)
    ref = lifelines_cindex(data.test.y[:, 1], -risk, data.test.y[:, 0])
    assert ev.metrics["c_index"] == pytest.approx(ref, abs=1e-12)
    # zero weights give every patient the same risk: C-index exactly 0.5
    assert evaluate(COX, w0, data, "test").metrics["c_index"] == 0.5
    assert ev.metrics["c_index"] > 0.6


def test_local_train_is_deterministic_per_seed_and_round(tcga_dir: Path) -> None:
    data = _site(tcga_dir, 2, val_fraction=0.0)
    w0 = flatten(build_model(COX))
    cfg = TrainConfig(steps=20, batch_size=8, lr=0.05, seed=7)
    a = local_train(COX, w0, data, cfg, round=1).weights
    b = local_train(COX, w0, data, cfg, round=1).weights
    c = local_train(COX, w0, data, cfg, round=2).weights
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_inputs_are_refused_with_named_parameter(tcga_dir: Path) -> None:
    data = _site(tcga_dir, 5, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"needs \(40,\)"):
        local_train(COX, np.zeros(3, np.float32), data, TrainConfig(), round=0)
    with pytest.raises(ValueError, match=r"train\.lr"):
        TrainConfig.from_dict({"lr": -1.0})
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"learnin_rate": 0.1})
    with pytest.raises(ValueError, match="no 'val' split"):
        evaluate(COX, np.zeros(40, np.float32), data, "val")
    with pytest.raises(ValueError, match="not a Cox model"):
        evaluate(ModelSpec("logistic", {"in_features": 39}), np.zeros(40), data, "test")
    with pytest.raises(ValueError, match=r"site=7 must lie in 0\.\.5"):
        DatasetSpec.from_config(
            {"name": "x", "kind": "fed_tcga_brca", "path": str(tcga_dir), "site": 7}
        )


def test_cindex_left_out_not_nan_when_a_split_has_no_event(tcga_dir: Path) -> None:
    data = _site(tcga_dir, 5, val_fraction=0.0)
    data.test.y[:, 0] = 0.0  # every test patient censored: no comparable pair
    m = evaluate(COX, np.zeros(40, np.float32), data, "test").metrics
    assert "c_index" not in m and all(np.isfinite(v) for v in m.values())


def test_train_config_accepts_the_plans_learning_rate_spelling() -> None:
    assert TrainConfig.from_dict({"learning_rate": 0.02, "steps": 5}).lr == 0.02
    with pytest.raises(ValueError, match="not both"):
        TrainConfig.from_dict({"learning_rate": 0.02, "lr": 0.1})
