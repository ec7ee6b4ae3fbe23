"""Parquet column names are read as CSV header names are: spaces around a name are
dropped (a SAS or pandas export's 'age '), so both formats name the same columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError, DatasetSpec, load_site_data

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _spec(path: Path) -> DatasetSpec:
    return DatasetSpec.from_config({
        "name": "s", "kind": "tabular", "path": str(path), "task": "survival",
        "features": ["age", "stage"], "event": "E", "time": "T", "val_fraction": 0.0})


def test_a_parquet_name_with_spaces_around_it_is_the_declared_column(tmp_path: Path) -> None:
    columns = {"age": [50.0, 61.0, 70.0], "stage": [1, 0, 1], "E": [1, 0, 1],
               "T": [100.0, 200.0, 50.0]}
    pq.write_table(pa.table(columns), tmp_path / "plain.parquet")
    spaced = {" age ": columns["age"], "stage\t": columns["stage"], "E": columns["E"],
              "T ": columns["T"]}
    pq.write_table(pa.table(spaced), tmp_path / "spaced.parquet")
    (tmp_path / "spaced.csv").write_text(
        " age ,stage\t,E,T \n50,1,1,100\n61,0,0,200\n70,1,1,50\n")
    plain = load_site_data(_spec(tmp_path / "plain.parquet"))
    for name in ("spaced.parquet", "spaced.csv"):
        d = load_site_data(_spec(tmp_path / name))
        np.testing.assert_array_equal(d.train.x, plain.train.x)
        np.testing.assert_array_equal(d.train.y, plain.train.y)


def test_two_parquet_names_that_differ_only_in_spaces_are_a_repeat(tmp_path: Path) -> None:
    pq.write_table(pa.table({"age": [1.0], "age ": [2.0], "E": [1], "T": [1.0]}),
                   tmp_path / "twice.parquet")
    with pytest.raises(DataError, match="repeat") as err:
        load_site_data(_spec(tmp_path / "twice.parquet"))
    assert err.value.column == "age"
