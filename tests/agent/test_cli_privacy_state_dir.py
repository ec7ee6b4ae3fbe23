"""`fedge agent privacy` refuses a state_dir that is no appliance's (a typo, a config
for another machine) instead of reporting epsilon 0 and "every run counted"; an
enrolled appliance that has not trained yet still shows its empty ledger. The real
CLI in a subprocess, a real enrolment."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from fedge.agent.enrol import install_enrolment
from fedge.agent.trainer import ledger_path
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore


def _privacy(tmp_path: Path, state_dir: Path) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\n')
    return subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                           "--config", str(cfg)], capture_output=True, text=True, timeout=120)


def test_a_state_dir_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    proc = _privacy(tmp_path, tmp_path / "no" / "such" / "typo")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        f"fedge agent privacy: state_dir {tmp_path / 'no' / 'such' / 'typo'} (from "
        f"{tmp_path / 'agent.toml'}) is not a directory: no appliance state is there; check "
        "state_dir in the config")


def test_a_state_dir_never_enrolled_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    proc = _privacy(tmp_path, tmp_path / "state")
    assert proc.returncode == 2
    assert "epsilon" not in proc.stdout and "counted" not in proc.stdout
    assert proc.stderr.strip() == (
        f"fedge agent privacy: state_dir {tmp_path / 'state'} (from {tmp_path / 'agent.toml'}) "
        "is not an enrolled appliance's: no enrolment.json, privacy ledger or reveal log "
        "there; check state_dir in the config (an appliance is enrolled with `fedge agent "
        "enrol FILE`)")


def test_an_enrolled_appliance_that_never_trained_shows_its_empty_ledger(
        tmp_path: Path) -> None:
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    file, _ = create_enrolment(console, "site-a", valid_for=timedelta(days=1),
                               out=tmp_path / "site-a.fedge-enrol")
    state = tmp_path / "state"
    install_enrolment(file, state)
    assert not ledger_path(state).exists()
    proc = _privacy(tmp_path, state)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["total", "(all", "jobs", "composed)", "0.0000", "nothing",
                                "released"]
