"""The agent unit's start limit leaves room for preflight to roll a broken software
update back: systemd gives up on a unit that starts more than StartLimitBurst times
within StartLimitIntervalSec, and a slot that never confirms needs its trial starts
plus the one that rolls it back (tests/update/test_self_update.py plays that
sequence)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from fedge.update import ab

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "fedge-agent.service"
# Starts in the same window besides the roll-back's own: the agent that staged the
# update, and a crash or a restart (the site reconnecting) shortly before.
OTHER_STARTS = 3


def unit_section(text: str, section: str) -> dict[str, str]:
    """`section`'s settings (the last of each key), comments left out."""
    found: dict[str, str] = {}
    here = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            here = line.strip("[]")
        elif here == section and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            found[key] = value
    return found


def starts_to_roll_back() -> int:
    """The starts preflight needs to roll a slot that never confirms back: its trial
    starts (the unit's --max-attempts, else the code's default) and one more."""
    pre = shlex.split(unit_section(UNIT.read_text(), "Service")["ExecStartPre"])
    assert pre[1:4] == ["-m", "fedge.update.ab", "preflight"], pre
    trials = int(pre[pre.index("--max-attempts") + 1]) if "--max-attempts" in pre \
        else ab.TRIAL_STARTS
    assert ab.SelfUpdate.__init__.__kwdefaults__["max_attempts"] == ab.TRIAL_STARTS
    return trials + 1


def test_the_agent_units_start_limit_leaves_room_for_a_roll_back():
    unit = unit_section(UNIT.read_text(), "Unit")
    burst = int(unit["StartLimitBurst"])
    assert re.fullmatch(r"\d+min", unit["StartLimitIntervalSec"])
    assert starts_to_roll_back() == 4
    assert burst >= starts_to_roll_back() + OTHER_STARTS, (
        f"StartLimitBurst={burst}: a broken update needs {starts_to_roll_back()} starts "
        f"to be rolled back, and {OTHER_STARTS} others may fall in the same window")
