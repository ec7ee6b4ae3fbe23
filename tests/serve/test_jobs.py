"""`fedge export --job`: from the coordinator's final checkpoint to a checked ONNX file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.coordinator.checkpoint import Checkpoint, final_path, save_checkpoint
from fedge.serve.export import read_metadata
from fedge.serve.jobs import CheckpointError, export_job
from fedge.serve.repository import ModelRepository
from fedge.train.api import ModelSpec, build_model, flatten, load_flat

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 3

[model]
name = "cox_mlp"
params = { in_features = 39, hidden = [8] }
"""
FEATURES = [f"feature_{i}" for i in range(39)]


def _trained_flat() -> np.ndarray:
    model = build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]}))
    flat = flatten(model)
    return (flat + np.random.default_rng(3).normal(0, 0.1, flat.shape)).astype(np.float32)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    ckpt = Checkpoint(weights=_trained_flat(), round=3, plan=PLAN, feature_names=FEATURES,
                      metrics={"c_index": 0.71})
    save_checkpoint(final_path(tmp_path, "job-a"), ckpt)
    return tmp_path


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_exports_and_installs_the_jobs_final_model(state_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "brca.onnx"
    repo = tmp_path / "models"
    proc = _run_cli("export", "--job", "job-a", "--state-dir", str(state_dir), "--out", str(out),
                    "--install", str(repo), "--name", "brca")
    assert proc.returncode == 0, proc.stderr
    assert "installed brca version 1" in proc.stdout
    assert ModelRepository(repo).versions("brca") == [1]

    meta = read_metadata(out)
    flat = _trained_flat()
    assert meta["job_id"] == "job-a" and meta["round"] == "3"
    assert meta["model_digest"] == hashlib.sha256(flat.tobytes()).hexdigest()
    assert json.loads(meta["feature_names"]) == FEATURES
    assert json.loads(meta["metrics"]) == {"c_index": 0.71}
    assert float(meta["parity_max_abs_diff"]) <= 1e-5

    model = build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]}))
    load_flat(model, flat)
    model.eval()
    x = np.random.default_rng(0).standard_normal((9, 39)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)


def test_default_output_sits_beside_the_checkpoint(state_dir: Path) -> None:
    result = export_job(state_dir, "job-a")
    assert result.path == state_dir / "jobs" / "job-a" / "model.onnx"
    assert result.path.is_file()


def test_missing_job_is_a_clear_cli_error(tmp_path: Path) -> None:
    proc = _run_cli("export", "--job", "nope", "--state-dir", str(tmp_path))
    assert proc.returncode == 1
    assert "no checkpoint at" in proc.stderr and "nope" in proc.stderr


def test_corrupted_weights_are_refused(state_dir: Path) -> None:
    path = final_path(state_dir, "job-a")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # flip a bit inside the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the recorded model_digest"):
        export_job(state_dir, "job-a")
    assert not (path.parent / "model.onnx").exists()


def test_job_ids_cannot_escape_the_state_dir(state_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"job id '\.\./x' must match"):
        export_job(state_dir, "../x")
