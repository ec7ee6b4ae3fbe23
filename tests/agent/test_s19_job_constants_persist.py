"""A pushed model is served with the standardisation its job trained with even after
the agent restarted: the constants are kept in the job's state on disk (kind
``standardisation``, 0600, never sent) when the job takes its version of the data set,
and read back by a new trainer over the same state directory. A data file re-exported
between training and the push does not shift the served scaling. A state directory
written before these were kept falls back to the newest version's, logged as before.

Real trainer on a real CSV, real job state directory, the real install path
(SiteModels.install into a ModelRepository) and onnxruntime."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fedge.agent.jobstate import JobStateStore
from fedge.agent.trainer import TorchTrainer
from fedge.agent.updates import SiteModels
from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import train_seed
from fedge.serve.export import export_onnx
from fedge.serve.jobs import _site_preprocessing
from fedge.serve.repository import ModelRepository
from fedge.train.api import DatasetSpec, ModelSpec, load_site_data, predict
from fedge.train.models import build_model
from fedge.train.optim import load_flat

NAMES = ["age", "stage", "grade", "size"]
SPEC = ModelSpec("logistic", {"in_features": 4, "classes": 2})
PLAN = parse_plan("""
[job]
dataset = "risk_rows"
rounds = 2
seed = 5
[model]
name = "logistic"
params = { in_features = 4, classes = 2 }
[train]
steps = 6
batch_size = 8
learning_rate = 0.3
[strategy]
name = "fedavg"
""")
# the job state kind of the constants (fedge.agent.jobstate.STANDARDISATION)
STANDARDISATION = "standardisation"
FALLBACK = "its newest version's standardisation is used"


def _write(path: Path, seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    rows = ["age,stage,grade,size,relapse"]
    for _ in range(60):
        age = rng.normal(60 + shift, 10)
        rows.append(f"{age:.1f},{rng.integers(1, 4)},{rng.integers(1, 3)},"
                    f"{rng.gamma(2.0, 10.0) + 3 * shift:.2f},{int(age > 60 + shift)}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)  # a re-export, written whole and moved into place


def _table(csv: Path) -> dict:
    return {"name": "risk_rows", "kind": "tabular", "path": str(csv), "task": "binary",
            "features": NAMES, "target": "relapse", "seed": 4}


def _train(trainer: TorchTrainer, job: str) -> np.ndarray:
    w = np.zeros(5, np.float32)
    for r in (1, 2):
        w = trainer.train("h1", job, PLAN, w, round=r, seed=train_seed(5, r, "h1")).weights
    return w


def _pushed(tmp_path: Path, job: str, weights: np.ndarray) -> Path:
    """The job's model as `fedge export` writes a federated one: the site's
    standardisation not in its graph, no feature names, the job's id."""
    model = build_model(SPEC)
    load_flat(model, weights)
    out = tmp_path / f"{job}.onnx"
    export_onnx(model, torch.zeros(2, 4), {
        "job_id": job, "feature_names": "[]",
        "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1))}, out)
    return out


def _served(repo: ModelRepository, version: int, raw: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repo.path("risk", version)),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: raw.astype(np.float32)})[0], np.float64)


def _raw_rows(csv: Path) -> np.ndarray:
    return np.loadtxt(csv, delimiter=",", skiprows=1, usecols=range(4))[:12]


