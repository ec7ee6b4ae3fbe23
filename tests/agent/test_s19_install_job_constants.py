"""A pushed model gets the standardisation its job trained with, not the data set's
newest: after a re-export of the data file, a model of a job the trainer still holds
is served with the constants of the version that job began on. A model of a job not
held gets the newest version's, and asking holds no job (a running job's state is not
pushed out of memory by an install)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from fedge.agent.trainer import TorchTrainer
from fedge.agent.updates import SiteModels
from fedge.serve.export import export_onnx, read_metadata
from fedge.serve.jobs import _site_preprocessing
from fedge.serve.repository import ModelRepository
from fedge.train.api import DatasetSpec, load_site_data

NAMES = ["age", "stage", "grade", "size"]


def _write(path: Path, seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    rows = ["age,stage,grade,size,relapse"]
    for _ in range(50):
        rows.append(f"{rng.normal(60 + shift, 10):.1f},{rng.integers(1, 4)},"
                    f"{rng.integers(1, 3)},{rng.gamma(2.0, 10.0) + shift:.2f},"
                    f"{int(rng.random() < 0.4)}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)  # a re-export, written whole and moved into place


def _table(csv: Path) -> dict:
    return {"name": "risk_rows", "kind": "tabular", "path": str(csv), "task": "binary",
            "features": NAMES, "target": "relapse", "seed": 4}


def _pushed(tmp_path: Path, job: str) -> Path:
    torch.manual_seed(2)
    out = tmp_path / f"{job}.onnx"
    export_onnx(torch.nn.Linear(4, 1), torch.zeros(2, 4), {
        "job_id": job, "feature_names": "[]",
        "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1))}, out)
    return out


def _installed_mean(repo: ModelRepository, version: int) -> list[float]:
    return json.loads(read_metadata(repo.path("risk", version))["preprocessing"])["mean"]


def test_a_model_is_served_with_its_jobs_constants_after_a_re_export(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    _write(csv, seed=1, shift=0.0)
    trained_with = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    trainer = TorchTrainer([_table(csv)])
    trainer.load_data("risk_rows", job="job-a")  # job-a begins on this version
    _write(csv, seed=2, shift=25.0)  # the hospital re-exports the data file
    newest = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    assert trained_with is not None and newest is not None
    assert not np.allclose(trained_with.mean, newest.mean, rtol=1e-3)

    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, trainer.standardisation, site="h1")
    v1 = models.install("risk", _pushed(tmp_path, "job-a"))
    np.testing.assert_allclose(_installed_mean(repo, v1), trained_with.mean, rtol=1e-6)

    # a job this trainer does not hold: the newest version's, and it is not held now
    v2 = models.install("risk", _pushed(tmp_path, "job-gone"))
    np.testing.assert_allclose(_installed_mean(repo, v2), newest.mean, rtol=1e-6)
    assert trainer.standardisation("risk_rows", job="job-a")[0].tolist() == \
        trained_with.mean.tolist()
    assert "job-gone" not in trainer._states  # an install holds no job
