"""standardise = "bounds": public constants, so one record's features depend on that
record alone.

The default standardiser is fitted on all of a site's training rows. Replacing one
record (DP-SGD's neighbouring data sets) then moved every other record's features:
an outlier age of 1e5 in D' shifted the mean from 59 to 309 and the scale from 9 to
4990, and the released weights told D from D' every time at a claimed ε of 0.565
(/tmp/s13/dpacct/std_attack.py). Under "bounds" a column is clamped to the range the
hospital declares and mapped by (x - mid) / half_width: the other records' features
are bit for bit the same in D and D'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DatasetSpec, load_site_data

AGE_BOUNDS = {"age": [0, 120]}


def neighbours(tmp_path: Path) -> tuple[Path, Path]:
    """Two 400-row CSVs that differ in one record: D' has age 1e5 (a '99999'-style
    missing-value code, say) where D has a normal age."""
    rng = np.random.default_rng(1)
    age = rng.normal(60, 10, 400)
    label = (age + rng.normal(0, 5, 400) > 60).astype(int)
    paths = []
    for name, first in (("d.csv", age[0]), ("d2.csv", 1e5)):
        ages = age.copy()
        ages[0] = first
        path = tmp_path / name
        path.write_text("age,flag,label\n" + "".join(
            f"{a:.3f},{k % 2},{y}\n" for k, (a, y) in enumerate(zip(ages, label, strict=True))))
        paths.append(path)
    return paths[0], paths[1]


def load(path: Path, **settings: object):
    table = {"name": "t", "kind": "tabular", "path": str(path), "task": "binary",
             "features": ["age", "flag"], "target": "label", "val_fraction": 0.2, **settings}
    return load_site_data(DatasetSpec.from_config(table))


def test_replacing_one_record_leaves_every_other_records_features_bit_identical(tmp_path):
    d, d2 = neighbours(tmp_path)
    a = load(d, standardise="bounds", feature_bounds=AGE_BOUNDS)
    b = load(d2, standardise="bounds", feature_bounds=AGE_BOUNDS)
    for split in ("train", "val"):
        xa, xb = a.split(split).x, b.split(split).x
        assert xa.shape == xb.shape
        # row 0 of the file is the replaced record; it is in train or val
        differs = np.flatnonzero(np.any(xa.view(np.uint32) != xb.view(np.uint32), axis=1))
        assert len(differs) <= 1, (split, differs)
    assert (len(np.flatnonzero(np.any(a.train.x != b.train.x, axis=1)))
            + len(np.flatnonzero(np.any(a.val.x != b.val.x, axis=1)))) == 1
    np.testing.assert_array_equal(a.standardiser.mean, b.standardiser.mean)
    np.testing.assert_array_equal(a.standardiser.scale, b.standardiser.scale)
    # the outlier is clamped to the declared range: age 1e5 reads as 120, i.e. 1.0
    assert b.train.x[:, 0].max() <= 1.0 and b.val.x[:, 0].max() <= 1.0
    assert 1.0 in np.concatenate([b.train.x[:, 0], b.val.x[:, 0]])


def test_the_fitted_default_moves_every_other_record_which_is_why_dp_sgd_refuses_it(tmp_path):
    d, d2 = neighbours(tmp_path)
    a, b = load(d), load(d2)
    moved = np.any(a.train.x != b.train.x, axis=1)
    assert moved.mean() > 0.9  # nearly every record, not the one replaced


def test_bounds_map_each_bounded_column_by_public_constants_and_leave_the_rest(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("age,dose,label\n30,5,0\n90,-2,1\n150,0.5,0\n-10,7,1\n")
    data = load(path, features=["age", "dose"], standardise="bounds",
                feature_bounds={"age": [0, 120]}, val_fraction=0.0)
    np.testing.assert_allclose(data.train.x[:, 0], [-0.5, 0.5, 1.0, -1.0])
    np.testing.assert_array_equal(data.train.x[:, 1], np.float32([5, -2, 0.5, 7]))
    # what serving prepends (trainer.standardisation): the same affine map
    np.testing.assert_array_equal(data.standardiser.mean, np.float32([60, 0]))
    np.testing.assert_array_equal(data.standardiser.scale, np.float32([60, 1]))


def test_numpy_columns_are_named_x0_x1_and_checked_when_loaded(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x=np.array([[0.0, 50.0], [1.0, 400.0]]), y=np.array([0, 1]))
    table = {"name": "n", "kind": "numpy", "path": str(path), "task": "binary",
             "val_fraction": 0.0, "standardise": "bounds"}
    data = load_site_data(DatasetSpec.from_config(
        {**table, "feature_bounds": {"x1": [0, 200]}}))
    np.testing.assert_allclose(data.train.x[:, 1], [-0.5, 1.0])
    with pytest.raises(ValueError, match=r"feature_bounds names \['x2'\], not a feature"):
        load_site_data(DatasetSpec.from_config({**table, "feature_bounds": {"x2": [0, 1]}}))


@pytest.mark.parametrize(("settings", "message"), [
    ({"standardise": "bounds"},
     r'standardise = "bounds" needs datasets.feature_bounds'),
    ({"feature_bounds": AGE_BOUNDS},
     r'feature_bounds is used only with standardise = "bounds" \(got standardise = '
     r"'continuous'\)"),
    ({"standardise": "bounds", "feature_bounds": {"weight": [0, 300]}},
     r"feature_bounds names \['weight'\], not a feature column"),
    ({"standardise": "bounds", "feature_bounds": {"age": [120, 0]}},
     r"feature_bounds.age = \[120.0, 0.0\] must be two finite numbers \[lo, hi\] "
     r"with lo < hi"),
    ({"standardise": "bounds", "feature_bounds": {"age": [0, float("nan")]}},
     r"feature_bounds.age = \[0.0, nan\] must be two finite"),
    ({"standardise": "bounds", "feature_bounds": {"age": [0, "120"]}},
     r"feature_bounds.age = \[0, '120'\] must be \[lo, hi\], two numbers"),
    ({"standardise": "bounds", "feature_bounds": {"age": [0, 1, 2]}},
     r"must be \[lo, hi\], two numbers"),
    ({"standardise": "bounds", "feature_bounds": [0, 120]},
     r"must be a table of column = \[lo, hi\]"),
    ({"standardise": "zscore"}, r"datasets.standardise='zscore' must be one of"),
])
def test_feature_bounds_are_checked_when_the_table_is_read(settings, message):
    table = {"name": "t", "kind": "tabular", "path": "rows.csv", "task": "binary",
             "features": ["age", "flag"], "target": "label", **settings}
    with pytest.raises(ValueError, match=message):
        DatasetSpec.from_config(table)


def test_images_take_no_feature_bounds():
    table = {"name": "scans", "kind": "images", "path": "scans", "task": "binary",
             "classes": ["a", "b"]}
    DatasetSpec.from_config({**table, "standardise": "bounds"})  # images: nothing to bound
    with pytest.raises(ValueError, match="images are not standardised"):
        DatasetSpec.from_config({**table, "standardise": "bounds",
                                 "feature_bounds": {"x0": [0, 1]}})
