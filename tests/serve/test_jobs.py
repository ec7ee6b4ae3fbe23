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
from fedge.serve.runtime import load_model
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


def test_cli_exports_the_jobs_final_model_and_does_not_install_it_raw(
    state_dir: Path, tmp_path: Path
) -> None:
    """A federated tabular model installs only with a site's standardisation
    (--agent-config; tests/serve/test_s19_export_install.py): the export is written and
    the install refused."""
    out = tmp_path / "out" / "brca.onnx"
    repo = tmp_path / "models"
    proc = _run_cli("export", "--job", "job-a", "--state-dir", str(state_dir), "--out", str(out),
                    "--install", str(repo), "--name", "brca")
    assert proc.returncode == 2, proc.stderr
    assert f"wrote {out}" in proc.stdout and "not installed" in proc.stderr
    assert ModelRepository(repo).versions("brca") == []

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
    assert proc.returncode == 2
    assert "no checkpoint at" in proc.stderr and "nope" in proc.stderr


def _save_job(state_dir: Path, job: str, feature_names: list[str]) -> None:
    ckpt = Checkpoint(weights=_trained_flat(), round=3, plan=PLAN, feature_names=feature_names,
                      metrics={})
    save_checkpoint(final_path(state_dir, job), ckpt)


@pytest.mark.parametrize(
    ("args", "features", "needle"),
    [
        (["--input-shape", "5"], [],
         "model 'cox_mlp' cannot run on inputs of shape [5] per example (from --input-shape 5): "
         "mat1 and mat2 shapes cannot be multiplied"),
        ([], [f"f{i}" for i in range(10)],
         "checkpoint lists 10 feature names but the plan's model 'cox_mlp' takes inputs of "
         "shape [39] per example"),
        (["--out", "/proc/fedge-test/x.onnx"], [], "cannot write /proc/fedge-test/x.onnx: "),
    ],
    ids=["wrong-input-shape", "feature-names-of-another-model", "unwritable-out"],
)
def test_ordinary_mistakes_are_one_line_errors_not_tracebacks(
    tmp_path: Path, args: list[str], features: list[str], needle: str
) -> None:
    _save_job(tmp_path, "job-m", features)
    proc = _run_cli("export", "--job", "job-m", "--state-dir", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fedge export: ") and needle in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "jobs" / "job-m" / "model.onnx").exists()


def test_a_real_jobs_model_says_its_inputs_are_standardised_at_each_site(
    tmp_path: Path,
) -> None:
    # what the coordinator's final checkpoint holds: no feature names, no constants
    _save_job(tmp_path, "job-r", [])
    result = export_job(tmp_path, "job-r")
    served = load_model("brca", 1, result.path, threads=1).metadata  # what the server reports
    prep = json.loads(served["preprocessing"])
    assert prep["kind"] == "per-site standardisation" and prep["in_graph"] is False
    assert prep["dataset"] == "fed_tcga_brca"
    assert "serving site's own constants" in prep["input"]
    assert json.loads(served["feature_names"]) == []
    assert "fed_tcga_brca" in served["input_columns"]
    # the graph takes the standardised row as it is: no constants hidden in it
    x = np.random.default_rng(2).standard_normal((4, 39)).astype(np.float32)
    model = build_model(ModelSpec("cox_mlp", {"in_features": 39, "hidden": [8]}))
    load_flat(model, _trained_flat())
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)


RESNET_PLAN = """
[job]
dataset = "scans"
rounds = 1

[model]
name = "resnet_small"
params = { classes = 3, width = 8 }
"""


