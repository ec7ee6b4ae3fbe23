"""Fed-TCGA-BRCA centre 0 saved as spreadsheets really save it, loaded as the agent loads
it: European Excel's ';' with decimal commas and a tab-separated export are refused
with the separator named (this data set's column names hold commas, so the header
never reads as one column)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from fedge.train.data import (
    FED_TCGA_BRCA_FEATURES,
    DataError,
    DatasetSpec,
    load_site_data,
    tcga_centre_of_barcodes,
)


@pytest.fixture(scope="module")
def centre0(tcga_dir: Path) -> tuple[list[str], list[list[str]]]:
    """Centre 0's rows of brca.csv with a split column, as a header and cells."""
    centre = tcga_centre_of_barcodes(tcga_dir)
    with open(tcga_dir / "train_test_split.csv", newline="") as f:
        fold = {r["pid"]: r["fold"] for r in csv.DictReader(f)}
    with open(tcga_dir / "brca.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if centre.get(r["pid"]) == 0]
    header = [*rows[0].keys(), "split"]
    return header, [[*r.values(), fold[r["pid"]]] for r in rows]


def _spec(path: Path) -> DatasetSpec:
    return DatasetSpec.from_config({
        "name": "brca", "kind": "tabular", "path": str(path), "task": "survival",
        "features": list(FED_TCGA_BRCA_FEATURES), "event": "E", "time": "T",
        "split_column": "split", "val_fraction": 0.2, "seed": 0})


def _save(path: Path, header: list[str], rows: list[list[str]], sep: str = ",") -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep, lineterminator="\r\n")  # as Excel ends lines
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), newline="")
    return path


def test_brca_header_holds_commas_so_a_semicolon_file_reads_as_several_columns(
        centre0: tuple[list[str], list[list[str]]]) -> None:
    """The premise: the one-column-header hint alone cannot catch these files."""
    header, _ = centre0
    assert any("," in h for h in header)


def test_a_european_excel_export_is_refused_naming_the_semicolon(
        tmp_path: Path, centre0: tuple[list[str], list[list[str]]]) -> None:
    header, rows = centre0
    eu = [[c.replace(".", ",") for c in r] for r in rows]  # decimal commas
    path = _save(tmp_path / "eu.csv", header, eu, sep=";")
    with pytest.raises(DataError) as err:
        load_site_data(_spec(path))
    assert "looks semicolon-separated" in str(err.value)
    assert "comma delimited" in str(err.value)
    assert "semicolon-separated" in err.value.public
    assert "age_at_index" not in err.value.public  # no text read from the header


def test_a_tab_separated_export_is_refused_naming_the_tab(
        tmp_path: Path, centre0: tuple[list[str], list[list[str]]]) -> None:
    header, rows = centre0
    path = _save(tmp_path / "tab.csv", header, rows, sep="\t")
    with pytest.raises(DataError) as err:
        load_site_data(_spec(path))
    assert "looks tab-separated" in str(err.value)
    assert "tab-separated" in err.value.public


def test_a_comma_file_whose_column_name_holds_a_semicolon_still_loads(tmp_path: Path) -> None:
    """The hint comes with a refusal only: a ';' inside a name is no reason to refuse."""
    path = tmp_path / "ok.csv"
    path.write_text("age;years,stage,E,T\n50,1,1,100\n61,0,0,200\n70,1,1,50\n")
    d = load_site_data(DatasetSpec.from_config({
        "name": "s", "kind": "tabular", "path": str(path), "task": "survival",
        "features": ["age;years", "stage"], "event": "E", "time": "T", "val_fraction": 0.0}))
    assert len(d.train) == 3
