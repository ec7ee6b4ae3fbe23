"""`fedge demo` run where its default report folder (reports/demo, relative) cannot be
made says which folder, that it is relative to the current directory, and to give
--report: at once, before any federation starts, without a traceback. Real CLI."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FEDGE = [sys.executable, "-m", "fedge.cli", "demo", "--rounds", "1"]
SETPRIV = shutil.which("setpriv")


def _demo(cwd: Path, *switch: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*switch, *FEDGE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_file_in_the_way_of_the_default_report_folder(tmp_path: Path) -> None:
    (tmp_path / "reports").write_text("not a folder")
    proc = _demo(tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(
        f"fedge demo: cannot create the report folder reports/demo (relative to the "
        f"current directory, {tmp_path}): ")
    assert proc.stderr.rstrip().endswith("give --report DIR, a folder you can write")


@pytest.fixture
def unwritable_cwd() -> Iterator[Path]:
    """A folder root owns and others may enter but not write (as / is)."""
    folder = Path(tempfile.mkdtemp(prefix="fedge-s15-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def _uid_without_entry() -> str:
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return str(uid)
        uid += 1


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="switching to an unprivileged uid needs root and setpriv")
def test_an_unwritable_current_directory_is_named(unwritable_cwd: Path) -> None:
    uid = _uid_without_entry()
    proc = _demo(unwritable_cwd, str(SETPRIV), "--reuid", uid, "--regid", uid,
                 "--clear-groups")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        f"fedge demo: cannot create the report folder reports/demo (relative to the current "
        f"directory, {unwritable_cwd}): Permission denied; give --report DIR, a folder you "
        "can write")
    assert not (unwritable_cwd / "reports").exists()
