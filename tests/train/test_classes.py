"""A model is trained and evaluated only on data whose classes its output can tell apart."""

from __future__ import annotations

from pathlib import Path

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


def _site(tmp_path: Path, task: str, labels: int):  # type: ignore[no-untyped-def]
    p = tmp_path / "rows.csv"
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % labels}\n" for i in range(30)))
    return load_site_data(DatasetSpec(name="rows", kind="tabular", path=str(p), task=task,
                                      features=("a", "b"), target="y"))


def _both(spec: ModelSpec, data) -> list[str]:  # type: ignore[no-untyped-def]
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


def test_more_classes_at_the_site_than_the_model_has_is_refused_with_both_numbers(
        tmp_path: Path) -> None:
    data = _site(tmp_path, "multiclass", 5)
    for spec, param in ((ModelSpec("logistic", {"in_features": 2, "classes": 3}),
                         "model.params.classes = 3"),
                        (ModelSpec("mlp", {"in_features": 2, "out_features": 4}),
                         "model.params.out_features = 4")):
        for msg in _both(spec, data):
            assert msg.startswith("data set 'rows' has 5 classes at this site (labels 0..4) "
                                  f"but model '{spec.name}' has ")
            assert param in msg


def test_binary_data_needs_a_one_logit_model(tmp_path: Path) -> None:
    data = _site(tmp_path, "binary", 2)
    for msg in _both(ModelSpec("logistic", {"in_features": 2, "classes": 3}), data):
        assert "is binary (labels 0/1)" in msg and "classes = 2" in msg
    for msg in _both(ModelSpec("mlp", {"in_features": 2, "out_features": 2}), data):
        assert "is binary" in msg and "out_features = 1" in msg


def test_multiclass_data_needs_one_logit_per_class(tmp_path: Path) -> None:
    data = _site(tmp_path, "multiclass", 2)
    for msg in _both(ModelSpec("mlp", {"in_features": 2, "out_features": 1}), data):
        assert "is multiclass" in msg and "one logit (binary)" in msg
        assert "out_features >= 2" in msg


def test_two_classes_declared_multiclass_are_told_to_declare_binary(tmp_path: Path) -> None:
    """A model's classes = 2 always builds one logit, so "give it one output per class"
    (the old advice) could not be followed: the fix is the data set's task."""
    data = _site(tmp_path, "multiclass", 2)
    for msg in _both(ModelSpec("logistic", {"in_features": 2, "classes": 2}), data):
        assert "is multiclass (2 classes at this site)" in msg
        assert "model.params.classes = 2, which builds one logit (binary)" in msg
        assert 'declare the data set task = "binary"' in msg and "classes >= 3" in msg
        assert "one output per class" not in msg


def test_two_image_classes_declared_multiclass_are_told_to_declare_binary(
        tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    for name in ("benign", "malignant"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    data = load_site_data(DatasetSpec.from_config({
        "name": "scans", "kind": "images", "path": str(tmp_path), "task": "multiclass",
        "classes": ["benign", "malignant"], "val_fraction": 0.0, "image_size": 16}))
    spec = ModelSpec("resnet_small", {"in_channels": 1, "classes": 2, "width": 4})
    with pytest.raises(ValueError) as err:
        local_train(spec, flatten(build_model(spec)), data,
                    TrainConfig(steps=1, batch_size=2), round=1)
    assert 'declare the data set task = "binary"' in str(err.value)
    assert "one output per class" not in str(err.value)


def test_a_site_with_fewer_classes_than_the_model_trains_and_evaluates(
        tmp_path: Path) -> None:
    data = _site(tmp_path, "multiclass", 3)
    spec = ModelSpec("logistic", {"in_features": 2, "classes": 5})
    out = local_train(spec, flatten(build_model(spec)), data,
                      TrainConfig(steps=2, batch_size=8), round=0)
    assert 0.0 <= evaluate(spec, out.weights, data, "val").metrics["accuracy"] <= 1.0
    binary = _site(tmp_path, "binary", 2)
    spec = ModelSpec("logistic", {"in_features": 2})
    assert evaluate(spec, flatten(build_model(spec)), binary, "val").n_examples > 0


def test_the_agent_refuses_the_evaluation_with_the_reason(tmp_path: Path) -> None:
    """Was an IndexError, which the agent's evaluation path did not catch: the
    coordinator heard nothing until its deadline."""
    from fedge.agent.trainer import TaskRefusal, TorchTrainer
    from fedge.coordinator.plan import parse_plan

    p = tmp_path / "rows.csv"
    p.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 5}\n" for i in range(30)))
    trainer = TorchTrainer([{"name": "rows", "kind": "tabular", "path": str(p),
                             "task": "multiclass", "features": ["a", "b"], "target": "y"}])
    plan = parse_plan('[job]\ndataset = "rows"\nrounds = 1\n'
                      '[model]\nname = "logistic"\nparams = { in_features = 2, classes = 3 }\n'
                      '[train]\nsteps = 1\nbatch_size = 8\nlearning_rate = 0.1\n'
                      '[strategy]\nname = "fedavg"\n')
    spec = ModelSpec("logistic", {"in_features": 2, "classes": 3})
    with pytest.raises(TaskRefusal, match="has 5 classes at this site") as err:
        trainer.evaluate(plan, flatten(build_model(spec)), "val")
    assert "IndexError" not in str(err.value)
