"""A model trains and is evaluated only on a data set whose task its output is made for
(review s16 plan-matrix MEDIUM 1): a classifier on a regression target used to train
silently as a regression, under a name whose exported model says it outputs a logit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedge.train.api import (
    DatasetSpec,
    ModelSpec,
    TrainConfig,
    build_model,
    evaluate,
    flatten,
    load_site_data,
    local_train,
)
from fedge.train.model_names import MODEL_NAMES

N_FEATURES = 3


def _site(tmp_path: Path, task: str):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, N_FEATURES)).astype(np.float32)
    path = tmp_path / f"{task}.npz"
    if task == "survival":
        np.savez(path, x=x, event=(np.arange(40) % 2).astype(np.float32),
                 time=rng.uniform(1, 10, 40).astype(np.float32))
    elif task == "regression":
        np.savez(path, x=x, y=rng.normal(size=40).astype(np.float32))
    else:
        np.savez(path, x=x, y=(np.arange(40) % (2 if task == "binary" else 3)).astype(np.int64))
    return load_site_data(DatasetSpec(name=task, kind="numpy", path=str(path), task=task,
                                      val_fraction=0.25))


def _tabular(name: str) -> ModelSpec:
    if name == "logistic":
        return ModelSpec(name, {"in_features": N_FEATURES, "classes": 2})
    return ModelSpec(name, {"in_features": N_FEATURES})


def _errors(spec: ModelSpec, data) -> list[str]:  # type: ignore[no-untyped-def]
    """The errors of a training round and of an evaluation (each must raise)."""
    w = flatten(build_model(spec))
    errors = []
    with pytest.raises(ValueError) as err:
        local_train(spec, w, data, TrainConfig(steps=2, batch_size=8), round=0)
    errors.append(str(err.value))
    with pytest.raises(ValueError) as err:
        evaluate(spec, w, data, "val")
    errors.append(str(err.value))
    return errors


def test_a_classifier_on_a_regression_data_set_is_refused_naming_the_models_that_fit(
        tmp_path: Path) -> None:
    data = _site(tmp_path, "regression")
    for msg in _errors(_tabular("logistic"), data):
        assert msg == (
            "data set 'regression' is a regression task at this site but model 'logistic' "
            "is a classifier, whose output is logits over class labels, not a model of the "
            "target value: it would train on the wrong loss. For a regression data set use "
            "model.name = 'linear' or 'mlp'")


@pytest.mark.parametrize(("model", "task", "use"), [
    ("logistic", "survival", "'cox_linear', 'cox_mlp' or 'mlp'"),
    ("linear", "survival", "'cox_linear', 'cox_mlp' or 'mlp'"),
    ("cox_linear", "regression", "'linear' or 'mlp'"),
    ("cox_mlp", "binary", "'logistic', 'resnet_small' or 'mlp'"),
    ("cox_linear", "multiclass", "'logistic', 'resnet_small' or 'mlp'"),
])
def test_every_misfit_names_the_model_the_task_and_the_models_that_fit(
        tmp_path: Path, model: str, task: str, use: str) -> None:
    for msg in _errors(_tabular(model), _site(tmp_path, task)):
        assert msg.startswith(f"data set '{task}' is a {task} task at this site but model "
                              f"'{model}' is ")
        assert msg.endswith(f"For a {task} data set use model.name = {use}")


# Every tabular model against every task: trains (one step) where the model fits the
# task, else refused before training with the message above.
FITS = {
    "linear": {"regression", "binary"},  # on binary data its one output is the logit
    "logistic": {"binary"},
    "mlp": {"regression", "binary", "survival"},
    "cox_linear": {"survival"},
    "cox_mlp": {"survival"},
}


@pytest.mark.parametrize("task", ["regression", "binary", "survival"])
def test_the_compatibility_table_over_every_tabular_model(tmp_path: Path, task: str) -> None:
    data = _site(tmp_path, task)
    assert set(FITS) == set(MODEL_NAMES) - {"resnet_small"}  # images: test_images
    for model, tasks in FITS.items():
        spec = _tabular(model)
        w = flatten(build_model(spec))
        if task in tasks:
            out = local_train(spec, w, data, TrainConfig(steps=1, batch_size=8), round=0)
            assert np.isfinite(out.weights).all()
            evaluate(spec, out.weights, data, "val")
        else:
            for msg in _errors(spec, data):
                assert f"is a {task} task at this site but model '{model}' is " in msg
