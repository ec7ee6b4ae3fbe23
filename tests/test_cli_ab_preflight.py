"""`python -m fedge.update.ab preflight` (the agent unit's ExecStartPre) refuses a
--root that is a file and --max-attempts below 1 in one line, rc 2: they were
tracebacks in the journal. Real module in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _ab(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.update.ab", *argv],
                          capture_output=True, text=True, timeout=60)


def test_a_root_that_is_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.write_text("")
    proc = _ab("preflight", "--root", str(root))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fedge.update.ab preflight: --root {root} is not a directory"


def test_max_attempts_below_one_is_refused(tmp_path: Path) -> None:
    proc = _ab("preflight", "--root", str(tmp_path / "ab"), "--max-attempts", "0")
    assert proc.returncode == 2
    assert "--max-attempts: 0 must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ab").exists()
