"""A table exported without its header row: the first patient's row is read as the
header. The refusal says line 1 looks like a data row and the file needs a header, and
since the "names" are a patient's cells, neither the journal at WARNING nor the
coordinator gets them (the site's own message, logged at DEBUG, still lists them)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.train.data import DataError, DatasetSpec, load_site_data

NEEDS_HEADER = ("line 1 looks like a data row, not a header; the file needs a header row "
                "naming its columns")
CELLS = ("DOE", "JANE", "0012345", "ROE")


def _spec(path: Path) -> dict:
    return {"name": "t", "kind": "tabular", "path": str(path), "task": "binary",
            "features": ["age", "bmi"], "target": "label"}


def _refusal(path: Path) -> DataError:
    with pytest.raises(DataError) as err:
        load_site_data(DatasetSpec.from_config(_spec(path)))
    return err.value


def _no_cell(text: str) -> None:
    assert not any(c in text for c in CELLS), text


@pytest.mark.parametrize("data, line, column, said", [
    pytest.param(b"DOE^JANE,0012345,61,24.5,1\nROE^RICHARD,0012346,55,30.1,0\n", 1, "age",
                 "missing column in the header", id="missing column"),
    pytest.param(b"DOE^JANE,0012345,1,24.5,1\nROE^RICHARD,0012346,55,30.1,0\n", 1, None,
                 "the header names a column more than once", id="repeated cell"),
    pytest.param(b"DOE^JANE,0012345,61,24.5,1\nROE^RICHARD,0012346,55\n", 2, None,
                 "truncated row: 3 fields where the header has 5", id="ragged"),
])
def test_a_headerless_file_is_refused_as_such_and_its_row_stays_local(
        tmp_path: Path, data: bytes, line: int, column: str | None, said: str) -> None:
    path = tmp_path / "headerless.csv"
    path.write_bytes(data)
    e = _refusal(path)
    assert (e.line, e.column, e.holds_value) == (line, column, True)
    assert e.problem == f"{said}: {NEEDS_HEADER}"
    _no_cell(e.journal)
    _no_cell(e.public)
    assert "'DOE^JANE'" in str(e)  # the site's own people see what line 1 holds


def test_a_headerless_semicolon_export_says_both_and_keeps_its_row_local(tmp_path: Path) -> None:
    path = tmp_path / "headerless_semicolon.csv"
    path.write_bytes(b"DOE^JANE;0012345;61;24,5;1\nROE^RICHARD;0012346;55;30,1;0\n")
    e = _refusal(path)
    assert e.holds_value
    assert NEEDS_HEADER in e.problem and "semicolon-separated" in e.problem
    _no_cell(e.journal)


def test_a_one_column_headerless_semicolon_export_keeps_its_row_local(tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_bytes(b"DOE^JANE;0012345;61;1\nROE^RICHARD;0012346;55;0\n")
    e = _refusal(path)
    assert e.holds_value and e.line == 1
    assert e.problem == (f"the header is one column: {NEEDS_HEADER}; the header holds "
                         "semicolons: the file looks semicolon-separated; fedge reads "
                         "comma-separated CSV")
    _no_cell(e.journal)


def test_the_journal_at_warning_holds_no_cell(tmp_path: Path, caplog) -> None:
    path = tmp_path / "headerless.csv"
    path.write_bytes(b"DOE^JANE,0012345,61,24.5,1\nROE^RICHARD,0012346,55,30.1,0\n")
    trainer = TorchTrainer([_spec(path)])
    with caplog.at_level(logging.DEBUG, logger="fedge"), pytest.raises(TaskRefusal) as info:
        trainer.load_data("t")
    _no_cell(str(info.value))
    assert NEEDS_HEADER in str(info.value)
    warned = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert warned and all(NEEDS_HEADER in w for w in warned)
    for w in warned:
        _no_cell(w)
    assert any("0012345" in r.getMessage() for r in caplog.records
               if r.levelno == logging.DEBUG)


def test_a_real_header_missing_a_column_still_lists_its_names(tmp_path: Path) -> None:
    path = tmp_path / "named.csv"
    path.write_bytes(b"alter,bmi,label\n61,24.5,1\n55,30.1,0\n")
    e = _refusal(path)
    assert not e.holds_value
    assert e.journal.endswith("missing column in the header; the header has 'alter', 'bmi', "
                              "'label'")


def test_numbered_column_names_in_a_run_are_a_header(tmp_path: Path) -> None:
    """pandas' default names (0, 1, 2, ...) or years: a header, listed as such."""
    path = tmp_path / "numbered.csv"
    path.write_bytes(b",0,1,2\n0,61,24.5,1\n1,55,30.1,0\n")
    e = _refusal(path)
    assert not e.holds_value
    assert e.journal.endswith("the header has '', '0', '1', '2'")


def test_a_headerless_row_with_an_empty_cell_is_refused_as_such(tmp_path: Path) -> None:
    """A missing value in the first patient's row makes an unnamed column."""
    path = tmp_path / "gap.csv"
    path.write_bytes(b"DOE^JANE,,61,24.5,1\nROE^RICHARD,0012346,55,30.1,0\n")
    e = _refusal(path)
    assert e.holds_value and e.line == 1
    assert e.problem == f"a column has no name in the header but holds values: {NEEDS_HEADER}"
    _no_cell(e.journal)
    _no_cell(e.public)
