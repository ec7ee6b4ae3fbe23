"""One spelling of a name whatever Unicode normalisation wrote it: agent.toml's data set
and column names, a CSV header and a plan's job.dataset are read NFC ('é' composed or
not is one name), the plan's text (what is hashed) stays as given, and a column still
not found is named with ascii() beside the header's own columns."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from fedge.agent.trainer import TorchTrainer
from fedge.coordinator.plan import parse_plan, plan_labels
from fedge.train.data import DataError, DatasetSpec, load_site_data

NFC_NAME = unicodedata.normalize("NFC", "brca-\u00e9")
NFD_NAME = unicodedata.normalize("NFD", NFC_NAME)
NFC_AGE = unicodedata.normalize("NFC", "\u00e2ge")
NFD_AGE = unicodedata.normalize("NFD", NFC_AGE)
assert NFC_NAME != NFD_NAME and NFC_AGE != NFD_AGE

ROWS = "p1,50,1,1,100,train\np2,61,0,0,200,train\np3,70,1,1,50,train\np4,44,0,0,300,test\n"


def _table(path: Path, name: str, age: str) -> dict[str, object]:
    return {"name": name, "kind": "tabular", "path": str(path), "task": "survival",
            "features": [age, "stage"], "event": "E", "time": "T",
            "split_column": "split", "val_fraction": 0.0}


def _csv(tmp_path: Path, age: str) -> Path:
    p = tmp_path / "site.csv"
    p.write_text(f"pid,{age},stage,E,T,split\n{ROWS}", encoding="utf-8")
    return p


@pytest.mark.parametrize(("declared", "header"), [(NFC_AGE, NFD_AGE), (NFD_AGE, NFC_AGE)])
def test_a_column_declared_in_one_form_is_found_in_a_header_of_the_other(
        tmp_path, declared, header) -> None:
    spec = DatasetSpec.from_config(_table(_csv(tmp_path, header), NFD_NAME, declared))
    assert spec.name == NFC_NAME and spec.features == (NFC_AGE, "stage")
    data = load_site_data(spec)
    assert data.feature_names == [NFC_AGE, "stage"] and len(data.train) == 3


@pytest.mark.parametrize("header", ["\u0430ge", "age\u200b", "AGE"])  # Cyrillic а, ZWSP
def test_a_missing_column_lists_the_header_with_look_alikes_shown_as_ascii(
        tmp_path, header) -> None:
    spec = DatasetSpec.from_config(_table(_csv(tmp_path, header), "onc", "age"))
    with pytest.raises(DataError) as err:
        load_site_data(spec)
    msg = str(err.value)
    assert err.value.column == "age" and "missing column in the header" in msg
    assert (f"the header has 'pid', {header!a}, 'stage', 'E', 'T', 'split'"
            in msg), msg
    if header != "\u0430ge":  # case or an invisible character: said so
        assert f"the header's {header!a} differs from it only in case" in msg


PLAN = """
[job]
dataset = "{dataset}"
rounds = 1
[model]
name = "cox_linear"
params = {{ in_features = 2 }}
[train]
epochs = 1
batch_size = 8
learning_rate = 0.01
[strategy]
name = "fedavg"
"""


def test_a_plans_dataset_is_read_nfc_and_its_text_is_kept_as_given() -> None:
    nfd = parse_plan(PLAN.format(dataset=NFD_NAME))
    nfc = parse_plan(PLAN.format(dataset=NFC_NAME))
    assert nfd.dataset == nfc.dataset == NFC_NAME
    assert NFD_NAME in nfd.text and nfd.digest != nfc.digest  # the text as given
    assert plan_labels(PLAN.format(dataset=NFD_NAME))["dataset"] == NFC_NAME


def test_the_agent_holds_an_nfd_declared_data_set_under_its_nfc_name(tmp_path) -> None:
    trainer = TorchTrainer([_table(_csv(tmp_path, NFC_AGE), NFD_NAME, NFD_AGE)])
    assert trainer.datasets() == [NFC_NAME]
    plan = parse_plan(PLAN.format(dataset=NFD_NAME))
    assert trainer.standardisation(plan.dataset) is not None
    *_, names = trainer.standardisation(NFD_NAME)  # e.g. a model's metadata
    assert names == [NFC_AGE, "stage"]
