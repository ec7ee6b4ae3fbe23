"""Data adapters: declared schemas, splits, and errors that name file, line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError, DatasetSpec, load_site_data, pooled

HEADER = "pid,age,stage,E,T,split\n"
ROWS = [
    "p1,50,1,1,100,train\n",
    "p2,61,0,0,200,train\n",
    "p3,70,1,1,50,train\n",
    "p4,44,0,0,300,test\n",
    "p5,58,1,1,120,train\n",
]


def _spec(path: Path, **kw: object) -> DatasetSpec:
    args: dict[str, object] = {
        "name": "onc",
        "kind": "tabular",
        "path": str(path),
        "task": "survival",
        "features": ["age", "stage"],
        "event": "E",
        "time": "T",
        "split_column": "split",
        "val_fraction": 0.0,
    }
    args.update(kw)
    return DatasetSpec.from_config(args)


def _write(tmp_path: Path, text: str, name: str = "site.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_tabular_survival_csv_with_split_column(tmp_path: Path) -> None:
    d = load_site_data(_spec(_write(tmp_path, HEADER + "".join(ROWS))))
    assert len(d.train) == 4 and len(d.test) == 1 and d.val is None
    assert d.feature_names == ["age", "stage"]
    np.testing.assert_array_equal(d.test.y, [[0.0, 300.0]])
    # standardiser ("continuous") fitted on the 4 training rows: age only
    ages = np.array([50, 61, 70, 58], dtype=np.float32)
    np.testing.assert_allclose(d.standardiser.mean, [ages.mean(), 0.0], rtol=1e-6)
    np.testing.assert_allclose(d.train.x[:, 1], [1, 0, 1, 1])


def test_missing_column_names_file_line_and_column(tmp_path: Path) -> None:
    p = _write(tmp_path, "pid,age,E,T,split\np1,50,1,100,train\n")
    with pytest.raises(DataError) as err:
        load_site_data(_spec(p))
    assert err.value.file == str(p) and err.value.line == 1 and err.value.column == "stage"
    assert "missing column" in str(err.value)


def test_wrong_type_names_line_and_column(tmp_path: Path) -> None:
    rows = ROWS.copy()
    rows[2] = "p3,seventy,1,1,50,train\n"
    p = _write(tmp_path, HEADER + "".join(rows))
    with pytest.raises(DataError) as err:
        load_site_data(_spec(p))
    assert (err.value.line, err.value.column) == (4, "age")
    assert "'seventy' is not a number" in str(err.value) and str(p) in str(err.value)
    rows[2] = "p3,7_0,1,1,50,train\n"  # float() would read 70: a typo is no number
    p = _write(tmp_path, HEADER + "".join(rows))
    with pytest.raises(DataError, match="'7_0' is not a number") as err:
        load_site_data(_spec(p))
    assert (err.value.line, err.value.column) == (4, "age")


def test_truncated_file_names_the_cut_line(tmp_path: Path) -> None:
    text = HEADER + "".join(ROWS)
    p = _write(tmp_path, text[: text.index("p5") + 6])  # last row cut mid-way
    with pytest.raises(DataError) as err:
        load_site_data(_spec(p))
    assert err.value.line == 6 and "truncated row" in str(err.value)
    assert err.value.column == "E"  # the first column that is missing


def test_empty_file_and_header_only_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        load_site_data(_spec(_write(tmp_path, "")))
    with pytest.raises(DataError, match="no data rows") as err:
        load_site_data(_spec(_write(tmp_path, HEADER, "h.csv")))
    assert err.value.line == 2


def test_bad_event_bad_split_and_missing_value(tmp_path: Path) -> None:
    bad_event = HEADER + "p1,50,1,2,100,train\n"
    with pytest.raises(DataError, match="must be 0 or 1") as err:
        load_site_data(_spec(_write(tmp_path, bad_event)))
    assert (err.value.line, err.value.column) == (2, "E")
    bad_split = HEADER + "p1,50,1,1,100,holdout\n"
    with pytest.raises(DataError, match="split value") as err:
        load_site_data(_spec(_write(tmp_path, bad_split, "b.csv")))
    assert err.value.column == "split"
    missing = HEADER + "p1,,1,1,100,train\n"
    with pytest.raises(DataError, match="missing value") as err:
        load_site_data(_spec(_write(tmp_path, missing, "c.csv")))
    assert (err.value.line, err.value.column) == (2, "age")


def test_nonexistent_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_site_data(_spec(tmp_path / "nope.csv"))


def test_schema_is_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs both 'event' and 'time'"):
        DatasetSpec.from_config({"name": "a", "kind": "tabular", "path": "x.csv", "event": "E"})
    with pytest.raises(ValueError, match="unknown key"):
        DatasetSpec.from_config({"name": "a", "kind": "tabular", "path": "x", "colour": 1})
    with pytest.raises(ValueError, match="kind='sql'"):
        DatasetSpec.from_config({"name": "a", "kind": "sql", "path": "x"})


def test_site_filter_and_binary_task(tmp_path: Path) -> None:
    text = "h,x1,x2,y\nA,1,2,0\nB,3,4,1\nA,5,6,1\nA,7,8,0\n"
    spec = DatasetSpec.from_config(
        {
            "name": "b",
            "kind": "tabular",
            "path": str(_write(tmp_path, text)),
            "task": "binary",
            "target": "y",
            "features": ["x1", "x2"],
            "site_column": "h",
            "site": "A",
            "val_fraction": 0.0,
            "standardise": "none",
        }
    )
    d = load_site_data(spec)
    np.testing.assert_array_equal(d.train.x, [[1, 2], [5, 6], [7, 8]])
    np.testing.assert_array_equal(d.train.y, [0, 1, 0])
    bad = "h,x1,x2,y\nA,1,2,3\n"
    with pytest.raises(DataError, match="must be 0 or 1"):
        load_site_data(replace_path(spec, _write(tmp_path, bad, "bad.csv")))


def replace_path(spec: DatasetSpec, path: Path) -> DatasetSpec:
    from dataclasses import replace

    return replace(spec, path=str(path))


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {
            "pid": ["p1", "p2", "p3"],
            "age": [50.0, 61.0, 70.0],
            "stage": [1, 0, 1],
            "E": [1, 0, 1],
            "T": [100.0, 200.0, 50.0],
            "split": ["train", "train", "test"],
        }
    )
    p = tmp_path / "site.parquet"
    pq.write_table(table, p)
    d = load_site_data(_spec(p))
    assert len(d.train) == 2 and len(d.test) == 1
    p.write_bytes(p.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_site_data(_spec(p))


def test_numpy_adapter_and_its_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = tmp_path / "a.npz"
    np.savez(p, x=rng.normal(size=(20, 3)), y=(rng.random(20) > 0.5).astype(int))
    spec = DatasetSpec.from_config(
        {"name": "n", "kind": "numpy", "path": str(p), "task": "binary", "val_fraction": 0.25}
    )
    d = load_site_data(spec)
    assert len(d.train) == 15 and len(d.val) == 5
    np.savez(p, x=rng.normal(size=(20, 3)))
    with pytest.raises(DataError, match="missing array 'y'"):
        load_site_data(spec)
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match=r"\.npz"):
        load_site_data(spec)


def test_image_folder_adapter(tmp_path: Path) -> None:
    from PIL import Image

    for cls, value in (("benign", 30), ("malignant", 220)):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(np.full((80, 80), value + i, np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    spec = DatasetSpec.from_config(
        {
            "name": "scans",
            "kind": "images",
            "path": str(tmp_path),
            "task": "binary",
            "classes": ["benign", "malignant"],
            "val_fraction": 0.25,
        }
    )
    d = load_site_data(spec)
    assert d.train.x.shape == (6, 1, 64, 64) and len(d.val) == 2
    assert d.n_classes == 2
    (tmp_path / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_site_data(spec)


def test_pooled_concatenates_sites(tcga_dir: Path) -> None:
    sites = [
        load_site_data(
            DatasetSpec(
                name=f"c{i}", kind="fed_tcga_brca", path=str(tcga_dir), site=i, val_fraction=0.0
            )
        )
        for i in (4, 5)
    ]
    p = pooled(sites)
    assert len(p.train) == 129 + 40 and len(p.test) == 33 + 11


def test_cv_fold_holds_out_part_of_training_rows_and_never_test_rows(tcga_dir: Path) -> None:
    base = {"name": "c", "kind": "fed_tcga_brca", "path": str(tcga_dir), "site": 4,
            "val_fraction": 0.0, "standardise": "none"}
    full = load_site_data(DatasetSpec.from_config(base))
    held = []
    for k in range(3):
        d = load_site_data(DatasetSpec.from_config({**base, "cv_folds": 3, "cv_fold": k}))
        assert len(d.train) + len(d.test) == 129 and 40 <= len(d.test) <= 45
        held.append(np.concatenate([d.test.x, d.test.y], axis=1))
    # the three held-out folds are exactly the training rows; no test row appears
    rows = np.concatenate(held)
    ref = np.concatenate([full.train.x, full.train.y], axis=1)
    np.testing.assert_array_equal(np.unique(rows, axis=0), np.unique(ref, axis=0))
    assert len(rows) == len(ref)
    with pytest.raises(ValueError, match="cv_fold=3 must lie"):
        DatasetSpec.from_config({**base, "cv_folds": 3, "cv_fold": 3})


# --- encodings, line counting, label checks for .npz, Parquet booleans, schema ---

GOOD = "age,stage,E,T,split\n50,1,1,100,train\n61,0,0,200,train\n70,1,1,50,test\n"


def test_excel_bom_does_not_hide_the_first_column(tmp_path: Path) -> None:
    p = tmp_path / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode())  # Excel's "CSV UTF-8"
    d = load_site_data(_spec(p))
    assert d.feature_names == ["age", "stage"] and len(d.train) == 2


def test_latin1_cell_names_file_line_and_column_and_says_re_save_as_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin1.csv"
    p.write_bytes((HEADER + ROWS[0] + "Sé,61,0,0,200,train\n").encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_site_data(_spec(p))
    assert (err.value.file, err.value.line, err.value.column) == (str(p), 3, "pid")
    assert "not UTF-8" in str(err.value) and "re-save the file as UTF-8" in str(err.value)


def test_parquet_file_named_csv_is_called_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "export.csv"
    pq.write_table(pa.table({"age": [50.0, 61.0], "stage": [1, 0], "E": [1, 0], "T": [1, 2]}), p)
    with pytest.raises(DataError, match="looks like a Parquet file") as err:
        load_site_data(_spec(p, split_column=None))
    assert err.value.file == str(p) and err.value.line == 1


@pytest.mark.parametrize(
    "separator", ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85"]
)
def test_line_numbers_do_not_drift_after_a_cell_holding_a_unicode_line_break(
    tmp_path: Path, separator: str
) -> None:
    text = "note,age,stage,E,T,split\n" + f'"a{separator}b",50,1,1,100,train\n'
    text += "x,61,0,0,200,train\ny,seventy,1,1,50,train\n"
    p = tmp_path / "notes.csv"
    p.write_text(text, encoding="utf-8", newline="")
    with pytest.raises(DataError, match="'seventy' is not a number") as err:
        load_site_data(_spec(p))
    assert (err.value.line, err.value.column) == (4, "age")


def _npz_spec(path: Path, task: str) -> DatasetSpec:
    return DatasetSpec.from_config(
        {"name": "n", "kind": "numpy", "path": str(path), "task": task, "val_fraction": 0.0}
    )


X4 = np.ones((4, 2))


@pytest.mark.parametrize(
    ("task", "arrays", "row", "column", "message"),
    [
        ("binary", {"x": X4, "y": [0, 7, 1, 0]}, 2, "y", "label 7 must be 0 or 1"),
        ("binary", {"x": X4, "y": [0, 1, np.nan, 0]}, 3, "y", "label nan is not finite"),
        ("multiclass", {"x": X4, "y": [0, 2, 1.5, 0]}, 3, "y", "non-negative integer"),
        ("regression", {"x": X4, "y": [0.5, np.inf, 1, 0]}, 2, "y", "not finite"),
        (
            "survival",
            {"x": X4, "event": [1, 5, 0, 1], "time": [1, 2, 3, 4]},
            2,
            "event",
            "event value 5 must be 0 or 1",
        ),
        (
            "survival",
            {"x": X4, "event": [1, 0, 0, 1], "time": [1, 2, -3, 4]},
            3,
            "time",
            "time value -3 must be",
        ),
        (
            "survival",
            {"x": X4, "event": [1, 0, 0, 1], "time": [1, 2, 3, np.nan]},
            4,
            "time",
            "time value nan must be",
        ),
        ("binary", {"x": [[np.nan, 1]] + [[1, 1]] * 3, "y": [0, 1, 0, 1]}, 1, "x", "non-finite"),
        (
            "binary",
            {"x": X4, "y": [0, 1, 0, 1], "split": ["train", "holdout", "test", "train"]},
            2,
            "split",
            "split value 'holdout'",
        ),
    ],
)
def test_numpy_labels_are_checked_like_a_table_and_rows_count_from_1(
    tmp_path: Path, task: str, arrays: dict, row: int, column: str, message: str
) -> None:
    p = tmp_path / "site.npz"
    np.savez(p, **{k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(DataError, match=message) as err:
        load_site_data(_npz_spec(p, task))
    assert (err.value.file, err.value.row, err.value.column) == (str(p), row, column)
    assert f", row {row}," in str(err.value)


def test_numpy_needs_one_row_per_sample_and_one_label_per_row(tmp_path: Path) -> None:
    p = tmp_path / "site.npz"
    np.savez(p, x=np.ones(4), y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"shape \(4,\)") as err:
        load_site_data(_npz_spec(p, "binary"))
    assert err.value.column == "x"
    np.savez(p, x=X4, y=np.zeros((4, 1)))
    with pytest.raises(DataError, match="one value for each of the 4 rows") as err:
        load_site_data(_npz_spec(p, "binary"))
    assert err.value.column == "y"


def test_parquet_boolean_event_and_label_read_as_1_and_0(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "bools.parquet"
    events = [True, False, True]
    pq.write_table(pa.table({"age": [50.0, 61.0, 45.0], "E": events, "T": [100, 250, 30]}), p)
    d = load_site_data(_spec(p, features=["age"], split_column=None, standardise="none"))
    np.testing.assert_array_equal(d.train.y, [[1, 100], [0, 250], [1, 30]])
    spec = DatasetSpec.from_config(
        {
            "name": "b",
            "kind": "tabular",
            "path": str(p),
            "task": "binary",
            "target": "E",
            "features": ["age"],
            "val_fraction": 0.0,
        }
    )
    np.testing.assert_array_equal(load_site_data(spec).train.y, [1, 0, 1])


def test_feature_that_is_also_the_label_is_refused(tmp_path: Path, tcga_dir: Path) -> None:
    p = _write(tmp_path, GOOD)
    with pytest.raises(ValueError, match="feature column 'E' is also the 'event' column") as err:
        load_site_data(_spec(p, features=["age", "E"]))
    assert str(p) in str(err.value)
    # fed_tcga_brca's event column defaults to E when the spec does not name it
    spec = DatasetSpec(
        name="c", kind="fed_tcga_brca", path=str(tcga_dir), site=4, features=("age_at_index", "E")
    )
    with pytest.raises(DataError, match="'event' column") as err:
        load_site_data(spec)
    assert err.value.file.endswith("brca.csv") and err.value.column == "E"


def test_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, "age,age,E,T,split\n50,1,1,100,train\n61,2,0,250,train\n")
    with pytest.raises(DataError, match=r"\['age'\] more than once") as err:
        load_site_data(_spec(p, features=["age"]))
    assert (err.value.file, err.value.line, err.value.column) == (str(p), 1, "age")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    q = tmp_path / "dup.parquet"
    cols = [pa.array([50.0, 61.0]), pa.array([1.0, 2.0]), pa.array([1, 0]), pa.array([1, 2])]
    pq.write_table(pa.Table.from_arrays(cols, names=["age", "age", "E", "T"]), q)
    with pytest.raises(DataError, match="repeat") as err:
        load_site_data(_spec(q, features=["age"], split_column=None))
    assert (err.value.line, err.value.column) == (1, "age")
    with pytest.raises(ValueError, match=r"lists \['age'\] twice"):
        _spec(q, features=["age", "age"])


@pytest.mark.parametrize(("row", "line", "column", "raw"), [
    ("p3,1e39,1,1,50,train\n", 4, "age", "1e39"),
    ("p3,70,-4e38,1,50,train\n", 4, "stage", "-4e38"),
    ("p3,70,1,1,1e39,train\n", 4, "T", "1e39"),
])
def test_a_value_beyond_float32_is_named_not_turned_into_a_column_of_nan(
    tmp_path: Path, row: str, line: int, column: str, raw: str
) -> None:
    """Finite as a Python float, inf once cast to float32 for training (and a whole
    standardised column of NaN, reported as "training diverged"): refused at load,
    naming file, line and column."""
    rows = ROWS.copy()
    rows[2] = row
    p = _write(tmp_path, HEADER + "".join(rows))
    with pytest.raises(DataError) as err:
        load_site_data(_spec(p))
    assert (err.value.file, err.value.line, err.value.column) == (str(p), line, column)
    assert f"value {raw!r} is outside float32's range" in str(err.value)
    rows[2] = "p3,3.4e38,1,1,50,train\n"  # float32's largest finite values still load
    d = load_site_data(_spec(_write(tmp_path, HEADER + "".join(rows))))
    assert np.isfinite(d.train.x).all()


def test_a_numpy_value_beyond_float32_is_named_with_its_row(tmp_path: Path) -> None:
    p = tmp_path / "site.npz"
    x = np.ones((4, 2))
    x[2, 1] = -1e39
    np.savez(p, x=x, y=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"value -1e\+39 is outside float32's range") as err:
        load_site_data(_npz_spec(p, "binary"))
    assert (err.value.file, err.value.row, err.value.column) == (str(p), 3, "x")


def test_a_table_without_declared_features_is_refused_before_reading() -> None:
    """Each site's header order would decide which weight reads which column: two sites
    whose CSVs list age and tumour_size in opposite orders would have FedAvg average the
    weight of age with that of tumour_size, silently."""
    with pytest.raises(ValueError, match=r"kind 'tabular' needs datasets\.features") as err:
        DatasetSpec.from_config({"name": "onc", "kind": "tabular", "path": "/nonexistent.csv",
                                 "task": "binary", "target": "y"})
    assert "FedAvg would average different features" in str(err.value)


def test_declared_features_give_one_column_order_whatever_the_header(tmp_path: Path) -> None:
    a = _write(tmp_path, "age,size,y\n50,2.0,1\n60,3.0,0\n70,1.0,1\n", "a.csv")
    b = _write(tmp_path, "size,age,y\n2.0,50,1\n3.0,60,0\n1.0,70,1\n", "b.csv")
    sites = [load_site_data(DatasetSpec(name=p.stem, kind="tabular", path=str(p), task="binary",
                                        target="y", features=("age", "size"), val_fraction=0.0,
                                        standardise="none")) for p in (a, b)]
    assert sites[0].feature_names == sites[1].feature_names == ["age", "size"]
    np.testing.assert_array_equal(sites[0].train.x, sites[1].train.x)


def test_fed_tcga_brca_features_are_flamby_s_39_whatever_a_copy_s_column_order(
        tmp_path: Path, tcga_dir: Path) -> None:
    import csv
    import shutil

    from fedge.train.data import FED_TCGA_BRCA_FEATURES

    assert len(FED_TCGA_BRCA_FEATURES) == 39
    for name in ("train_test_split.csv", "centers.csv"):
        shutil.copy(tcga_dir / name, tmp_path / name)
    with open(tcga_dir / "brca.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    order = list(reversed(range(len(rows[0]))))  # every column moved
    with open(tmp_path / "brca.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([[r[j] for j in order] for r in rows])
    spec = DatasetSpec(name="c4", kind="fed_tcga_brca", path=str(tcga_dir), site=4)
    original = load_site_data(spec)
    shuffled = load_site_data(replace_path(spec, tmp_path))
    assert original.feature_names == shuffled.feature_names == list(FED_TCGA_BRCA_FEATURES)
    np.testing.assert_array_equal(original.train.x, shuffled.train.x)


def _npz_spec(path: Path, task: str = "binary") -> DatasetSpec:
    return DatasetSpec(name="arr", kind="numpy", path=str(path), task=task, val_fraction=0.0)


def test_a_plain_npy_file_is_refused_naming_it_and_the_format(tmp_path: Path) -> None:
    p = tmp_path / "plain.npy"
    np.save(p, np.ones((4, 3)))
    with pytest.raises(DataError, match=r"plain\.npy: a \.npy file holds one array.*np\.savez"):
        load_site_data(_npz_spec(p))


@pytest.mark.parametrize(("x", "what"), [
    (np.array([[1 + 5j, 2], [3, 4], [5, 6], [7, 8]]), "complex numbers"),
    (np.array(["2020-01-01"] * 8, dtype="datetime64[D]").reshape(4, 2), "dates"),
    (np.array([1, 2, 3, 4] * 2, dtype="timedelta64[s]").reshape(4, 2), "time spans"),
])
def test_arrays_that_are_not_plain_numbers_are_refused(tmp_path: Path, x: np.ndarray,
                                                       what: str) -> None:
    p = tmp_path / "odd.npz"
    np.savez(p, x=x, y=np.array([0, 1, 0, 1.0]))
    with pytest.raises(DataError, match=f"odd.npz, column 'x': array 'x' holds {what}"):
        load_site_data(_npz_spec(p))


def test_a_bytes_split_array_is_read_as_text(tmp_path: Path) -> None:
    p = tmp_path / "s.npz"
    np.savez(p, x=np.arange(8.0).reshape(4, 2), y=np.array([0, 1, 0, 1.0]),
             split=np.array([b"train", b"train", b"test", b"val"]))
    d = load_site_data(_npz_spec(p))
    assert (len(d.train), len(d.val), len(d.test)) == (2, 1, 1)


def test_images_without_a_channel_axis_get_one_and_train(tmp_path: Path) -> None:
    from fedge.train.api import ModelSpec, TrainConfig, build_model, flatten, local_train

    p = tmp_path / "img.npz"
    np.savez(p, x=np.random.default_rng(0).random((10, 32, 32)), y=np.array([0.0, 1.0] * 5))
    d = load_site_data(_npz_spec(p))
    assert d.train.x.shape == (10, 1, 32, 32)
    spec = ModelSpec("resnet_small", {"width": 4, "image_size": 32})
    out = local_train(spec, flatten(build_model(spec)), d, TrainConfig(steps=1, batch_size=4),
                      round=0)
    assert np.all(np.isfinite(out.weights))


@pytest.mark.parametrize(("cell", "site"), [("1.0", 1), ("1", 1), (" 2.50", 2.5), ("A", "A"),
                                            ("007", "007"), ("nan", "nan")])
def test_a_site_value_matches_as_a_number_when_both_are_numbers(
        tmp_path: Path, cell: str, site: object) -> None:
    p = _write(tmp_path, f"a,y,site\n1,1,{cell}\n2,0,{cell}\n3,1,other\n")
    d = load_site_data(DatasetSpec(name="s", kind="tabular", path=str(p), task="binary",
                                   target="y", features=("a",), site_column="site", site=site,
                                   val_fraction=0.0, standardise="none"))
    np.testing.assert_array_equal(d.train.x[:, 0], [1, 2])


def test_a_parquet_float_site_column_matches_an_integer_site(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "s.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "y": [0, 1, 1], "s": [1.0, 1.0, 2.0]}), p)
    d = load_site_data(DatasetSpec(name="s", kind="tabular", path=str(p), task="binary",
                                   target="y", features=("a",), site_column="s", site=1,
                                   val_fraction=0.0))
    assert len(d.train) == 2


@pytest.mark.parametrize(("sep", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_a_semicolon_or_tab_separated_file_is_named_as_such(tmp_path: Path, sep: str,
                                                            name: str) -> None:
    p = _write(tmp_path, sep.join("aby") + "\n" + sep.join("120") + "\n")
    with pytest.raises(DataError, match=f"looks {name}-separated") as err:
        load_site_data(DatasetSpec(name="s", kind="tabular", path=str(p), task="binary",
                                   target="y", features=("a", "b")))
    assert err.value.line == 1 and "comma delimited" in str(err.value)


@pytest.mark.parametrize(("cell", "site"), [("007", 7), ("01", "1"),
                                            ("9007199254740993", 9007199254740992),
                                            ("1_0", 10), ("1e1", 10), ("1.0", "1.0x")])
def test_site_values_that_only_look_alike_as_floats_stay_apart(
        tmp_path: Path, cell: str, site: object) -> None:
    """Zero-padded codes, ids past a float's 53 bits, 1_0 and 1e1 are not the site."""
    p = _write(tmp_path, f"a,y,site\n1,1,{cell}\n2,0,{cell}\n3,1,other\n")
    with pytest.raises(DataError, match="no row has site value"):
        load_site_data(DatasetSpec(name="s", kind="tabular", path=str(p), task="binary",
                                   target="y", features=("a",), site_column="site",
                                   site=site, val_fraction=0.0, standardise="none"))
