"""Atomic safetensors checkpoints carry the model, the strategy state and metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    model_digest,
    round_path,
    save_checkpoint,
)


def make():
    return Checkpoint(weights=np.arange(6, dtype=np.float32), round=2, plan="[job]\n",
                      strategy_state={"m": np.ones(6)}, feature_names=["age"],
                      metrics={"cindex": 0.7})


def test_roundtrip(tmp_path):
    path = round_path(tmp_path, "job1", 2)
    digest = save_checkpoint(path, make())
    assert path.name == "round-2.safetensors"
    assert path.parent == tmp_path / "jobs" / "job1"
    back = load_checkpoint(path)
    np.testing.assert_array_equal(back.weights, np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(back.strategy_state["m"], np.ones(6))
    assert (back.round, back.plan, back.feature_names, back.metrics) == (
        2, "[job]\n", ["age"], {"cindex": 0.7})
    assert digest == back.model_digest == model_digest(back.weights)
    # no temporary files left behind
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_metadata_is_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make())
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert set(meta) == {"plan", "round", "model_digest", "feature_names", "metrics"}
    assert json.loads(meta["metrics"]) == {"cindex": 0.7}


def test_tampered_weights_detected(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, make())
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def test_missing_and_garbage(tmp_path):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "none.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(CheckpointError, match="not valid safetensors"):
        load_checkpoint(tmp_path / "g.safetensors")


def test_rejects_wrong_dtype(tmp_path):
    c = make()
    c.weights = c.weights.astype(np.float64)
    with pytest.raises(CheckpointError, match="float32"):
        save_checkpoint(tmp_path / "x.safetensors", c)
