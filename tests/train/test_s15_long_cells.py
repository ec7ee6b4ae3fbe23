"""A free-text cell longer than the csv module's default field limit (131072
characters), in a column no model reads, does not refuse the file: the file is in
memory whole, so its own length bounds every cell."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedge.train.data import DatasetSpec, load_site_data

DEFAULT_LIMIT = 131072  # csv.field_size_limit() of a fresh interpreter


def test_a_report_column_longer_than_the_csv_default_limit_loads(tmp_path: Path) -> None:
    report = "x" * (DEFAULT_LIMIT * 2)
    path = tmp_path / "reports.csv"
    path.write_text(f"age,report,E,T\n50,short,1,100\n61,\"{report}\",0,200\n70,,1,50\n")
    d = load_site_data(DatasetSpec.from_config({
        "name": "s", "kind": "tabular", "path": str(path), "task": "survival",
        "features": ["age"], "event": "E", "time": "T", "val_fraction": 0.0}))
    np.testing.assert_array_equal(d.train.y[:, 1], [100, 200, 50])
    assert csv.field_size_limit() >= len(report)
