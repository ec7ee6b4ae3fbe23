"""`fedge console enrol --out PATH` where the file cannot be written enrols nothing:
the site's secret keys exist only in that file, so a site added without it could
never connect, and the retry was refused as "already enrolled". The error names the
path given, not the temporary file. The real CLI in subprocesses."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest


def _console(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "console", "--home", str(home),
                           *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_unwritable_out_enrols_nothing_and_the_retry_works(tmp_path: Path,
                                                               where: str) -> None:
    home = tmp_path / "console"
    assert _console(home, "init", "--coordinator", "tcp://127.0.0.1:7000").returncode == 0
    if where == "a directory":
        bad = tmp_path / "repo"
        bad.mkdir()
        reason = "Is a directory"
    else:
        (tmp_path / "notes.txt").write_text("x")
        bad = tmp_path / "notes.txt" / "site-e.fedge-enrol"
        reason = "Not a directory"
    proc = _console(home, "enrol", "site-e", "--out", str(bad), "--offline")
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"fedge console: cannot write the enrolment file {bad}: "
                                   f"{reason}; nothing was enrolled")
    assert "site-e" not in json.loads((home / "console.json").read_text())["sites"]

    good = tmp_path / "site-e.fedge-enrol"
    proc = _console(home, "enrol", "site-e", "--out", str(good), "--offline")
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(good.stat().st_mode) == 0o600
    assert "this console keeps no other copy" in proc.stdout
    assert json.loads((home / "console.json").read_text())["sites"]["site-e"]["revoked"] \
        is False
