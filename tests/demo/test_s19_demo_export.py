"""The demo's model.onnx says what `fedge export` says of a federated model: each site
standardises its own rows. Pushed to an appliance it then serves raw rows as training
saw them (the site's standardisation prepended), through the real installer and the
real `fedge serve`; it once said it needed no preprocessing and was served on raw
rows, its risk scores 30-60 times too large."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedge.agent.trainer import TorchTrainer
from fedge.agent.updates import SiteModels
from fedge.demo.run import DEFAULT_PLAN, SPLIT_SEED, STANDARDISE, VAL_FRACTION, _export
from fedge.demo.tcga import load_centres
from fedge.serve.export import read_metadata
from fedge.serve.repository import ModelRepository
from fedge.train.api import ModelSpec, build_model, flatten, load_flat
from tests.serve.conftest import serving

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"

pytestmark = pytest.mark.skipif(not (DATA / "brca.csv").is_file(),
                                reason=f"Fed-TCGA-BRCA not found at {DATA}")


def _demo_table(plan: dict, centre: int) -> dict:
    """Centre ``centre``'s [[datasets]] table exactly as fedge.demo.run gives its agent."""
    return {"name": plan["job"]["dataset"], "kind": "fed_tcga_brca",
            "path": str(DATA.resolve()), "site": centre, "val_fraction": VAL_FRACTION,
            "seed": SPLIT_SEED, "standardise": STANDARDISE}


def test_the_demo_model_pushed_to_a_centre_serves_its_raw_rows_as_training_saw_them(
    tmp_path: Path,
) -> None:
    plan = tomllib.loads(DEFAULT_PLAN.read_text())
    spec = ModelSpec(plan["model"]["name"], dict(plan["model"]["params"]))
    model = build_model(spec)
    flat = flatten(model)
    flat = (flat + np.random.default_rng(7).normal(0, 0.3, flat.shape)).astype(np.float32)
    load_flat(model, flat)
    model.eval()
    centres = load_centres(DATA, STANDARDISE, val_fraction=VAL_FRACTION)
    report = tmp_path / "report"
    report.mkdir()
    files = _export(report, flat, plan, "digest-x", centres)
    assert files[0] == "model.onnx"

    meta = read_metadata(report / "model.onnx")
    prep = json.loads(meta["preprocessing"])
    assert prep["kind"] == "per-site standardisation" and prep["in_graph"] is False
    assert prep["dataset"] == plan["job"]["dataset"]
    assert json.loads(meta["feature_names"]) == list(centres[0].feature_names)
    assert json.loads(meta["output"])["kind"] == "log relative risk"
    # the per-centre files have the centre's constants in the graph, and say so
    centre_meta = read_metadata(report / "model-centre-0.onnx")
    assert json.loads(centre_meta["preprocessing"])["kind"] == "standardise"
    assert json.loads(centre_meta["output"])["kind"] == "log relative risk"

    # centre 0's appliance installs the pushed model with its own data set table
    trainer = TorchTrainer([_demo_table(plan, 0)])
    repo_root = tmp_path / "models"
    version = SiteModels(ModelRepository(repo_root), trainer.standardisation,
                         site="centre-0").install("risk", report / "model.onnx")
    assert version == 1
    raw = load_centres(DATA, "none", val_fraction=VAL_FRACTION)[0].test.x[:6]
    raw = raw.astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(
            centres[0].standardiser.transform(raw).astype(np.float32))).numpy().reshape(-1)
    with serving(repo_root) as server:
        r = httpx.post(f"{server.url}/v2/models/risk/infer", timeout=30, json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": list(raw.shape),
                        "data": raw.reshape(-1).tolist()}]})
        assert r.status_code == 200, r.text
        got = np.array(r.json()["outputs"][0]["data"], dtype=np.float64)
        config = httpx.get(f"{server.url}/v2/models/risk/config", timeout=30).json()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    served_prep = json.loads(config["parameters"]["preprocessing"]["string_value"])
    assert served_prep["in_graph"] is True and served_prep["site"] == "centre-0"