def test_a_resnet_small_job_exports_with_the_image_shape_it_was_trained_on(
    tmp_path: Path,
) -> None:
    spec = ModelSpec("resnet_small", {"classes": 3, "width": 8})
    model = build_model(spec)
    flat = flatten(model)
    flat = (flat + np.random.default_rng(5).normal(0, 0.05, flat.shape)).astype(np.float32)
    save_checkpoint(final_path(tmp_path, "job-cnn"),
                    Checkpoint(weights=flat, round=1, plan=RESNET_PLAN, metrics={}))
    result = export_job(tmp_path, "job-cnn")  # no feature names, no --input-shape
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.shape[1:] == [1, 64, 64]  # one channel, the data sets' 64x64 default
    load_flat(model, flat)
    model.eval()
    x = np.random.default_rng(1).standard_normal((3, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = sess.run(None, {inp.name: x})[0]
    assert got.shape == (3, 3)
    prep = json.loads(read_metadata(result.path)["preprocessing"])
    assert prep["kind"] == "none" and "8-bit pixel values / 255" in prep["input"]
    assert "16-bit greyscale pixel values / 65535" in prep["input"]
    assert "bicubic" in prep["input"] and "convert('L')" in prep["input"]
    assert "input_columns" not in read_metadata(result.path)  # no feature columns
    np.testing.assert_allclose(got, want, atol=1e-5)  # the export's own parity bound


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


@pytest.mark.parametrize(("name", "key", "said"), [
    ("logistic", "classes", '"classes": 5'),
    ("resnet_small", "classes", '"classes": 5'),
    ("linear", "out_features", "5 raw output(s)"),
    ("mlp", "out_features", "5 raw output(s)"),
])
def test_the_output_description_takes_a_plan_default_from_the_model_s_parameters(
    monkeypatch: pytest.MonkeyPatch, name: str, key: str, said: str
) -> None:
    # one source for a parameter's default: fedge.train.model_names.MODEL_PARAMS
    from fedge.serve.jobs import _output_description
    from fedge.train.model_names import MODEL_PARAMS, ModelParam

    monkeypatch.setitem(MODEL_PARAMS[name], key, ModelParam("integer", 5, minimum=1))
    assert said in json.dumps(_output_description(name, {"in_features": 3}))


def test_a_named_jobs_model_carries_its_name_and_an_unnamed_one_no_name(tmp_path: Path) -> None:
    """The plan's job.name, as `jobs list` shows it, is in the model's metadata, so a
    model on an appliance can be traced to the job an engineer named."""
    named = PLAN.replace('[job]\n', '[job]\nname = "brca risk, run 2"\n')
    for job_id, plan in (("job-named", named), ("job-plain", PLAN)):
        ckpt = Checkpoint(weights=_trained_flat(), round=3, plan=plan, feature_names=FEATURES)
        save_checkpoint(final_path(tmp_path, job_id), ckpt)
        export_job(tmp_path, job_id)
    assert read_metadata(final_path(tmp_path, "job-named").with_name("model.onnx"))[
        "job_name"] == "brca risk, run 2"
    assert "job_name" not in read_metadata(
        final_path(tmp_path, "job-plain").with_name("model.onnx"))


def test_a_linear_model_trained_on_labels_is_not_described_as_a_regression_value(
        tmp_path: Path) -> None:
    # planmatrix s16: "linear" trains on binary and multiclass data sets too (a logit
    # under cross-entropy), and its exported metadata said kind "value", task
    # "regression": whoever serves it would never apply the sigmoid
    plan = PLAN.replace('name = "cox_mlp"', 'name = "linear"').replace(
        ", hidden = [8]", "")
    model = build_model(ModelSpec("linear", {"in_features": 39}))
    ckpt = Checkpoint(weights=flatten(model).astype(np.float32), round=3, plan=plan,
                      feature_names=FEATURES)
    save_checkpoint(final_path(tmp_path, "job-l"), ckpt)
    export_job(tmp_path, "job-l")
    output = json.loads(read_metadata(final_path(tmp_path, "job-l").with_name("model.onnx"))[
        "output"])
    assert output["kind"] == "raw" and output["task"] == "as the data set declares it"
    assert "log-odds of label 1 (sigmoid gives its probability)" in output["meaning"]
    assert "for a regression data set the predicted value(s)" in output["meaning"]
    assert "survival" not in output["meaning"]  # linear is not a Cox model
    from fedge.serve.jobs import _output_description

    mlp = json.dumps(_output_description("mlp", {"in_features": 3}))
    assert "for a survival data set the Cox model's linear predictor" in mlp
