"""`fedge agent enrol` sets up logging as `fedge agent run` does (journald under
systemd, else stderr): its INFO line naming the site, console, coordinator and who
enrolled it is part of the appliance's audit trail, and without a handler it went
nowhere. The real command in a subprocess, a real console and signed file."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore


def test_the_enrolment_info_line_is_logged_outside_systemd_on_stderr(tmp_path: Path) -> None:
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:7000")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=tmp_path / "h1.fedge-enrol")
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM")}
    r = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", "--state-dir",
                        str(state), str(file)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    logged = [line for line in r.stderr.splitlines()
              if " INFO fedge.agent.enrol: enrolled site 'h1'" in line]
    assert len(logged) == 1, r.stderr
    assert " fedge-agent[" in logged[0]  # the daemon name, as the agent's own lines
    assert f"by uid {os.getuid()}" in logged[0]
    assert f"history in {state / 'enrolment-history.jsonl'}" in logged[0]
