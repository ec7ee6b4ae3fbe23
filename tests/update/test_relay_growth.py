"""What a push costs the relay as pushes accumulate: months of pushes must not make
the next one slower (it runs on the coordinator's event loop)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedge.coordinator import updates as relay

SIZE = 200_000


def _an_hour_passes(fleet) -> None:
    """Pushes are minutes or days apart, not milliseconds: date what the relay wrote
    in the last minute an hour back (the relay trusts only a file time older than
    its own look at the file, see `relay.RACY_NS`)."""
    then = time.time() - 3600
    for path in (fleet.repo.root_dir / "targets").rglob("*"):
        if path.is_file() and path.stat().st_mtime > time.time() - 60:
            os.utime(path, (then, then))


def _hashed_bytes(monkeypatch, fleet) -> list[int]:
    """Sizes of the stored targets the relay opens to read back, one entry a file."""
    seen: list[int] = []
    targets = fleet.repo.root_dir / "targets"

    def counting(file, mode="r", *args, **kwargs):
        if "r" in mode and Path(file).is_relative_to(targets):
            seen.append(Path(file).stat().st_size)
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(relay, "open", counting, raising=False)
    return seen


def test_a_push_hashes_its_own_bytes_not_every_target_stored_before(fleet, monkeypatch):
    """Ten targets of ten lineages, all listed at once: each publish reads back at most
    the previous push's file (its first look at it), never the other stored ones."""
    hashed = _hashed_bytes(monkeypatch, fleet)
    per_push = []
    for i in range(10):
        before = len(hashed)
        fleet.publish("model", f"m{i}", "1", "model.onnx", os.urandom(SIZE))
        per_push.append(sum(hashed[before:]))
        _an_hour_passes(fleet)
    assert len(fleet.repo.current_targets().signed.targets) == 10
    assert max(per_push) <= SIZE, per_push  # before: push i read i * SIZE back
    assert sum(per_push) <= 9 * SIZE


def test_a_restarted_relay_hashes_what_it_holds_once(fleet, monkeypatch):
    for i in range(3):
        fleet.publish("model", f"m{i}", "1", "model.onnx", os.urandom(SIZE))
    _an_hour_passes(fleet)
    hashed = _hashed_bytes(monkeypatch, fleet)
    fleet.repo = type(fleet.repo)(fleet.repo.root_dir.parent, clock=fleet.clock)
    fleet.publish("app", "cox", "1", "app.tar.gz", b"app")
    assert sorted(hashed) == [SIZE] * 3  # nothing known yet: each checked once
    _an_hour_passes(fleet)
    fleet.publish("app", "ward", "1", "app.tar.gz", b"ward")
    assert sorted(hashed) == [3] + [SIZE] * 3  # only cox 1, first seen an hour ago


def test_a_target_changed_in_place_is_hashed_again_and_named(make_onnx, fleet, caplog):
    """The remembered hash holds only while size, mtime and inode do: bit rot written
    in place an hour after the last look is found at the next push."""
    import logging

    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    _an_hour_passes(fleet)
    fleet.publish("model", "other", "1", "model.onnx", make_onnx(2.0))  # risk 1 remembered
    tf = fleet.repo.current_targets().signed.targets["model/risk/1/model.onnx"]
    stored = fleet.repo.root_dir / "targets" / relay.tuf_repo.hashed_path(tf)
    stored.write_bytes(b"\0" * tf.length)
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator.updates"):
        fleet.publish("app", "cox", "1", "app.tar.gz", b"app")
    assert f"stored target {tf.path} does not match" in caplog.text
