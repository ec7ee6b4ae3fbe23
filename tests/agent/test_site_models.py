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


def _scans(root: Path, classes: list[str]) -> dict:
    from PIL import Image

    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((8, 8), 30 * i + j, np.uint8)).save(root / name / f"{j}.png")
    return {"name": "scans", "kind": "images", "path": str(root), "classes": classes,
            "task": "binary" if len(classes) == 2 else "multiclass", "image_size": 8}


def _pushed_classifier(tmp_path: Path, k: int) -> tuple[bytes, torch.nn.Module]:
    from fedge.serve.jobs import _output_description

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1 if k == 2 else k))
    out = tmp_path / f"scans{k}.onnx"
    export_onnx(model, torch.zeros(1, 1, 8, 8), {
        "output": json.dumps(_output_description("resnet_small", {"classes": k})),
        "preprocessing": json.dumps(_site_preprocessing("scans", 3))}, out)
    return out.read_bytes(), model


@pytest.mark.parametrize("classes", [["benign", "malignant"], ["normal", "benign", "malignant"]])
def test_a_pushed_image_classifier_is_served_with_this_sites_class_names(
    tmp_path: Path, classes: list[str],
) -> None:
    """The coordinator numbers the labels; the site names them, from its declared
    classes, in the metadata `fedge serve` shows; the graph is the one pushed."""
    trainer = TorchTrainer([_scans(tmp_path / "scans", classes)])
    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, trainer.standardisation, site="h1", classes=trainer.class_names)
    data, model = _pushed_classifier(tmp_path, len(classes))
    version = models.install("tumour", data)
    served = ort.InferenceSession(str(repo.path("tumour", version)),
                                  providers=["CPUExecutionProvider"])
    out = json.loads(served.get_modelmeta().custom_metadata_map["output"])
    assert out["class_names"] == classes and "h1" in out["class_names_from"]
    assert repr(classes[-1]) in out["meaning"]
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = served.run(None, {served.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_class_names_are_left_out_where_they_do_not_fit_the_output(tmp_path: Path) -> None:
    """Three logits, two classes at this site: installed, labels numbered as pushed;
    a site without the data set installs it unnamed too."""
    trainer = TorchTrainer([_scans(tmp_path / "scans", ["benign", "malignant"])])
    for site_trainer in (trainer, TorchTrainer([])):
        repo = ModelRepository(tmp_path / f"models{id(site_trainer)}")
        models = SiteModels(repo, site_trainer.standardisation, site="h1",
                            classes=site_trainer.class_names)
        data, _ = _pushed_classifier(tmp_path, 3)
        version = models.install("tumour", data)
        meta = ort.InferenceSession(str(repo.path("tumour", version)),
                                    providers=["CPUExecutionProvider"]).get_modelmeta()
        out = json.loads(meta.custom_metadata_map["output"])
        assert out["labels"] == [0, 1, 2] and isinstance(out["class_names"], str)
