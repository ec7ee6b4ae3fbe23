"""Atomic safetensors checkpoints carry the model, the strategy state and metadata."""

from __future__ import annotations

import json
import os
import stat
import time

import numpy as np
import pytest

from fedge.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    load_checkpoint,
    model_digest,
    remove_stale_temps,
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


def test_stale_temp_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    path = round_path(tmp_path, "job-1", 3)
    save_checkpoint(path, make())
    jdir = path.parent
    start = time.time()
    hour_ago = start - 3600
    stale = [jdir / ".round-3.safetensors.tmp-4242", jdir / ".final.safetensors.tmp-7",
             # an ONNX export killed mid-way (fedge.serve.export's mkstemp names)
             jdir / ".model.onnx.81zfl3wg.tmp", jdir / ".final.onnx.a_b4c9d2.tmp"]
    kept = [jdir / ".round-4.safetensors.tmp-99",     # written after the start
            jdir / ".model.onnx.k2j4h6g8.tmp",        # an export running now (see below)
            jdir / ".round-3.safetensors.tmp-x",      # not the pattern: no pid
            jdir / "round-3.safetensors.tmp-5",       # not the pattern: no dot
            jdir / ".model.onnx.tmp",                 # not the pattern: no random part
            jdir / "model.onnx",                      # a finished export
            jdir / "notes.txt"]
    for f in stale + kept:
        f.write_bytes(b"partial")
    for f in stale + kept[2:]:
        os.utime(f, (hour_ago, hour_ago))
    for f in kept[:2]:
        os.utime(f, (start + 1, start + 1))
    (jdir / ".model.tmp-3").mkdir()  # a directory is never removed
    os.utime(jdir / ".model.tmp-3", (hour_ago, hour_ago))
    assert sorted(remove_stale_temps(tmp_path, older_than=start)) == sorted(stale)
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in kept) and (jdir / ".model.tmp-3").is_dir()
    assert load_checkpoint(path).round == 2
    assert remove_stale_temps(tmp_path / "nothing-here", older_than=start) == []


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "job" / "final.safetensors"
    target.mkdir(parents=True)
    (target / "x").write_text("a non-empty directory where the file goes")
    with pytest.raises(OSError):
        atomic_write(target, b"weights")
    assert sorted(p.name for p in target.parent.iterdir()) == ["final.safetensors"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path, monkeypatch):
    """A crash (power cut) after atomic_write returns finds the whole new file under its
    name: the data is synced before the rename makes it visible, and the directory
    after, so the rename itself survives."""
    target = tmp_path / "job" / "final.safetensors"
    data = b"weights" * 1000
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)  # a file's size when synced: all of it written by then
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(target, data)
    tmp = str(target.with_name(f".{target.name}.tmp-{os.getpid()}"))
    assert events == [("fsync", tmp, len(data)), ("replace", tmp, str(target)),
                      ("fsync", str(target.parent), None)]
    assert target.read_bytes() == data
