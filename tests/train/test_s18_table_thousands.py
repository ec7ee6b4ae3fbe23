"""A German or Swiss export writes integers of 1000 or more with a dot between groups
of three digits ('1.234' = 1234). Once its ';' is turned into ',' (sed, or an export
tool's "delimiter = ," with the locale's number format kept), such a column read as
decimals loads 1000 times too small, silently: the loader refuses it, naming the file,
line and column, the cell's text never in what the journal logs at WARNING or the
coordinator is told. Columns of real decimals stay loadable."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.train.data import DataError, DatasetSpec, load_site_data

THOUSANDS = ("the values look like numbers with a thousands separator (a dot); re-save "
             "the file with no thousands separator and a decimal point")


def _survival(path: Path) -> dict:
    return {"name": "t", "kind": "tabular", "path": str(path), "task": "survival",
            "features": ["alter"], "event": "event", "time": "tage", "val_fraction": 0,
            "standardise": "none"}


def _load(path: Path) -> np.ndarray:
    """The time column as loaded."""
    return load_site_data(DatasetSpec.from_config(_survival(path))).train.y[:, 1]


def _write(path: Path, times: list[str]) -> Path:
    rows = "".join(f"{60 + k % 30},{k % 2},{t}\r\n" for k, t in enumerate(times))
    path.write_text("alter,event,tage\r\n" + rows, newline="")
    return path


def test_a_converted_german_export_is_refused_naming_line_and_column(tmp_path: Path) -> None:
    # the reviewer's file: 'tage' is 1234, 2071, 845, 1500 days
    path = _write(tmp_path / "de_comma.csv", ["1.234", "2.071", "845", "1.500"])
    with pytest.raises(DataError) as err:
        _load(path)
    e = err.value
    assert (e.line, e.column, e.holds_value) == (2, "tage", True)
    assert str(e).startswith(f"{path}, line 2, column 'tage': the values look like numbers "
                             "with a thousands separator (a dot): '1.234'")
    assert e.journal == f"{path}, line 2, column 'tage': {THOUSANDS}"
    assert e.public == f"the data file, line 2, column 'tage': {THOUSANDS}"


def test_the_journal_and_the_coordinator_get_no_cell_of_it(tmp_path: Path, caplog) -> None:
    path = _write(tmp_path / "de.csv", ["1.234", "2.071", "845", "1.500", "12", "3.650"])
    trainer = TorchTrainer([_survival(path)])
    with caplog.at_level(logging.DEBUG, logger="fedge"), pytest.raises(TaskRefusal) as info:
        trainer.load_data("t")
    assert str(info.value) == ("data set 't' cannot be loaded: the data file, line 2, column "
                               f"'tage': {THOUSANDS} (details in this appliance's journal)")
    warned = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert warned == [f"data set 't' cannot be loaded: {path}, line 2, column 'tage': "
                      f"{THOUSANDS}"]
    assert any("'1.234'" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)


def test_the_slow_path_of_a_block_with_a_boolean_cell_refuses_it_too(tmp_path: Path) -> None:
    """A TRUE cell sends its block cell by cell (``_number``); the check is the same."""
    path = _write(tmp_path / "de.csv", ["TRUE", "2.071", "845", "1.500"])
    with pytest.raises(DataError) as err:
        _load(path)
    assert (err.value.line, err.value.column, err.value.problem) == (3, "tage", THOUSANDS)


def test_grouped_cells_blocks_after_the_whole_numbers_are_seen(tmp_path: Path) -> None:
    """The rows are converted 4096 at a time: the shape is judged over the whole column."""
    times = [str(100 + k % 800) for k in range(5000)] + ["1.234", "3.071"]
    with pytest.raises(DataError) as err:
        _load(_write(tmp_path / "long.csv", times))
    assert (err.value.line, err.value.column) == (5002, "tage")


def test_a_string_column_of_parquet_is_text_and_refused_so(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "de.parquet"
    pq.write_table(pa.table({"alter": [61, 55, 70, 48], "event": [1, 0, 1, 0],
                             "tage": ["1.234", "2.071", "845", "1.500"]}), path)
    with pytest.raises(DataError) as err:
        _load(path)
    assert (err.value.line, err.value.column, err.value.problem) == (2, "tage", THOUSANDS)


@pytest.mark.parametrize("times", [
    pytest.param(["24.5", "1.234", "845", "2.071"], id="a decimal of another shape"),
    pytest.param(["0.512", "1.234", "845", "2.071"], id="a first group of 0"),
    pytest.param(["1234", "1.234", "845", "2.071"], id="a wide integer without separator"),
    pytest.param(["1.234", "845", "60", "12"], id="one grouped cell only"),
    pytest.param(["1.234", "2.071", "3.5e2", "1.500"], id="an exponent"),
    pytest.param(["1.234", "2.071", "3.333", "1.500"], id="no whole number"),
])
def test_columns_of_real_decimals_still_load(tmp_path: Path, times: list[str]) -> None:
    got = _load(_write(tmp_path / "r.csv", times))
    np.testing.assert_allclose(got, [float(t) for t in times], rtol=1e-6)


def test_typed_parquet_numbers_are_not_judged_by_their_text(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"alter": [61, 55, 70, 48], "event": [1, 0, 1, 0],
                             "tage": [1.234, 2.071, 845.0, 1.5]}), path)
    np.testing.assert_allclose(_load(path), [1.234, 2.071, 845.0, 1.5], rtol=1e-6)
