"""A spreadsheet whose decimal mark is a comma (German, Swiss, French locales) turns a
number typed with a point ('1.2') into a date, 1 February, and writes it back into CSV
as '01.02': read as a number that is 1.02, silently. The loader refuses a column of
such day.month cells (the day's leading zero marks them: no writer of numbers puts a
0 before another digit), naming the file, line and column; the cell's text is never in
what the journal logs at WARNING or the coordinator is told. A zero-padded column
(01.50, 007) and real decimals (0.5, 12.50, 31.12) still load. A whole date
(01.02.2024, 2024-02-01) was refused already as not a number; it now says it looks
like a date."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.train.data import DataError, DatasetSpec, load_site_data

DATES = ("the values look like dates (day.month with a leading zero), not numbers: a "
         "spreadsheet whose decimal mark is a comma turns a number typed with a point into "
         "a date")


def _regression(path: Path) -> dict:
    return {"name": "t", "kind": "tabular", "path": str(path), "task": "regression",
            "features": ["alter", "kalium"], "target": "y", "val_fraction": 0,
            "standardise": "none"}


def _load(path: Path) -> np.ndarray:
    """The 'kalium' column as loaded."""
    return load_site_data(DatasetSpec.from_config(_regression(path))).train.x[:, 1]


def _write(path: Path, values: list[str]) -> Path:
    rows = "".join(f"{60 + k % 30},{v},{k % 3}\r\n" for k, v in enumerate(values))
    path.write_text("alter,kalium,y\r\n" + rows, newline="")
    return path


def test_day_month_cells_are_refused_naming_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "de.csv", ["4.5", "01.02", "3.9", "07.11"])
    with pytest.raises(DataError) as err:
        _load(path)
    e = err.value
    assert (e.line, e.column, e.holds_value) == (3, "kalium", True)
    assert str(e).startswith(f"{path}, line 3, column 'kalium': '01.02' looks like a date "
                             "(day.month: 1 February), not a number, as do 1 more cell(s)")
    assert e.journal == f"{path}, line 3, column 'kalium': {DATES}"
    assert e.public == f"the data file, line 3, column 'kalium': {DATES}"


def test_one_such_cell_among_decimals_is_refused(tmp_path: Path) -> None:
    """Where a spreadsheet made dates of some cells only ('1.2' a date, '37.5' not)."""
    path = _write(tmp_path / "de.csv", ["37.5", "12.25", "0.5", "09.12", "4"])
    with pytest.raises(DataError) as err:
        _load(path)
    assert (err.value.line, err.value.column, err.value.problem) == (5, "kalium", DATES)


def test_the_journal_and_the_coordinator_get_no_cell_of_it(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "de.csv", ["4.5", "03.04", "3.9"])
    trainer = TorchTrainer([_regression(path)])
    with caplog.at_level(logging.DEBUG, logger="fedge"), pytest.raises(TaskRefusal) as info:
        trainer.load_data("t")
    assert str(info.value) == ("data set 't' cannot be loaded: the data file, line 3, column "
                               f"'kalium': {DATES} (details in this appliance's journal)")
    warned = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert warned == [f"data set 't' cannot be loaded: {path}, line 3, column 'kalium': "
                      f"{DATES}"]
    assert "03.04" not in str(info.value)
    assert any("'03.04'" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)


def test_a_date_cell_after_many_blocks_of_lab_values(tmp_path: Path) -> None:
    """Rows are converted 4096 at a time, and a block of many values from 1 to 9 is
    searched whole: the date's line is still its own."""
    values = [f"{3 + (k % 40) / 10:.1f}" for k in range(9000)] + ["05.06"]
    with pytest.raises(DataError) as err:
        _load(_write(tmp_path / "long.csv", values))
    assert (err.value.line, err.value.column) == (9002, "kalium")
    assert "'05.06' looks like a date (day.month: 5 June)" in str(err.value)


def test_a_string_column_of_parquet_is_judged_as_text(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "de.parquet"
    pq.write_table(pa.table({"alter": [61, 55, 70], "kalium": ["4.5", "3.9", "02.03"],
                             "y": [0, 1, 2]}), path)
    with pytest.raises(DataError) as err:
        _load(path)
    assert (err.value.line, err.value.column, err.value.problem) == (4, "kalium", DATES)


@pytest.mark.parametrize(("cell", "said"), [
    pytest.param("01.02.2024", "(it looks like a date)", id="day.month.year"),
    pytest.param("01.02.24", "(it looks like a date)", id="day.month.yy"),
    pytest.param("2024-02-01", "(it looks like a date)", id="ISO"),
])
def test_a_whole_date_is_no_number_and_said_to_look_like_one(tmp_path: Path, cell: str,
                                                              said: str) -> None:
    path = _write(tmp_path / "d.csv", ["4.5", cell])
    with pytest.raises(DataError) as err:
        _load(path)
    e = err.value
    assert (e.line, e.column) == (3, "kalium")
    assert str(e) == f"{path}, line 3, column 'kalium': value {cell!r} is not a number {said}"
    assert e.public == f"the data file, line 3, column 'kalium': value is not a number {said}"


def test_a_cell_that_is_no_date_is_no_number_as_before(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _load(_write(tmp_path / "d.csv", ["4.5", "n/a"]))
    assert err.value.public == "the data file, line 3, column 'kalium': value is not a number"


@pytest.mark.parametrize("values", [
    pytest.param(["0.5", "0.25", "12.50", "3.9"], id="decimals without a padding zero"),
    pytest.param(["31.12", "15.03", "20.11", "4"], id="days from 10 on look like decimals"),
    pytest.param(["01.02", "01.50", "12.25", "03.07"], id="zero-padded: 01.50 shows it"),
    pytest.param(["01.02", "007", "12.25"], id="zero-padded integers"),
    pytest.param(["01.13", "02.31", "4.5"], id="no month 13 or 31"),
    pytest.param(["03.5", "4.5"], id="one decimal place after a padding zero"),
    pytest.param(["1.02", "9.12", "4.5"], id="no leading zero"),
])
def test_columns_of_real_numbers_still_load(tmp_path: Path, values: list[str]) -> None:
    got = _load(_write(tmp_path / "r.csv", values))
    np.testing.assert_allclose(got, [float(v) for v in values], rtol=1e-6)


def test_zero_padding_seen_in_a_later_block_still_loads(tmp_path: Path) -> None:
    """A zero-padded cell of another shape anywhere in the column, before or after the
    day.month-shaped one, shows the column is written so."""
    values = ["01.02"] + ["45.5"] * 5000 + ["02.75"]
    got = _load(_write(tmp_path / "r.csv", values))
    np.testing.assert_allclose(got, [float(v) for v in values], rtol=1e-6)


def test_typed_parquet_numbers_are_not_judged_by_their_text(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"alter": [61, 55, 70], "kalium": [1.02, 7.11, 4.5],
                             "y": [0, 1, 2]}), path)
    np.testing.assert_allclose(_load(path), [1.02, 7.11, 4.5], rtol=1e-6)
