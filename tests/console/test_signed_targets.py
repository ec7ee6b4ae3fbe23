"""What the console signs: the newest target of each lineage, not every one pushed.

An appliance installs only the newest signed version of a lineage, and only above
what it has installed (`fedge.agent.updates.AgentUpdater.refusal`), so an older
target is of no use to any appliance; listing it only made every push re-sign,
and the coordinator keep, all that was ever pushed."""

from __future__ import annotations

import pytest

from fedge.console.store import ConsoleError
from fedge.update import tuf_repo


def _listed(targets: bytes) -> list[str]:
    return sorted(tuf_repo.load(targets, "targets").signed.targets)


def test_each_push_lists_only_the_newest_of_each_lineage(console):
    for version in ("1", "2", "3"):
        console.sign_targets([("model", "risk", version, "model.onnx", f"r{version}".encode())])
        console.sign_targets([("app", "cox", version, "app.tar.gz", f"c{version}".encode())])
    targets, files = console.sign_targets([("model", "risk", "10", "model.onnx", b"r10")])
    assert list(files) == ["model/risk/10/model.onnx"]
    assert _listed(targets) == ["app/cox/3/app.tar.gz", "model/risk/10/model.onnx"]
    assert tuf_repo.load(targets, "targets").signed.version == 8


def test_all_software_is_one_lineage(console):
    """A software target under another name (a console before names were checked)
    is replaced by the next software, whatever its name."""
    console.sign_targets([("software", "fedge-agent", "2.0.0", "a.tar.gz", b"a")])
    targets, _ = console.sign_targets([("software", "fedge", "2.1", "f.tar.gz", b"f")])
    assert _listed(targets) == ["software/fedge/2.1/f.tar.gz"]


def test_an_older_version_than_the_newest_signed_is_refused_and_nothing_signed(console):
    console.sign_targets([("model", "risk", "2.0", "model.onnx", b"two")])
    before = console.targets_bytes()
    with pytest.raises(ConsoleError, match=r"model risk 1\.9 is older than the signed model "
                                           r"risk 2\.0 \('model/risk/2\.0/model\.onnx'\).*"
                                           r"publish a version above 2\.0"):
        console.sign_targets([("model", "risk", "1.9", "model.onnx", b"old")])
    with pytest.raises(ConsoleError, match=r"software fedge 1\.0 is older than the signed "
                                           r"software fedge-agent 3"):
        console.sign_targets([("software", "fedge-agent", "3", "a.tar.gz", b"a"),
                              ("software", "fedge", "1.0", "f.tar.gz", b"f")])
    assert console.targets_bytes() == before


def test_the_newest_may_be_signed_again_but_not_with_other_content_or_under_another_path(
        console):
    console.sign_targets([("model", "risk", "2", "model.onnx", b"two")])
    targets, files = console.sign_targets([("model", "risk", "2", "model.onnx", b"two")])
    assert _listed(targets) == ["model/risk/2/model.onnx"] and list(files) == _listed(targets)
    with pytest.raises(ConsoleError, match=r"risk 2 was already signed as "
                                           r"'model/risk/2/model\.onnx' with other content"):
        console.sign_targets([("model", "risk", "2", "model.onnx", b"other")])
    with pytest.raises(ConsoleError, match=r"model risk 2\.0 was already signed as "
                                           r"'model/risk/2/model\.onnx'; publish a new"):
        console.sign_targets([("model", "risk", "2.0", "model.onnx", b"two")])  # same version


def test_targets_of_an_earlier_console_are_trimmed_at_the_next_signing(console):
    """An earlier console listed every version; the next push, and an offline key
    rotation, sign the newest of each lineage only. What is not a fedge target is
    left as it is."""
    from tuf.api.metadata import TargetFile

    current = tuf_repo.load(console.targets_bytes(), "targets")
    every = {tf.path: tf for tf in (
        tuf_repo.new_target_file("model", "risk", v, "model.onnx", v.encode())
        for v in ("1", "2", "3"))}
    foreign = TargetFile.from_data("notes/readme.txt", b"hello", ["sha256"])
    every[foreign.path] = foreign
    console.save_targets(tuf_repo.to_bytes(tuf_repo.create_targets(
        console.tuf_key("targets"), every, version=current.signed.version + 1,
        now=console.clock())))
    _, rotated, _ = console.rotate_offline_keys(["targets"], persist=False)
    assert _listed(rotated) == ["model/risk/3/model.onnx", "notes/readme.txt"]
    targets, _ = console.sign_targets([("app", "cox", "1", "app.tar.gz", b"c")])
    assert _listed(targets) == ["app/cox/1/app.tar.gz", "model/risk/3/model.onnx",
                                "notes/readme.txt"]
