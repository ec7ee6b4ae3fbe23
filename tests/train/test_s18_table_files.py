"""What a data path is, when it is no CSV: a folder or a named pipe is said to be one
(not "does not exist"), an Excel workbook or a gzip file given as CSV is named, Excel's
'sep=' first line is named, and an unnamed column that holds values after the first
(a decimal comma splitting an unquoted cell, say) is refused, not silently skipped.
The coordinator's copy of each names no path."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError, DatasetSpec, load_site_data

CSV = b"age,bmi,label\n60,24.5,1\n70,30.1,0\n"


def _spec(path: Path, kind: str = "tabular") -> DatasetSpec:
    table = {"name": "t", "kind": kind, "path": str(path), "task": "binary",
             "features": ["age", "bmi"], "target": "label", "val_fraction": 0,
             "standardise": "none"}
    if kind == "numpy":
        del table["features"], table["target"]
    return DatasetSpec.from_config(table)


def _refusal(path: Path, kind: str = "tabular") -> DataError:
    with pytest.raises(DataError) as err:
        load_site_data(_spec(path, kind))
    return err.value


@pytest.mark.parametrize("name, kind", [("Zürich data", "tabular"), ("x.parquet", "tabular"),
                                        ("x.npz", "numpy")])
def test_a_directory_is_said_to_be_one(tmp_path: Path, name: str, kind: str) -> None:
    folder = tmp_path / "MRN0012345" / name
    folder.mkdir(parents=True)
    (folder / "brca ü.csv").write_bytes(CSV)
    e = _refusal(folder, kind)
    assert str(e) == f"{folder}: is a directory, not a file"
    assert e.public == "the data file: is a directory, not a file"


@pytest.mark.parametrize("name, kind", [("fifo.csv", "tabular"), ("fifo.parquet", "tabular"),
                                        ("fifo.npz", "numpy")])
def test_a_named_pipe_is_not_a_regular_file(tmp_path: Path, name: str, kind: str) -> None:
    fifo = tmp_path / name
    os.mkfifo(fifo)
    e = _refusal(fifo, kind)  # never opened: opening a pipe with no writer would block
    assert str(e) == f"{fifo}: is not a regular file (a named pipe, device or socket)"
    assert e.public == "the data file: is not a regular file (a named pipe, device or socket)"


def test_a_broken_link_and_a_missing_file_do_not_exist(tmp_path: Path) -> None:
    link = tmp_path / "broken.csv"
    link.symlink_to(tmp_path / "gone.csv")
    for path in (link, tmp_path / "never.csv"):
        e = _refusal(path)
        assert str(e) == f"{path}: file does not exist"
        assert e.public == "the data file: file does not exist"


def test_a_link_to_a_directory_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    link = tmp_path / "data.csv"
    link.symlink_to(tmp_path / "d")
    assert _refusal(link).public == "the data file: is a directory, not a file"


def test_an_excel_workbook_given_as_csv_is_named(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"  # renamed .xlsx
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/worksheets/sheet1.xml", "<worksheet/>")
    e = _refusal(path)
    assert str(e).startswith(f"{path}, line 1: not CSV text: this is an Excel workbook (.xlsx)")
    assert e.public == ("the data file, line 1: not CSV text (it is an Excel workbook or "
                        "another zip file)")


def test_a_gzip_file_given_as_csv_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(CSV))
    e = _refusal(path)
    assert str(e).startswith(f"{path}, line 1: not CSV text: this is a gzip file")
    assert e.public == "the data file, line 1: not CSV text (it is a gzip file)"


@pytest.mark.parametrize("first", [b"sep=,", b"sep=;", b"SEP=\t"])
def test_excels_sep_line_is_named(tmp_path: Path, first: bytes) -> None:
    sep = first[-1:]
    body = CSV.replace(b",", sep) if sep != b"," else CSV
    path = tmp_path / "excel.csv"
    path.write_bytes(first + b"\r\n" + body)
    e = _refusal(path)
    said = ("line 1 is Excel's 'sep=' line: remove it, or re-save as CSV UTF-8 "
            "(comma delimited)")
    assert e.line == 1 and e.problem == said
    assert e.public == f"the data file, line 1: {said}"


def test_an_unnamed_column_with_values_after_the_first_is_refused(tmp_path: Path) -> None:
    """'bmi' 24,5 unquoted: 24 under bmi, 5 under a trailing unnamed column."""
    path = tmp_path / "comma.csv"
    path.write_bytes(b"age,label,bmi,\n60,1,24,\n70,0,30,5\n")
    e = _refusal(path)
    assert e.line == 3  # the first line where it holds a value
    assert str(e).startswith(f"{path}, line 3: column 4 (counting from 1) has no name in "
                             "the header but holds values")
    assert e.public == ("the data file, line 3: a column other than the first has no name "
                        "in the header but holds values")


def test_pandas_index_and_empty_trailing_columns_still_load(tmp_path: Path) -> None:
    path = tmp_path / "pandas.csv"
    path.write_bytes(b",age,bmi,label,,\n0,60,24.5,1,,\n1,70,30.1,0,,\n")
    got = load_site_data(_spec(path))
    np.testing.assert_allclose(got.train.x, [[60, 24.5], [70, 30.1]], rtol=1e-6)
