"""`fedge export --install` of a federated tabular model: it was trained on rows each
site standardised with its own constants, not in the graph, so it is installed with a
site's standardisation (--agent-config: that site's agent.toml) or not at all. It was
once installed as it came, and a server fed it raw rows without a word."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedge.coordinator.checkpoint import Checkpoint, final_path, save_checkpoint
from fedge.serve.export import read_metadata
from fedge.serve.repository import ModelRepository
from fedge.train.api import DatasetSpec, ModelSpec, build_model, flatten, load_flat, load_site_data
from tests.serve.conftest import serving

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 3

[model]
name = "cox_mlp"
params = { in_features = 39, hidden = [8] }
"""
FEATURES = [f"feature_{i}" for i in range(39)]


def _weights() -> np.ndarray:
    flat = flatten(build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]})))
    return (flat + np.random.default_rng(3).normal(0, 0.1, flat.shape)).astype(np.float32)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A coordinator state dir holding job-a's final checkpoint (no feature names, as
    the coordinator writes a federated job's)."""
    state = tmp_path / "coord"
    save_checkpoint(final_path(state, "job-a"),
                    Checkpoint(weights=_weights(), round=3, plan=PLAN, metrics={}))
    return state


def _site(tmp_path: Path) -> tuple[Path, dict]:
    """A site's agent.toml holding data set fed_tcga_brca (39 columns, a CSV)."""
    rng = np.random.default_rng(11)
    csv = tmp_path / "site" / "rows.csv"
    csv.parent.mkdir()
    x = rng.normal(50.0, 12.0, (60, 39)) * rng.uniform(0.1, 5.0, 39)
    lines = [",".join([*FEATURES, "relapse"])]
    lines += [",".join([*(f"{v:.3f}" for v in row), str(int(rng.random() < 0.4))]) for row in x]
    csv.write_text("\n".join(lines) + "\n")
    table = {"name": "fed_tcga_brca", "kind": "tabular", "path": str(csv), "task": "binary",
             "features": FEATURES, "target": "relapse", "seed": 4}
    config = tmp_path / "site" / "agent.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "site" / "state"}"\n\n[[datasets]]\n'
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    return config, table


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "export", *args],
                          capture_output=True, text=True, timeout=180)


def test_install_without_a_sites_standardisation_is_refused_naming_what_works(
    state_dir: Path, tmp_path: Path
) -> None:
    out, repo = tmp_path / "risk.onnx", tmp_path / "models"
    r = _export("--job", "job-a", "--state-dir", str(state_dir), "--out", str(out),
                "--install", str(repo), "--name", "risk")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("fedge export: not installed: model 'risk'"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    for needle in ("'fed_tcga_brca'", "raw rows give wrong outputs",
                   f"fedge console push {out} --kind model --name risk", "--agent-config"):
        assert needle in r.stderr, r.stderr
    assert out.is_file()  # the export itself is done and said so
    assert f"wrote {out}" in r.stdout
    assert ModelRepository(repo).versions("risk") == []


def test_install_with_a_sites_agent_config_serves_that_sites_raw_rows(
    state_dir: Path, tmp_path: Path
) -> None:
    config, table = _site(tmp_path)
    repo = tmp_path / "models"
    r = _export("--job", "job-a", "--state-dir", str(state_dir), "--out",
                str(tmp_path / "risk.onnx"), "--install", str(repo), "--name", "risk",
                "--agent-config", str(config))
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"installed risk version 1 in {repo}" in r.stdout
    meta = read_metadata(ModelRepository(repo).path("risk", 1))
    assert json.loads(meta["preprocessing"])["in_graph"] is True
    assert json.loads(meta["feature_names"]) == FEATURES

    site = load_site_data(DatasetSpec.from_config(table))
    assert site.standardiser is not None
    raw = np.loadtxt(table["path"], delimiter=",", skiprows=1, usecols=range(39),
                     dtype=np.float32)[:5]
    model = build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]}))
    load_flat(model, _weights())
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(
            site.standardiser.transform(raw).astype(np.float32))).numpy().reshape(-1)
    with serving(repo) as server:
        resp = httpx.post(f"{server.url}/v2/models/risk/infer", timeout=30, json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 39],
                        "data": raw.reshape(-1).tolist()}]})
    assert resp.status_code == 200, resp.text
    np.testing.assert_allclose(resp.json()["outputs"][0]["data"], want, rtol=1e-4, atol=1e-4)


def test_an_agent_config_that_does_not_hold_the_data_set_installs_nothing(
    state_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    repo = tmp_path / "models"
    r = _export("--job", "job-a", "--state-dir", str(state_dir), "--install", str(repo),
                "--name", "risk", "--agent-config", str(config))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "'risk' not installed" in r.stderr and "does not hold" in r.stderr, r.stderr
    assert ModelRepository(repo).versions("risk") == []
