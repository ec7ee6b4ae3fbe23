"""Target names and versions are matched whole and in ASCII: no trailing newline in a
signed path, no Arabic-Indic digits in a version every appliance would then refuse.
A targets.json an older console signed with such a target is cleaned on the next push."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from tuf.api.metadata import TargetFile

from fedge.console.store import ConsoleError, ConsoleStore
from fedge.update import tuf_repo


@pytest.mark.parametrize("version", ["4\n", "\u0663", "1.\u0662", "1.2\n", "\uff14"])
def test_a_version_with_a_newline_or_non_ascii_digits_is_refused(version: str) -> None:
    with pytest.raises(ValueError, match="ASCII digits 0-9"):
        tuf_repo.target_path("model", "risk", version, "model.onnx")
    assert not tuf_repo.is_version(version)


@pytest.mark.parametrize("name", ["risk\n", "risk\u00e9", "\u0663risk"])
def test_a_name_or_file_name_with_a_newline_or_non_ascii_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="target name"):
        tuf_repo.target_path("model", name, "4", "model.onnx")
    with pytest.raises(ValueError, match="target file name"):
        tuf_repo.target_path("model", "risk", "4", name)


@pytest.mark.parametrize("version", ["4\n", "\u0663"])
def test_the_console_refuses_to_sign_such_a_version(tmp_path, version: str) -> None:
    console = ConsoleStore.init(tmp_path / "c", coordinator_endpoint="tcp://127.0.0.1:7000")
    before = console.targets_bytes()
    with pytest.raises(ConsoleError, match="ASCII digits 0-9"):
        console.sign_targets([("model", "risk", version, "model.onnx", b"onnx")])
    assert console.targets_bytes() == before


def test_a_legacy_bad_target_is_dropped_from_the_next_signed_targets(tmp_path) -> None:
    console = ConsoleStore.init(tmp_path / "c", coordinator_endpoint="tcp://127.0.0.1:7000")
    # what an older console signed for `push --version $'4\n'`
    legacy = TargetFile.from_data("model/risk/4\n/model.onnx", b"old", ["sha256"])
    legacy.unrecognized_fields["custom"] = {
        "fedge": {"kind": "model", "name": "risk", "version": "4\n"}}
    foreign = TargetFile.from_data("notes.txt", b"not fedge's", ["sha256"])
    current = tuf_repo.load(console.targets_bytes(), "targets")
    md = tuf_repo.create_targets(
        console.tuf_key("targets"), {legacy.path: legacy, foreign.path: foreign},
        version=current.signed.version + 1, now=datetime.now(UTC))
    console.save_targets(tuf_repo.to_bytes(md))

    data, _ = console.sign_targets([("model", "risk", "5", "model.onnx", b"new")])
    listed = tuf_repo.load(data, "targets").signed.targets
    assert set(listed) == {"model/risk/5/model.onnx", "notes.txt"}
    # what the coordinator checks of every listed fedge target before it publishes
    spec = tuf_repo.TargetSpec.from_target_file(listed["model/risk/5/model.onnx"])
    assert (spec.name, spec.version) == ("risk", "5")
