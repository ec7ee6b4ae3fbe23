"""A federated model names no features (the sites never send theirs): installed at a
site, it gets the site's names in the order its prepended standardisation takes the
columns, and `fedge serve` lists them; a model naming other features, or the same in
another order, is refused. Real installer, real data set, real `fedge serve`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedge.agent.trainer import TorchTrainer
from fedge.agent.updates import SiteModels
from fedge.serve.export import export_onnx, read_metadata
from fedge.serve.jobs import _site_preprocessing
from fedge.serve.repository import ModelRepository
from tests.serve.conftest import serving

NAMES = ["age", "stage", "grade", "size"]
INPUT_COLUMNS = ("the feature columns of data set 'risk_rows' in the order each site's "
                 "agent.toml declares them; feature_names is empty")


def _csv(path: Path) -> Path:
    rng = np.random.default_rng(5)
    rows = ["age,stage,grade,size,relapse"]
    for _ in range(40):
        rows.append(f"{rng.normal(60, 10):.1f},{rng.integers(1, 4)},{rng.integers(1, 3)},"
                    f"{rng.gamma(2.0, 10.0):.2f},{int(rng.random() < 0.4)}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _table(csv: Path, features: list[str] = NAMES) -> dict:
    return {"name": "risk_rows", "kind": "tabular", "path": str(csv), "task": "binary",
            "features": features, "target": "relapse", "seed": 4}


def _federated(tmp_path: Path, names: list[str]) -> Path:
    """As `fedge export` writes a federated job's model: names as the checkpoint has
    them (none, for every federated job), site standardisation not in the graph."""
    torch.manual_seed(1)
    out = tmp_path / f"pushed-{len(names)}.onnx"
    props = {"feature_names": json.dumps(names),
             "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1))}
    if not names:
        props["input_columns"] = INPUT_COLUMNS
    export_onnx(torch.nn.Linear(4, 1), torch.zeros(2, 4), props, out)
    return out


def test_a_model_naming_no_features_is_served_with_the_sites_names_in_order(
    tmp_path: Path,
) -> None:
    csv = _csv(tmp_path / "rows.csv")
    # the site declares its columns in another order than the file's
    site_order = ["size", "age", "grade", "stage"]
    trainer = TorchTrainer([_table(csv, site_order)])
    repo_root = tmp_path / "models"
    SiteModels(ModelRepository(repo_root), trainer.standardisation, site="h1").install(
        "risk", _federated(tmp_path, []))
    meta = read_metadata(ModelRepository(repo_root).path("risk", 1))
    assert json.loads(meta["feature_names"]) == site_order
    assert "feature_names" in meta["input_columns"] and "this site's" in meta["input_columns"]
    with serving(repo_root) as server:
        config = httpx.get(f"{server.url}/v2/models/risk/config", timeout=30).json()
    params = config["parameters"]
    assert json.loads(params["feature_names"]["string_value"]) == site_order
    assert json.loads(params["preprocessing"]["string_value"])["in_graph"] is True


@pytest.mark.parametrize(
    "names",
    [["stage", "age", "grade", "size"], ["age", "stage", "grade", "weight"]],
    ids=["same-names-other-order", "another-feature"],
)
def test_a_model_naming_other_features_than_the_sites_is_refused(
    tmp_path: Path, names: list[str]
) -> None:
    csv = _csv(tmp_path / "rows.csv")
    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, TorchTrainer([_table(csv)]).standardisation)
    with pytest.raises(ValueError, match=r"not this site's .*same names, same order"):
        models.install("risk", _federated(tmp_path, names))
    assert repo.versions("risk") == []
