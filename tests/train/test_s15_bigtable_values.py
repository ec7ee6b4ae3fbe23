"""The streaming table reader gives the arrays, and the refusals, the whole-file reader
gave: values compared with the numbers the file was written from, across the blocks
the reader converts at a time, in CSV's spellings (BOM, CRLF, quoting, TRUE/FALSE,
Excel's trailing unnamed columns) and Parquet's types; a bad cell is named by its line
and declared column in the order the old reader named them."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.train import data
from fedge.train.data import DataError, DatasetSpec, _load_tabular

ROWS = 10_000  # more than two of the reader's blocks


def _spec(path, **kw):
    table = {"name": "d", "kind": "tabular", "path": str(path), "task": "survival",
             "features": ["b", "a"], "event": "event", "time": "time", **kw}
    return DatasetSpec.from_config(table)


def _columns(rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": np.round(rng.normal(50, 15, rows), 3),
        "skip": rng.normal(size=rows),
        "b": rng.integers(-5, 5, rows).astype(np.float64),
        "event": rng.integers(0, 2, rows).astype(np.float64),
        "time": rng.integers(1, 4000, rows).astype(np.float64),
        "split": rng.choice(["train", "val", "test"], rows),
        "site": rng.choice(["1", "2"], rows),
    }


def _write_csv(path, cols, *, bom=False, crlf=False, quote=False, booleans=False,
               trailing=0):
    names = list(cols)
    end = "\r\n" if crlf else "\n"

    def cell(name, v):
        if name == "event" and booleans:
            text = "TRUE" if v == 1 else "false"
        else:
            text = repr(float(v)) if isinstance(v, float | np.floating) else str(v)
        return f'"{text}"' if quote else text

    lines = [",".join(names) + "," * trailing]
    for k in range(len(cols["a"])):
        lines.append(",".join(cell(n, cols[n][k]) for n in names) + "," * trailing)
    path.write_text(("\ufeff" if bom else "") + end.join(lines) + end, encoding="utf-8",
                    newline="")


def _expect(cols, keep=None):
    keep = np.ones(len(cols["a"]), bool) if keep is None else keep
    x = np.stack([cols["b"][keep], cols["a"][keep]], 1).astype(np.float32)
    y = np.stack([cols["event"][keep], cols["time"][keep]], 1).astype(np.float32)
    return x, y


@pytest.mark.parametrize("variant", [
    {}, {"bom": True, "crlf": True}, {"quote": True}, {"booleans": True}, {"trailing": 3}])
def test_csv_values_match_the_numbers_written(tmp_path, variant):
    cols = _columns()
    path = tmp_path / "t.csv"
    _write_csv(path, cols, **variant)
    table = _load_tabular(_spec(path, split_column="split"), path)
    x, y = _expect(cols)
    assert table.x.dtype == np.float32 and table.y.dtype == np.float32
    np.testing.assert_array_equal(table.x, x)
    np.testing.assert_array_equal(table.y, y)
    assert table.split == list(cols["split"])


def test_csv_site_filter_keeps_this_sites_rows_in_order(tmp_path):
    cols = _columns()
    path = tmp_path / "t.csv"
    _write_csv(path, cols)
    table = _load_tabular(_spec(path, site_column="site", site=2), path)
    keep = cols["site"] == "2"
    x, y = _expect(cols, keep)
    np.testing.assert_array_equal(table.x, x)
    np.testing.assert_array_equal(table.y, y)


def test_parquet_values_match_the_numbers_written(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cols = _columns()
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({
        "a": pa.array(cols["a"], pa.float64()),
        "skip": pa.array(cols["skip"]),
        "b": pa.array(cols["b"].astype(np.int32)),  # integers
        "event": pa.array(cols["event"] == 1),  # booleans read as 1/0
        "time": pa.array([repr(float(v)) for v in cols["time"]]),  # numbers kept as text
        "split": pa.array(cols["split"]),
        "site": pa.array(cols["site"].astype(np.int64)),
    }), path, row_group_size=3000)
    table = _load_tabular(_spec(path, split_column="split", site_column="site", site=1), path)
    keep = cols["site"] == "1"
    x, y = _expect(cols, keep)
    np.testing.assert_array_equal(table.x, x)
    np.testing.assert_array_equal(table.y, y)
    assert table.split == list(cols["split"][keep])


def test_a_bad_cell_past_the_first_block_names_its_line(tmp_path):
    cols = _columns()
    path = tmp_path / "t.csv"
    _write_csv(path, cols)
    lines = path.read_text().split("\n")
    row = 9_000  # data row 9000 is line 9001
    fields = lines[row].split(",")
    fields[list(cols).index("a")] = "12,5".replace(",", ";")
    lines[row] = ",".join(fields)
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        _load_tabular(_spec(path), path)
    assert (err.value.line, err.value.column, err.value.problem) == (
        9001, "a", "value is not a number")
    assert err.value.public == "the data file, line 9001, column 'a': value is not a number"


def test_refusals_follow_declared_column_order_not_file_order(tmp_path):
    """As the whole-file reader did: the first declared feature with a bad cell is
    named, at its first bad line, though another column goes bad on an earlier line."""
    cols = _columns(rows=20)
    cols["a"] = cols["a"].astype(object)
    cols["b"] = cols["b"].astype(object)
    cols["a"][2] = "n/a"  # line 4
    cols["b"][15] = ""  # line 17; b is declared first
    path = tmp_path / "t.csv"
    _write_csv(path, cols)
    with pytest.raises(DataError) as err:
        _load_tabular(_spec(path), path)
    assert (err.value.line, err.value.column, err.value.problem) == (17, "b", "missing value")


def test_a_ragged_row_is_refused_before_any_bad_cell(tmp_path):
    cols = _columns(rows=20)
    cols["a"] = cols["a"].astype(object)
    cols["a"][1] = "x"  # line 3
    path = tmp_path / "t.csv"
    _write_csv(path, cols)
    with path.open("a") as f:
        f.write("1,2\n")  # line 22
    with pytest.raises(DataError) as err:
        _load_tabular(_spec(path), path)
    assert err.value.line == 22 and err.value.problem.startswith("truncated row")


def test_blocks_are_smaller_than_the_files_here():
    assert data._BLOCK_ROWS < ROWS // 2
