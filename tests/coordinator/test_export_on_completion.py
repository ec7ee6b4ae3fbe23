"""A finished job's model is exported to ONNX by a child process (`fedge export`),
and the outcome, good or bad, is in the audit log; a failed export loses nothing."""

from __future__ import annotations

import asyncio

import numpy as np

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.process import export_final_model
from fedge.coordinator.service import Coordinator

PLAN = """
[job]
dataset = "brca"
rounds = 1
[model]
name = "cox_linear"
params = { in_features = 4 }
[train]
steps = 1
batch_size = 4
learning_rate = 0.1
[strategy]
name = "fedavg"
"""


def test_export_failure_is_audited_and_the_checkpoint_stays(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    final = ck.final_path(tmp_path, "job-x")
    final.parent.mkdir(parents=True)
    final.write_bytes(b"not a safetensors file")
    ok = asyncio.run(export_final_model(coord, "job-x", timeout_s=120))
    assert ok is False
    (entry,) = coord.store.audit_log(action="model_export_failed")
    assert "job-x" in str(entry["detail"]) and "safetensors" in str(entry["detail"])
    assert final.read_bytes() == b"not a safetensors file"
    assert not final.with_name("model.onnx").exists()
    coord.close()


def test_export_success_writes_the_onnx_beside_the_checkpoint(tmp_path):
    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    weights = np.arange(5, dtype=np.float32) / 10
    ck.save_checkpoint(ck.final_path(tmp_path, "job-y"),
                       ck.Checkpoint(weights=weights, round=1, plan=PLAN))
    assert asyncio.run(export_final_model(coord, "job-y", timeout_s=120)) is True
    assert coord.store.audit_log(action="model_exported")
    assert ck.final_path(tmp_path, "job-y").with_name("model.onnx").stat().st_size > 0
    coord.close()


IMAGE_PLAN = """
[job]
dataset = "scans"
rounds = 1
[model]
name = "resnet_small"
params = { classes = 2, width = 8 }
"""


def test_an_image_model_is_exported_at_job_end(tmp_path):
    # the input shape comes from the model registry (1x64x64), not a Linear layer's width
    from fedge.train.api import ModelSpec, build_model, flatten

    coord = Coordinator(tmp_path, initial_weights=lambda plan: np.zeros(5, np.float32))
    weights = flatten(build_model(ModelSpec("resnet_small", {"classes": 2, "width": 8})))
    ck.save_checkpoint(ck.final_path(tmp_path, "job-cnn"),
                       ck.Checkpoint(weights=weights, round=1, plan=IMAGE_PLAN))
    assert asyncio.run(export_final_model(coord, "job-cnn", timeout_s=120)) is True
    assert coord.store.audit_log(action="model_exported")
    assert not coord.store.audit_log(action="model_export_failed")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(ck.final_path(tmp_path, "job-cnn").with_name("model.onnx")),
                                providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == [1, 64, 64]
    coord.close()
