"""The ONNX export's `output` metadata says what the model's output is: a logit (or
one per label) for a classifier, with the labels it stands for, a log relative risk
for a Cox model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.coordinator import checkpoint as ck
from fedge.serve.export import read_metadata
from fedge.serve.jobs import export_job

PLAN = """
[job]
dataset = "tabular"
rounds = 1
[model]
name = "{name}"
params = {{ in_features = 3{extra} }}
"""


def _export(tmp_path, name, extra="", size=4):
    weights = (np.arange(size, dtype=np.float32) - 1) / 10
    ck.save_checkpoint(ck.final_path(tmp_path, "job-m"),
                       ck.Checkpoint(weights=weights, round=1,
                                     plan=PLAN.format(name=name, extra=extra)))
    result = export_job(tmp_path, "job-m")
    return json.loads(read_metadata(result.path)["output"])


def test_a_binary_classifiers_output_is_one_logit_for_label_1(tmp_path):
    out = _export(tmp_path, "logistic")
    assert (out["kind"], out["task"], out["classes"], out["labels"]) == \
        ("logit", "binary", 2, [0, 1])
    assert "log-odds of label 1" in out["meaning"] and "sigmoid" in out["meaning"]
    assert "not known to the coordinator" in out["class_names"]


def test_a_multiclass_classifiers_output_is_one_logit_per_label(tmp_path):
    out = _export(tmp_path, "logistic", ", classes = 3", size=12)
    assert (out["kind"], out["task"], out["classes"], out["labels"]) == \
        ("logits", "multiclass", 3, [0, 1, 2])
    assert "softmax" in out["meaning"]


@pytest.mark.parametrize("name", ["cox_linear"])
def test_a_cox_models_output_is_a_log_relative_risk(tmp_path, name):
    out = _export(tmp_path, name)
    assert (out["kind"], out["task"]) == ("log relative risk", "survival")
    assert "not a probability" in out["meaning"]
