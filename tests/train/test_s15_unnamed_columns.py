"""Excel's trailing empty columns (",," on every line, from once-formatted cells) load
as if absent; unnamed columns that hold values are refused as unnamed, not as a
repeated name. Fed-TCGA-BRCA centre 0, loaded as the agent loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError, DatasetSpec, SiteData, load_site_data
from tests.train.test_s15_spreadsheet_exports import _save, _spec, centre0

__all__ = ["centre0"]  # the fixture, shared


def _same(a: SiteData, b: SiteData) -> bool:
    return all(np.array_equal(getattr(a, s).x, getattr(b, s).x)
               and np.array_equal(getattr(a, s).y, getattr(b, s).y)
               for s in ("train", "val", "test"))


def test_excel_trailing_empty_columns_load_as_if_absent(
        tmp_path: Path, centre0: tuple[list[str], list[list[str]]]) -> None:
    header, rows = centre0
    base = load_site_data(_spec(_save(tmp_path / "base.csv", header, rows)))
    for n in (1, 2, 5):
        padded = _save(tmp_path / f"pad{n}.csv", header + [""] * n,
                       [r + [""] * n for r in rows])
        assert _same(load_site_data(_spec(padded)), base), n


def test_an_empty_unnamed_column_between_named_ones_is_dropped(
        tmp_path: Path, centre0: tuple[list[str], list[list[str]]]) -> None:
    header, rows = centre0
    base = load_site_data(_spec(_save(tmp_path / "base.csv", header, rows)))
    gap = _save(tmp_path / "gap.csv", ["", header[0], "", *header[1:], " "],
                [["", r[0], " ", *r[1:], ""] for r in rows])
    assert _same(load_site_data(_spec(gap)), base)


def test_unnamed_columns_that_hold_values_are_refused_as_unnamed_not_as_a_repeat(
        tmp_path: Path, centre0: tuple[list[str], list[list[str]]]) -> None:
    header, rows = centre0
    path = _save(tmp_path / "unnamed.csv", [*header, "", "", ""],
                 [[*r, "note", "", "x"] if k == 3 else [*r, "", "", ""]
                  for k, r in enumerate(rows)])
    with pytest.raises(DataError) as err:
        load_site_data(_spec(path))
    assert "more than once" not in str(err.value)
    assert err.value.line == 1
    assert "2 columns have no name in the header" in str(err.value)
    width = len(header)
    assert f"columns {width + 1}, {width + 3}" in str(err.value)
    assert err.value.public == ("the data file, line 1: 2 columns have no name in the header "
                                "but hold values")


def test_one_unnamed_column_with_values_still_loads(tmp_path: Path) -> None:
    """pandas' to_csv writes its index so, with an empty name: never a declared column."""
    path = tmp_path / "pandas.csv"
    path.write_text(",age,E,T\n0,50,1,100\n1,61,0,200\n2,70,1,50\n")
    d = load_site_data(DatasetSpec.from_config({
        "name": "s", "kind": "tabular", "path": str(path), "task": "survival",
        "features": ["age"], "event": "E", "time": "T", "val_fraction": 0.0}))
    np.testing.assert_array_equal(d.train.y[:, 1], [100, 200, 50])
