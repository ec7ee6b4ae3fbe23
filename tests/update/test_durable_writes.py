"""Update state that must survive a power cut, and a crash's torn write read back.

- The agent's ``updates/audit.jsonl`` is fsynced on each append; a last line cut
  short (a crash mid-append) used to make ``audit_log()`` raise JSONDecodeError: it
  is skipped and logged, and the next append starts on a line of its own.
- A software slot's unpacked files and directories are fsynced before the slot is
  renamed into place, so `current` never points at a slot of empty files after a
  power cut (`switch` fsyncs only the link).

fsync is observed by wrapping the real os.fsync (it still runs) and reading which
file each descriptor is."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from fedge.agent.updates import InstallOutcome
from fedge.update.ab import SlotInstaller
from tests.update.test_self_update import bundle


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    real, seen = os.fsync, []

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def outcome(version: str) -> InstallOutcome:
    return InstallOutcome("model", "risk", version, True, False, f"risk {version} installed")


def test_an_audit_record_is_fsynced_when_appended(fleet, fsynced):
    fleet.updater.record(outcome("1"))
    assert str(fleet.agent_dir / "updates" / "audit.jsonl") in fsynced


def test_a_torn_last_audit_line_is_skipped_and_logged_and_the_next_append_is_whole(
        fleet, caplog):
    updater = fleet.updater
    updater.record(outcome("1"))
    audit = fleet.agent_dir / "updates" / "audit.jsonl"
    whole = audit.read_bytes()
    audit.write_bytes(whole + whole[: len(whole) // 2])  # a second append cut short
    with caplog.at_level(logging.WARNING, logger="fedge.agent.updates"):
        assert [r["version"] for r in updater.audit_log()] == ["1"]
    assert "line 2 is not an audit record" in caplog.text
    updater.record(outcome("2"))
    assert [r["version"] for r in updater.audit_log()] == ["1", "2"]
    assert json.loads(audit.read_bytes().splitlines()[-1])["version"] == "2"


def test_a_slots_files_and_directories_are_fsynced_before_it_is_switched_to(
        tmp_path, fsynced):
    root = tmp_path / "software"
    slots = SlotInstaller(root)
    dest = slots.unpack("1.1.0", bundle(tmp_path, "1.1.0", "good"))
    before_switch = [Path(p) for p in fsynced]
    slots.switch("1.1.0")
    # fsynced in the temporary slot (slots/.1.1.0.XXXXXXXX/...), before its rename
    unpacked = {Path(*p.relative_to(root / "slots").parts[1:]) for p in before_switch
                if p.is_relative_to(root / "slots") and p != root / "slots"}
    wanted = {p.relative_to(dest) for p in dest.rglob("*")} | {Path()}
    assert wanted >= {Path("svc.py"), Path("fedge-bundle.json"), Path()}
    assert wanted <= unpacked, wanted - unpacked
    assert root / "slots" in before_switch  # the rename itself
