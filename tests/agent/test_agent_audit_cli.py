"""`fedge agent audit`: what a DPO or security officer reads of the appliance's own
audit trail. Every update outcome (updates/audit.jsonl and its rotated .1, oldest
first: time, roll-out, what, ok/refused, who signed it, detail) and every
enrolment installed (enrolment-history.jsonl). Lines an earlier release wrote show
'-' for what they lack, a torn line is shown as unreadable, --since filters, and
the command writes nothing. The real command in a subprocess; the records written
by the product's own writers (AgentUpdater.record, install_enrolment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.agent.updates import AgentUpdater, InstallOutcome
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

KEY_ID = "0123456789abcdef" * 4
OLD_LINE = {"time": "2020-01-02T03:04:05+00:00", "kind": "model", "name": "risk",
            "version": "1", "ok": True, "rolled_back": False, "detail": "installed"}


def audit(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "audit", *argv],
                          capture_output=True, text=True, timeout=120)


def tree(state: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(state)): (p.read_bytes() if p.is_file() else b"",
                                        p.stat().st_mtime_ns)
            for p in sorted(state.rglob("*"))}


def r_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """An enrolled appliance with: a rotated audit file holding a line of an earlier
    release, an install and a refusal written by the agent's updater, a torn last
    line, and two enrolments."""
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "state"
    install_enrolment(file, state)
    install_enrolment(file, state)
    (state / "updates").mkdir()
    (state / "updates" / "audit.jsonl.1").write_text(json.dumps(OLD_LINE) + "\n")
    updater = AgentUpdater(state)
    updater.record(InstallOutcome("model", "risk", "4", True, False, "installed"),
                   rollout_id="r1", path="model/risk/4/model.onnx", sha256="ab" * 32,
                   signers={"targets_version": 3, "targets_signed_by": [KEY_ID],
                            "root_version": 1})
    updater.record(InstallOutcome("software", "fedge", "1.0.0", False, False,
                                  "older than the installed 1.2.0"),
                   rollout_id="r2", path="software/fedge/1.0.0/fedge.tar", sha256="",
                   signers=None)
    with open(state / "updates" / "audit.jsonl", "a") as f:
        f.write('{"time": "2026-')  # an append cut short
    return state


def test_the_trail_is_shown_oldest_first_with_dashes_for_what_old_lines_lack(state):
    before = tree(state)
    r = audit("--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head = lines.index(next(x for x in lines if x.startswith("update outcomes")))
    assert str(state / "updates" / "audit.jsonl.1") in lines[head]
    rows = lines[head + 2:head + 6]
    assert rows[0].split()[:7] == ["2020-01-02", "03:04:05", "-", "model", "risk", "1", "ok"]
    assert rows[0].split()[7:] == ["-", "installed"]  # not signed as far as it says
    assert rows[1].split()[2:] == ["r1", "model", "risk", "4", "ok", "targets", "v3", "root",
                                   "v1", KEY_ID[:16], "installed"]
    assert rows[2].split()[2:] == ["r2", "software", "fedge", "1.0.0", "refused", "-",
                                   "older", "than", "the", "installed", "1.2.0"]
    assert rows[3].split()[:5] == ["-", "-", "-", "unreadable", "-"]
    assert "audit.jsonl line 3 is not a record" in rows[3]
    enrol = lines.index(next(x for x in lines if x.startswith("enrolments")))
    assert str(state / "enrolment-history.jsonl") in lines[enrol]
    first, second = lines[enrol + 2:enrol + 4]
    assert first.split()[2:5] == [r_user(), "h1",
                                  json.loads((state / "enrolment.json").read_text())
                                  ["console_fingerprint"]]
    assert "tcp://127.0.0.1:7000" in first and first.split()[-1] == "no"
    assert second.split()[3] == "h1"
    assert tree(state) == before  # read only


def test_json_gives_every_field_null_where_a_line_lacks_it_and_since_filters(state, tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    r = audit("--config", str(cfg), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    records = doc["updates"]["records"]
    assert [x["rollout_id"] for x in records] == [None, "r1", "r2", None]
    assert records[0]["targets_signed_by"] is None and records[0]["version"] == "1"
    assert records[1]["targets_signed_by"] == [KEY_ID] and records[1]["sha256"] == "ab" * 32
    assert records[2]["ok"] is False
    assert "unreadable" in records[3] and records[3]["time"] is None
    assert [x["site"] for x in doc["enrolments"]["records"]] == ["h1", "h1"]
    assert doc["enrolments"]["records"][1]["previous"]["site"] == "h1"

    r = audit("--state-dir", str(state), "--json", "--since", "2021-01-01")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["since"] == "2021-01-01T00:00:00+00:00"
    # the 2020 line is left out; the torn one, which has no date, is kept
    assert [x["rollout_id"] for x in doc["updates"]["records"]] == ["r1", "r2", None]
    assert len(doc["enrolments"]["records"]) == 2
    r = audit("--state-dir", str(state), "--since", "yesterday")
    assert r.returncode == 2 and "'yesterday' is not a date" in r.stderr


def test_an_unreadable_file_is_named_and_a_state_dir_without_records_refused(state, tmp_path):
    history = state / "enrolment-history.jsonl"
    history.unlink()
    history.mkdir()  # not a file: cannot be read, whoever runs this
    r = audit("--state-dir", str(state))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"fedge agent audit: {history} cannot be read: "), r.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    r = audit("--state-dir", str(empty))
    assert r.returncode == 2 and r.stdout == ""
    assert f"fedge agent audit: {empty} holds no appliance's records" in r.stderr
    assert not (empty / "updates").exists()


def test_an_appliance_enrolled_without_history_or_updates_says_so(tmp_path):
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "state"
    install_enrolment(file, state)
    (state / "enrolment-history.jsonl").unlink()  # enrolled by an earlier release
    r = audit("--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("update outcomes: none recorded")
    assert r.stdout.splitlines()[1].startswith("enrolments: none recorded")


def test_a_file_rotated_while_it_is_read_is_read_once(state):
    """The agent renames audit.jsonl to audit.jsonl.1 when it is full: one opened
    as the current file and again, renamed, as .1 is the same file, read once (here
    the two names hold one file, as they do for a moment of the rename)."""
    current, rotated = state / "updates" / "audit.jsonl", state / "updates" / "audit.jsonl.1"
    rotated.unlink()
    os.link(current, rotated)
    r = audit("--state-dir", str(state), "--json")
    assert r.returncode == 0, r.stderr
    assert [x["rollout_id"] for x in json.loads(r.stdout)["updates"]["records"]] == [
        "r1", "r2", None]
