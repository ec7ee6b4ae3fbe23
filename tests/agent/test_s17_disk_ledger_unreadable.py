"""A privacy ledger that the agent's user cannot read (privacy/ or ledger.json left
by a `sudo fedge agent run` by hand, a restore with the wrong owner) killed the agent
at start with a raw PermissionError traceback (TorchTrainer's PrivacyLedger.load).
Now `PrivacyLedger.load` raises LedgerUnreadable, a ValueError naming the file, the
user and the chown, which `fedge agent run` and `fedge agent privacy` print in one
line. A missing ledger is still an empty one; an unreadable one is never read as
empty (the budget spent would be forgotten).

As root, the process that meets the files runs with CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH dropped (setpriv), so that mode bits bind it as they bind the
service user; as any other user, chmod does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.agent.test_s17_disk_round_dirs import as_service_user

LOAD = r'''
import sys
from fedge.train.accounting import PrivacyLedger
try:
    PrivacyLedger.load(sys.argv[1])
except ValueError as exc:
    print(type(exc).__name__, exc)
'''


@pytest.mark.parametrize("case", ["directory 0700 of another user", "file 0000"])
def test_a_ledger_that_cannot_be_read_is_named_with_the_chown(tmp_path: Path,
                                                              case: str) -> None:
    """`fedge agent run` and `fedge agent privacy` print a ValueError in one line; a
    PermissionError was a traceback (trainer.py's PrivacyLedger.load at start)."""
    from fedge.train.accounting import PrivacyLedger

    privacy = tmp_path / "state" / "privacy"
    privacy.mkdir(parents=True)
    ledger = privacy / "ledger.json"
    PrivacyLedger().save(ledger)
    locked = privacy if case.startswith("directory") else ledger
    locked.chmod(0o000)
    try:
        done = as_service_user(LOAD, str(ledger))
    finally:
        locked.chmod(0o700)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    user = "root" if os.geteuid() == 0 else __import__("pwd").getpwuid(os.geteuid()).pw_name
    assert done.stdout == (f"LedgerUnreadable privacy ledger {ledger} cannot be read as user "
                           f"{user}: Permission denied; it and its directory must belong to "
                           f"the user the agent runs as (e.g. chown -R fedge: {privacy})\n")


def test_a_missing_ledger_is_still_an_empty_one(tmp_path: Path) -> None:
    from fedge.train.accounting import PrivacyLedger

    assert PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").entries == []
