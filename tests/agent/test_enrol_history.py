"""`enrolment.json` holds only the last enrolment: ``enrolment-history.jsonl`` keeps
one line per enrolment installed (when, by whom, which site, console and
coordinator, and what it replaced), so a `--replace` no longer erases what this
appliance was. A refused enrolment adds nothing. Real console, real signed
enrolment files, the real `fedge agent enrol` command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.console.enrolment import EnrolmentError, create_enrolment
from fedge.console.store import ConsoleStore


def fedge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120)


def history(state: Path) -> list[dict]:
    path = state / "enrolment-history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def console(tmp_path: Path) -> ConsoleStore:
    return ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")


def enrolment_file(console: ConsoleStore, site: str, tmp_path: Path) -> Path:
    path, _ = create_enrolment(console, site, valid_for=timedelta(days=1),
                               out=tmp_path / f"{site}-{console.roster_public_key().hex()[:6]}"
                                               ".fedge-enrol")
    return path


def test_replace_keeps_what_the_appliance_was_in_its_enrolment_history(console, tmp_path):
    theirs = ConsoleStore.init(tmp_path / "theirs", coordinator_endpoint="tcp://127.0.0.1:7001")
    state = tmp_path / "state"
    r = fedge("agent", "enrol", "--state-dir", str(state), str(enrolment_file(console, "h1",
                                                                                 tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "enrolment-history.jsonl" in r.stdout
    ours_fp = json.loads((state / "enrolment.json").read_text())["console_fingerprint"]
    ours_coordinator = json.loads((state / "keys" / "coordinator.json").read_text())

    foreign = enrolment_file(theirs, "h7", tmp_path)
    key = theirs.roster_public_key().hex()[:16]
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key, str(foreign))
    assert r.returncode == 2  # refused without --replace: nothing added
    assert len(history(state)) == 1
    r = fedge("agent", "enrol", "--state-dir", str(state), "--console-key", key, "--replace",
              str(foreign))
    assert r.returncode == 0, r.stderr
    theirs_fp = json.loads((state / "enrolment.json").read_text())["console_fingerprint"]

    first, second = history(state)
    assert (first["site"], first["console_fingerprint"], first["replaced"]) == (
        "h1", ours_fp, False)
    assert first["coordinator_endpoint"] == "tcp://127.0.0.1:7000"
    assert first["coordinator_public_key"] == ours_coordinator["public_key"]
    assert first["previous"] is None and first["uid"] == os.getuid()
    assert (second["site"], second["console_fingerprint"], second["replaced"]) == (
        "h7", theirs_fp, True)
    assert second["coordinator_endpoint"] == "tcp://127.0.0.1:7001"
    assert "'h1'" in second["replaced_enrolment"]
    assert second["previous"] == {"site": "h1", "console_fingerprint": ours_fp,
                                  "coordinator_endpoint": "tcp://127.0.0.1:7000",
                                  "coordinator_public_key": ours_coordinator["public_key"]}
    assert first["time"] <= second["time"]
    assert (state / "enrolment-history.jsonl").stat().st_mode & 0o777 == 0o600


def test_each_enrolment_is_logged_and_the_same_site_again_is_no_replacement(
        console, tmp_path, caplog):
    state = tmp_path / "state"
    file = enrolment_file(console, "h1", tmp_path)
    with caplog.at_level(logging.INFO, logger="fedge.agent.enrol"):
        install_enrolment(file, state)
        install_enrolment(file, state)
    lines = history(state)
    assert [(e["site"], e["replaced"]) for e in lines] == [("h1", False), ("h1", False)]
    assert lines[1]["previous"]["site"] == "h1"
    logged = [r.getMessage() for r in caplog.records
              if r.name == "fedge.agent.enrol" and r.levelno == logging.INFO]
    assert len(logged) == 2 and all("enrolled site 'h1'" in m for m in logged)

    with pytest.raises(EnrolmentError):  # another site, no replace: refused, not noted
        install_enrolment(enrolment_file(console, "h2", tmp_path), state)
    assert len(history(state)) == 2


def test_a_torn_last_history_line_spoils_only_itself(console, tmp_path):
    state = tmp_path / "state"
    file = enrolment_file(console, "h1", tmp_path)
    install_enrolment(file, state)
    path = state / "enrolment-history.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 2])  # an append cut short
    install_enrolment(file, state)
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["site"] == "h1" and json.loads(lines[2])["site"] == "h1"
