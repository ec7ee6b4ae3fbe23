"""`fedge agent enrol` killed mid-write (kill -9, a power cut) leaves write_atomic's
hidden temporaries; the one of ``keys/curve.json`` holds the CURVE secret key. The
next enrolment (in the child that writes as the state dir's owner, when root enrols
for the service user) and the next agent start overwrite such a temporary with zeros
and remove it, so that shredding the enrolled keys after moving them into the
credentials directory leaves no copy.

The real command, killed at its first fsync by strace's signal injection (the
secret is written, not yet renamed into place); a hard link taken to the temporary
before the sweep shows its bytes were overwritten, not only unlinked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.process import remove_stale_temps_of
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

pytestmark = pytest.mark.skipif(shutil.which("strace") is None,
                                reason="needs strace to kill the enrol at an exact fsync")


def enrol_argv(file: Path, state: Path) -> list[str]:
    return [sys.executable, "-m", "fedge.cli", "agent", "enrol", str(file),
            "--state-dir", str(state)]


def killed_at_first_fsync(file: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                           "-e", "inject=fsync:signal=KILL:when=1",
                           *enrol_argv(file, state)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def base():
    """A directory another user can reach (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fedge-enrol-crash-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["own user", "root for the service user"])
def owner(request):
    """Who owns the state dir: the user enrolling (the enrol writes itself), or a
    throwaway user root enrols for (the enrol writes in a child run as that user)."""
    if request.param == "own user":
        yield None
        return
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd: root enrols for another user")
    import pwd

    name = f"fx{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, timeout=60)
    try:
        pw = pwd.getpwnam(name)
        yield pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], timeout=60, check=False)


def leftover_curve_temp(base: Path, owner) -> tuple[Path, Path, Path, Path]:
    """Enrol once, then kill a re-enrolment at its first fsync: (file, state, the
    curve.json temporary it left, a hard link to that temporary's bytes)."""
    console = ConsoleStore.init(base / "console", coordinator_endpoint="tcp://127.0.0.1:7001")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=base / "h1.fedge-enrol")
    state = base / "state"
    state.mkdir(mode=0o700)
    if owner is not None:
        os.chown(state, *owner)
    first = subprocess.run(enrol_argv(file, state), capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 0, first.stderr
    killed = killed_at_first_fsync(file, state)
    assert killed.returncode != 0
    [temp] = (state / "keys").glob(".curve.json.*")
    secret = temp.read_bytes()
    assert b'"secret"' in secret  # what is left holds the CURVE secret key
    peek = state / "peek"  # same file system: a second name for the same bytes
    os.link(temp, peek)
    return file, state, temp, peek


def test_the_next_enrolment_overwrites_and_removes_a_killed_ones_key_temporary(base, owner):
    file, state, _, peek = leftover_curve_temp(base, owner)
    again = subprocess.run(enrol_argv(file, state), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (state / "keys").iterdir()) == [
        "coordinator.json", "curve.json", "identity.key"]
    data = peek.read_bytes()
    assert data and data == b"\0" * len(data)  # overwritten before it was removed
    assert not [p for p in state.iterdir() if p.name.startswith(".")]


def test_the_agent_start_overwrites_and_removes_a_killed_enrolments_key_temporary(base):
    _, state, temp, peek = leftover_curve_temp(base, None)
    (state / "keys" / "identity.key.tmp").write_bytes(b"k" * 32)  # Identity.save's
    removed = remove_stale_temps_of(state, health=False)
    assert temp in removed and state / "keys" / "identity.key.tmp" in removed
    assert sorted(p.name for p in (state / "keys").iterdir()) == [
        "coordinator.json", "curve.json", "identity.key"]
    data = peek.read_bytes()
    assert data and data == b"\0" * len(data)
