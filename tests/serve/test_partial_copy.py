"""A model copied into the repository by hand, in place, is not served while it
is being written: a prefix of an ONNX file that ends between two fields is a
valid model (here: the graph without the export's metadata), which the server
used to serve under the new version number mid-copy. Installed (renamed into
place), a file is served at once."""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import torch

from fedge.serve.repository import ModelRepository
from fedge.serve.runtime import ModelStore


def test_the_store_waits_for_a_file_written_in_place_to_rest(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module], cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    full = cox_v2[0].read_bytes()
    stripped = onnx.load_from_string(full)
    del stripped.metadata_props[:]
    prefix = stripped.SerializeToString()
    repo = ModelRepository(tmp_path)
    repo.install("cox", cox_v1[0])
    store = ModelStore(threads=1, settle_s=1.0)
    assert store.sync(repo) == [("cox", 1)]  # installed (renamed in): at once
    target = tmp_path / "cox" / "2" / "model.onnx"
    target.parent.mkdir()
    with open(target, "wb") as copy:
        copy.write(prefix)
        copy.flush()
        assert store.sync(repo) == []  # mid-copy: its prefix is not served
        copy.write(full[len(prefix):])
    assert store.sync(repo) == []  # just written: it must rest first
    time.sleep(1.1)
    assert store.sync(repo) == [("cox", 2)]
    assert store.get("cox").metadata["job_id"] == "job-2"
