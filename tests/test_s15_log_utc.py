"""A hand-run daemon's log lines (stderr, no journald) carry UTC time stamps with a 'Z',
as the ledger, the audit and the enrolment times do, whatever the host's time zone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOG_ONE_LINE = """
from fedge.systemd import setup_logging
setup_logging("fedge-agent", environ={}).info("a line")
"""


def test_hand_run_log_lines_are_stamped_in_utc_with_a_z() -> None:
    env = {**os.environ, "TZ": "Asia/Kolkata", "PYTHONPATH": str(REPO)}  # UTC+05:30
    env.pop("INVOCATION_ID", None)
    before = datetime.now(UTC)
    proc = subprocess.run([sys.executable, "-c", LOG_ONE_LINE], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    after = datetime.now(UTC)
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z fedge-agent\[\d+\] INFO "
                 r"fedge-agent: a line$", line)
    assert m, line
    stamp = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC)
    assert before.replace(microsecond=0) <= stamp.replace(microsecond=0) <= after, line
