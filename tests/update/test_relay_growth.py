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


def _files(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_ten_pushes_leave_two_versions_of_each_lineage_and_the_metadata_agents_need(
        fleet, make_onnx, tmp_path):
    """The relay keeps the newest two targets and snapshot versions, every root, and
    the target files those targets list (the newest of each lineage, and the one the
    last publish replaced): storage stays flat however many are pushed. An appliance
    ten versions behind takes the newest directly."""
    from datetime import timedelta

    from fedge.serve.repository import ModelRepository

    models = ModelRepository(tmp_path / "models")
    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    [first] = fleet.updater.pending()
    assert fleet.updater.install(first, models=models).ok
    sizes = []
    for i in range(2, 12):
        fleet.publish("model", "risk", str(i), "model.onnx", make_onnx(float(i)))
        fleet.publish("app", "cox", str(i), "app.tar.gz", os.urandom(SIZE))
        fleet.clock.now += timedelta(hours=13)  # the timestamp is re-signed in between
        assert fleet.repo.refresh_timestamp()
        sizes.append(sum(p.stat().st_size for p in _files(fleet.repo.root_dir / "targets")))
        targets = [p.relative_to(fleet.repo.root_dir / "targets").parts[:3]
                   for p in _files(fleet.repo.root_dir / "targets")]
        assert sorted(targets) == sorted([("app", "cox", str(v)) for v in (i - 1, i) if v > 1]
                                         + [("model", "risk", str(i))])
        # (cox i - 1 stays until the next publish: the last one replaced it)
        meta = [p.name for p in _files(fleet.repo.root_dir / "metadata")]
        v = fleet.repo.versions
        assert sorted(meta) == sorted([
            "1.root.json", "timestamp.json",
            f"{v['targets'] - 1}.targets.json", f"{v['targets']}.targets.json",
            f"{v['snapshot'] - 1}.snapshot.json", f"{v['snapshot']}.snapshot.json"])
    assert max(sizes[1:]) == sizes[-1]  # flat from the second push on
    [newest] = fleet.updater.pending()[1:]  # cox 11 and risk 11; risk 1 is installed
    assert newest.version == "11"
    assert fleet.updater.install(newest, models=models).ok
    assert fleet.updater.installed()["model/risk"] == "11"


def test_an_agent_that_read_the_timestamp_just_before_a_publish_finishes_its_update(
        fleet, make_onnx, tmp_path):
    """The relay removes what it replaced right after a publish; an appliance that was
    midway through its refresh then still finds the snapshot, targets and file that the
    timestamp it read names (the version before is kept)."""
    from fedge.serve.repository import ModelRepository

    fleet.publish("model", "risk", "1", "model.onnx", make_onnx(1.0))
    fleet.publish("model", "risk", "2", "model.onnx", make_onnx(2.0))
    relay_fetch, pushed = fleet.roundtrip, []

    def push_after_the_timestamp(req):
        reply = relay_fetch(req)
        if req.path == "metadata/timestamp.json" and reply.eof and not pushed:
            pushed.append(fleet.publish("model", "risk", "3", "model.onnx", make_onnx(3.0)))
        return reply

    fleet.roundtrip = push_after_the_timestamp
    [spec] = fleet.updater.pending()
    assert pushed and spec.version == "2"
    models = ModelRepository(tmp_path / "models")
    outcome = fleet.updater.install(spec, models=models)
    assert outcome.ok, outcome.detail
    assert models.path("risk", 1).read_bytes() == make_onnx(2.0)
    [spec] = fleet.updater.pending()
    assert spec.version == "3"


def test_an_agent_refreshing_while_two_publishes_remove_what_it_was_to_fetch_refreshes_again(
        fleet, make_onnx):
    """The relay keeps the two newest snapshot and targets versions: two publishes
    between an agent's reading the timestamp and its fetching the snapshot it named
    remove that snapshot. The agent refreshes once more and sees the newest."""
    fleet.publish("model", "risk", "1", "m.onnx", make_onnx(1.0))
    fetch = fleet.roundtrip
    published: list[str] = []

    def publishing_meanwhile(req):
        reply = fetch(req)
        if req.path == "metadata/timestamp.json" and reply.eof and not published:
            for version in ("2", "3"):
                fleet.publish("model", "risk", version, "m.onnx", make_onnx(float(version)))
                published.append(version)
        return reply

    fleet.roundtrip = publishing_meanwhile
    assert [s.path for s in fleet.updater.refresh()] == ["model/risk/3/m.onnx"]
    assert published == ["2", "3"]
