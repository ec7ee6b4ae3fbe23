"""Excel's TRUE/FALSE in a CSV reads as 1/0, as a Parquet boolean column does: an event
or a binary label kept as a spreadsheet boolean loads the same from either format.
Localised spellings (WAHR, VRAI) and other words stay refused as not a number."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fedge.train.data import DataError, DatasetSpec, load_site_data, tcga_centre_of_barcodes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FEATURES = ["age_at_index", "race_white"]


def _centre0(tcga_dir: Path) -> list[dict[str, str]]:
    centre = tcga_centre_of_barcodes(tcga_dir)
    with open(tcga_dir / "brca.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if centre.get(r["pid"]) == 0]


def _spec(path: Path, **kw: object) -> DatasetSpec:
    args: dict[str, object] = {"name": "brca", "kind": "tabular", "path": str(path),
                               "task": "survival", "features": FEATURES, "event": "E",
                               "time": "T", "val_fraction": 0.0}
    args.update(kw)
    return DatasetSpec.from_config(args)


def _excel_bool(cell: str, spelling: tuple[str, str]) -> str:
    return spelling[0] if float(cell) == 1 else spelling[1]


@pytest.mark.parametrize("spelling", [("TRUE", "FALSE"), ("True", "False"), ("true", "false")])
def test_a_csv_event_of_spreadsheet_booleans_loads_as_the_parquet_booleans_do(
        tmp_path: Path, tcga_dir: Path, spelling: tuple[str, str]) -> None:
    rows = _centre0(tcga_dir)
    cols = [*FEATURES, "E", "T"]
    with open(tmp_path / "bool.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(cols)
        for r in rows:
            writer.writerow([r[c] if c != "E" else _excel_bool(r[c], spelling) for c in cols])
    table = {c: [float(r[c]) for r in rows] for c in cols}
    table["E"] = [float(r["E"]) == 1 for r in rows]  # a Parquet boolean column
    pq.write_table(pa.table(table), tmp_path / "bool.parquet")
    from_csv = load_site_data(_spec(tmp_path / "bool.csv"))
    from_parquet = load_site_data(_spec(tmp_path / "bool.parquet"))
    np.testing.assert_array_equal(from_csv.train.y, from_parquet.train.y)
    np.testing.assert_array_equal(from_csv.train.x, from_parquet.train.x)
    assert set(from_csv.train.y[:, 0]) == {0.0, 1.0}


def test_a_binary_label_of_spreadsheet_booleans_loads_as_1_and_0(tmp_path: Path) -> None:
    path = tmp_path / "label.csv"
    path.write_text("age,y\n50,TRUE\n61,FALSE\n70, true \n")
    d = load_site_data(_spec(path, task="binary", features=["age"], target="y",
                             event=None, time=None))
    np.testing.assert_array_equal(d.train.y, [1.0, 0.0, 1.0])


@pytest.mark.parametrize("word", ["WAHR", "VRAI", "yes", "T"])
def test_other_words_are_still_not_a_number(tmp_path: Path, word: str) -> None:
    path = tmp_path / "label.csv"
    path.write_text(f"age,y\n50,{word}\n61,0\n")
    with pytest.raises(DataError, match="is not a number") as err:
        load_site_data(_spec(path, task="binary", features=["age"], target="y",
                             event=None, time=None))
    assert err.value.line == 2 and err.value.column == "y"
