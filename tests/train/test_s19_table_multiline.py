"""A quoted CSV cell may hold a line break (a free-text note exported from a hospital
system), so one record spans several lines. The csv module counts the line a record
ends on; a refusal names the line its bad cell starts on, as an editor shows it, and a
quote never closed names the line its record starts on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedge.agent.trainer import read_source
from fedge.train.data import DataError, DatasetSpec


def _spec(path: Path, **extra) -> DatasetSpec:
    table = {"name": "t", "kind": "tabular", "path": str(path), "task": "binary",
             "features": ["alter", "kalium"], "target": "y", "val_fraction": 0,
             "standardise": "none", **extra}
    return DatasetSpec.from_config(table)


def _written(path: Path, text: str) -> Path:
    """``text`` in ``path``, written an hour ago: ``read_source`` pauses before it
    refuses a file written moments before (an export still being written?)."""
    path.write_text(text, newline="")
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    return path


def _refusal(path: Path, text: str, **extra) -> DataError:
    """What the agent's read of ``text`` written to ``path`` refuses it with."""
    _written(path, text)
    with pytest.raises(DataError) as err:
        read_source(_spec(path, **extra))
    return err.value


# lines: 1 header; 2-4 one record (its note holds two line breaks); 5 one record
NOTE = 'alter,note,kalium,y\r\n61,"line one\r\nline two\r\nline three",4.5,1\r\n'


def test_a_bad_cell_before_the_note_names_the_line_the_record_starts_on(
        tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    e = _refusal(path, 'alter,kalium,note,y\r\n61,4.5,x,0\r\n62,k.A.,"a\r\nb\r\nc",1\r\n')
    assert (e.line, e.column) == (3, "kalium")
    assert str(e) == f"{path}, line 3, column 'kalium': value 'k.A.' is not a number"


def test_a_bad_cell_after_the_note_names_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    e = _refusal(path, 'alter,note,kalium,y\r\n61,"a\nb",k.A.,1\r\n')
    assert (e.line, e.column) == (3, "kalium")


def test_rows_after_a_spanning_record_keep_their_lines(tmp_path: Path) -> None:
    e = _refusal(tmp_path / "n.csv", NOTE + "62,x,k.A.,0\r\n")
    assert (e.line, e.column) == (5, "kalium")


@pytest.mark.parametrize(("text", "line"), [
    pytest.param('alter,kalium,y,note\r\n61,4.5,7,"a\nb\nc"\r\n', 2, id="before the note"),
    pytest.param('alter,kalium,note,y\r\n61,4.5,"a\nb\nc",7\r\n', 4, id="after the note"),
])
def test_a_label_names_its_own_line(tmp_path: Path, text: str, line: int) -> None:
    """Labels are checked once the column is read whole (0 or 1 for binary)."""
    e = _refusal(tmp_path / "n.csv", text)
    assert (e.line, e.column, e.problem) == (line, "y", "label must be 0 or 1")


def test_survival_cells_name_their_own_lines(tmp_path: Path) -> None:
    # lines: 1 header; 2-3 one record (a lone CR ends a line too); 4-6 the next, its
    # time on line 5, between its two notes
    path = _written(tmp_path / "s.csv", 'alter,kalium,event,note,tage,more\r\n'
                    '61,4.5,1,"a\rb",12,x\r\n62,4.1,0,"c\r\nd",-3,"e\nf"\r\n')
    spec = DatasetSpec.from_config({
        "name": "t", "kind": "tabular", "path": str(path), "task": "survival",
        "features": ["alter", "kalium"], "event": "event", "time": "tage",
        "val_fraction": 0, "standardise": "none"})
    with pytest.raises(DataError) as err:
        read_source(spec)
    assert (err.value.line, err.value.column) == (5, "tage")
    _written(path, 'alter,kalium,event,note,tage,more\r\n'
             '61,4.5,1,"a\rb",12,x\r\n62,4.1,2,"c\r\nd",3,"e\nf"\r\n')
    with pytest.raises(DataError) as err:
        read_source(spec)
    assert (err.value.line, err.value.column) == (4, "event")


def test_a_bad_split_value_names_its_own_line(tmp_path: Path) -> None:
    e = _refusal(tmp_path / "n.csv", 'alter,kalium,split,y,note\r\n61,4.5,train,1,"a\nb"\r\n'
                 '62,4.1,trian,0,"c\nd"\r\n', split_column="split")
    assert (e.line, e.column) == (4, "split")


def test_a_ragged_row_is_named_by_the_line_it_starts_on(tmp_path: Path) -> None:
    e = _refusal(tmp_path / "n.csv", NOTE + '62,"x\ny",4.1\r\n')
    assert (e.line, e.problem) == (5, "truncated row: 3 fields where the header has 4")


def test_a_quote_never_closed_names_the_record_it_opens(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    e = _refusal(path, NOTE + '62,"no end\r\n4.1,0\r\n63,x,4.0,1\r\n')
    assert e.line == 7
    assert str(e) == (f"{path}, line 7: malformed CSV: unexpected end of data (in the "
                      "record that starts on line 5: a quote opened there and not closed "
                      "runs on to this line)")
    assert e.public == "the data file, line 7: malformed CSV"


def test_a_byte_that_is_not_utf8_names_the_line_of_its_cell(tmp_path: Path) -> None:
    """Latin-1 'ä' (0xe4) in a cell before a note that spans lines 3 to 5."""
    path = tmp_path / "n.csv"
    path.write_bytes(b'alter,kalium,y,note\r\n61,4.5,1,x\r\n62,K\xe4,0,"a\r\nb\r\nc"\r\n')
    os.utime(path, (time.time() - 3600,) * 2)
    with pytest.raises(DataError) as err:
        read_source(_spec(path))
    assert (err.value.line, err.value.column) == (3, "kalium")
