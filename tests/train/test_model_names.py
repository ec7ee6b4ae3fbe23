"""The torch-free list of model names is the registry fedge.train.models builds."""

from __future__ import annotations

from fedge.train import model_names, models


def test_every_listed_name_has_a_constructor_and_every_constructor_a_name():
    assert set(models.MODELS) == set(model_names.MODEL_NAMES)
    assert models.TASK_OF_MODEL is model_names.TASK_OF_MODEL
    assert set(model_names.TASK_OF_MODEL) == set(model_names.MODEL_NAMES)
    assert set(model_names.MODEL_PARAMS) == set(model_names.MODEL_NAMES)