def test_after_a_restart_and_a_re_export_the_model_is_served_with_its_jobs_constants(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv, state = tmp_path / "rows.csv", tmp_path / "state"
    _write(csv, seed=1, shift=0.0)
    trained_with = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    weights = _train(TorchTrainer([_table(csv)], state_dir=state), "job-a")

    # kept on disk beside the job's other state, as private as it
    kept = sorted((state / "jobs").glob(f"*.{STANDARDISATION}.npz"))
    assert len(kept) == 1
    assert {p.stat().st_mode & 0o777 for p in (state / "jobs").iterdir()} == {0o600}

    # the agent restarts (an upgrade, a reboot); the hospital then re-exports the file
    restarted = TorchTrainer([_table(csv)], state_dir=state)
    _write(csv, seed=2, shift=25.0)
    newest = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    assert trained_with is not None and newest is not None
    assert not np.allclose(trained_with.mean, newest.mean, rtol=1e-2)

    repo = ModelRepository(tmp_path / "models")
    models = SiteModels(repo, restarted.standardisation, site="h1")
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        version = models.install("risk", _pushed(tmp_path, "job-a", weights))
    assert FALLBACK not in caplog.text
    assert "kept in its job state on disk, is used; the data set's file has changed" \
        in caplog.text

    raw = _raw_rows(csv)  # rows an application sends now, raw
    as_trained = predict(SPEC, weights, trained_with.transform(raw))
    np.testing.assert_allclose(_served(repo, version, raw), as_trained, rtol=1e-4, atol=1e-5)
    # the newest constants would have served something else
    assert not np.allclose(predict(SPEC, weights, newest.transform(raw)), as_trained,
                           rtol=1e-2, atol=1e-3)
    assert "job-a" not in restarted._states  # asking holds no job


def test_a_job_that_trains_again_after_a_restart_keeps_the_constants_it_now_trains_with(
        tmp_path: Path) -> None:
    """After a restart a job takes the data set's newest version (its cursor comes from
    disk, its rows are read again): its later rounds train with the new constants, and
    those replace the kept ones."""
    csv, state = tmp_path / "rows.csv", tmp_path / "state"
    _write(csv, seed=1, shift=0.0)
    _train(TorchTrainer([_table(csv)], state_dir=state), "job-a")
    _write(csv, seed=2, shift=25.0)
    newest = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    assert newest is not None
    _train(TorchTrainer([_table(csv)], state_dir=state), "job-a")
    mean, scale, names = TorchTrainer([_table(csv)], state_dir=state).standardisation(
        "risk_rows", job="job-a")
    np.testing.assert_array_equal(mean, newest.mean)
    np.testing.assert_array_equal(scale, newest.scale)
    assert names == NAMES


def test_a_state_dir_from_before_the_constants_were_kept_falls_back_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An earlier release's state directory: the job's data cursor, no constants."""
    csv, state = tmp_path / "rows.csv", tmp_path / "state"
    _write(csv, seed=1, shift=0.0)
    weights = _train(TorchTrainer([_table(csv)], state_dir=state), "job-a")
    for kept in (state / "jobs").glob(f"*.{STANDARDISATION}.npz"):
        kept.unlink()  # as the earlier release left it
    assert list((state / "jobs").glob("*.cursors.npz"))
    _write(csv, seed=2, shift=25.0)
    newest = load_site_data(DatasetSpec.from_config(_table(csv))).standardiser
    assert newest is not None

    restarted = TorchTrainer([_table(csv)], state_dir=state)
    repo = ModelRepository(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        version = SiteModels(repo, restarted.standardisation, site="h1").install(
            "risk", _pushed(tmp_path, "job-a", weights))
    assert ("data set 'risk_rows': job job-a's version of it is not held here (the job is "
            "not one of the 8 used last since the agent started); " + FALLBACK) in caplog.text
    raw = _raw_rows(csv)
    np.testing.assert_allclose(_served(repo, version, raw),
                               predict(SPEC, weights, newest.transform(raw)),
                               rtol=1e-4, atol=1e-5)


def test_unreadable_constants_fall_back_logged_and_stay_where_they_are(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv, state = tmp_path / "rows.csv", tmp_path / "state"
    _write(csv, seed=1, shift=0.0)
    _train(TorchTrainer([_table(csv)], state_dir=state), "job-a")
    path = JobStateStore(state / "jobs").path("job-a", STANDARDISATION)
    path.write_bytes(b"not an archive")
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        found = TorchTrainer([_table(csv)], state_dir=state).standardisation(
            "risk_rows", job="job-a")
    assert found is not None
    assert f"job job-a: its standardisation constants in {path} cannot be read" in caplog.text
    assert FALLBACK in caplog.text
    assert path.read_bytes() == b"not an archive"  # a reader moves nothing


def test_the_kept_constants_are_bounded_as_the_other_job_state(tmp_path: Path) -> None:
    """One file per job, the newest ``keep`` of them (by the job trained last)."""
    from fedge.agent.jobstate import standardisations

    store = JobStateStore(tmp_path / "jobs", keep=2)
    trainer = TorchTrainer([_table(tmp_path / "rows.csv")], state_dir=tmp_path)
    trainer._job_state = store
    _write(tmp_path / "rows.csv", seed=1, shift=0.0)
    for job in ("job-1", "job-2"):
        trainer.load_data("risk_rows", job=job)
        time.sleep(0.05)  # file times move in kernel ticks
    _train(trainer, "job-1")  # job-1 trains on: marked used
    time.sleep(0.05)
    trainer.load_data("risk_rows", job="job-3")
    left = {p.name for p in (tmp_path / "jobs").glob(f"*.{STANDARDISATION}.npz")}
    assert left == {store.path(j, STANDARDISATION).name for j in ("job-1", "job-3")}
    kept = standardisations(store.load("job-3", STANDARDISATION))
    assert list(kept) == ["risk_rows"] and kept["risk_rows"].feature_names == tuple(NAMES)
