"""The console's home is resolved when a console command runs, not when `fedge` starts.

A container run as a uid with no passwd entry and no HOME (`docker run --user N`,
Kubernetes' runAsUser) has no home directory: `fedge agent` must still run there, and a
console command says what to set instead of a traceback. The real CLI in subprocesses,
as such a uid where the tests run as root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FEDGE = [sys.executable, "-m", "fedge.cli"]

SETPRIV = shutil.which("setpriv")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                                reason="switching to a uid needs root and setpriv")


def _homeless_uid() -> int:
    """A uid the password database does not know."""
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def _run_homeless(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`fedge ARGS` as a uid with no passwd entry, HOME unset, ``env`` added.

    Through setpriv rather than subprocess's ``user=``: here the interpreter sits
    behind a folder only root may search, and only setpriv's exec reaches it."""
    uid = str(_homeless_uid())
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), **env}
    switch = [str(SETPRIV), "--reuid", uid, "--regid", uid, "--clear-groups"]
    return subprocess.run([*switch, *FEDGE, *args], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)


@needs_root
def test_agent_help_runs_for_a_uid_without_home_or_passwd_entry() -> None:
    proc = _run_homeless(["agent", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "usage: fedge agent" in proc.stdout


@needs_root
def test_agent_help_runs_without_home_when_the_console_home_is_set() -> None:
    proc = _run_homeless(["agent", "--help"], FEDGE_CONSOLE_HOME="/nonexistent/console")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


@needs_root
def test_console_command_without_any_home_says_what_to_set() -> None:
    proc = _run_homeless(["console", "fleet"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "set --home or FEDGE_CONSOLE_HOME" in proc.stderr


@needs_root
def test_console_command_without_home_uses_the_environment_variable(tmp_path: Path) -> None:
    home = tmp_path / "no-console-here"
    proc = _run_homeless(["console", "fleet"], FEDGE_CONSOLE_HOME=str(home))
    assert proc.returncode == 1
    assert str(home) in proc.stderr  # (this uid may not even look into tmp_path)
    assert "Traceback" not in proc.stderr


def test_console_home_prefers_the_flag_then_the_variable_then_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedge.console.cli import console_home

    monkeypatch.setenv("FEDGE_CONSOLE_HOME", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert console_home(tmp_path / "flag") == tmp_path / "flag"
    assert console_home(None) == tmp_path / "env"
    monkeypatch.setenv("FEDGE_CONSOLE_HOME", "")  # empty: as if unset
    assert console_home(None) == tmp_path / "h" / ".fedge-console"

