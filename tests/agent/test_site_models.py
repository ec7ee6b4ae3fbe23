"""SiteModels: a pushed federated model is served on this site's raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.agent.trainer import TaskRefusal, TorchTrainer
from fedge.agent.updates import SiteModels
from fedge.serve.export import export_onnx
from fedge.serve.jobs import _site_preprocessing
from fedge.serve.repository import ModelRepository
from fedge.train.api import DatasetSpec, load_site_data
from tests.update.conftest import tiny_onnx

NAMES = ["age", "stage", "grade", "size"]


def _csv(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(1)
    rows = ["age,stage,grade,size,relapse"]
    for _ in range(n):
        age, stage, grade, size = rng.normal(60, 10), rng.integers(1, 4), rng.integers(1, 3), \
            rng.gamma(2.0, 10.0)
        rows.append(f"{age:.1f},{stage},{grade},{size:.2f},{int(rng.random() < 0.4)}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _table(csv: Path) -> dict:
    return {"name": "risk_rows", "kind": "tabular", "path": str(csv), "task": "binary",
            "features": NAMES, "target": "relapse", "seed": 4}


def _pushed_model(tmp_path: Path, names: list[str] = NAMES) -> tuple[bytes, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    out = tmp_path / "pushed.onnx"
    export_onnx(model, torch.zeros(1, 4), {
        "feature_names": json.dumps(names),
        "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1))}, out)
    return out.read_bytes(), model


def test_a_pushed_model_serves_this_sites_raw_rows_as_training_saw_them(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "rows.csv")
    trainer = TorchTrainer([_table(csv)])
    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, trainer.standardisation, site="h1")
    data, model = _pushed_model(tmp_path)
    version = models.install("risk", data)
    served = ort.InferenceSession(str(repo.path("risk", version)),
                                  providers=["CPUExecutionProvider"])
    raw = np.loadtxt(csv, delimiter=",", skiprows=1, usecols=(0, 1, 2, 3), dtype=np.float32)
    # what training fed the model: the site's rows through its own standardiser
    site = load_site_data(DatasetSpec.from_config(_table(csv)))
    assert site.standardiser is not None
    with torch.no_grad():
        expected = model(torch.from_numpy(site.standardiser.transform(raw))).numpy()
    got = served.run(None, {served.get_inputs()[0].name: raw})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    prep = json.loads(served.get_modelmeta().custom_metadata_map["preprocessing"])
    assert prep["site"] == "h1" and prep["in_graph"] is True


def test_a_model_for_a_data_set_not_held_here_is_refused_and_nothing_installed(
    tmp_path: Path,
) -> None:
    repo = ModelRepository(tmp_path / "models")
    version = repo.install("risk", tiny_onnx(2.0))
    models = SiteModels(repo, TorchTrainer([]).standardisation, site="h2")
    data, _ = _pushed_model(tmp_path)
    with pytest.raises(ValueError, match=r"data set 'risk_rows'.*does not hold"):
        models.install("risk", data)
    assert repo.versions("risk") == [version]  # the model in service keeps serving


def test_a_model_whose_features_differ_from_the_sites_is_refused(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "rows.csv")
    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, TorchTrainer([_table(csv)]).standardisation)
    data, _ = _pushed_model(tmp_path, names=["size", "grade", "stage", "age"])
    with pytest.raises(ValueError, match="not this site's"):
        models.install("risk", data)
    assert repo.versions("risk") == []


def test_an_unreadable_data_set_is_named_and_a_plain_model_goes_through_unchanged(
    tmp_path: Path,
) -> None:
    trainer = TorchTrainer([_table(tmp_path / "missing.csv")])
    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, trainer.standardisation)
    data, _ = _pushed_model(tmp_path)
    with pytest.raises(TaskRefusal, match=r"risk_rows.*cannot be loaded"):
        models.install("risk", data)
    plain = tiny_onnx(3.0)  # no per-site standardisation asked: installed byte for byte
    version = models.install("risk", plain)
    assert repo.path("risk", version).read_bytes() == plain
