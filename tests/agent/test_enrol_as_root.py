"""`sudo fedge agent enrol FILE` (the documented procedure) writes into /var/lib/fedge,
which the less trusted service user owns. That user must gain nothing from symlinks
it plants there, nor from files it edits, before root re-enrols: root's files outside
the state dir stay as they were, and what is written inside is the owner's.

Real root, a real throwaway unprivileged user (useradd -M, removed after), the symlinks
planted as that user (runuser), and the real `fedge agent enrol` command."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("useradd") is None
    or shutil.which("runuser") is None,
    reason="needs root, useradd and runuser: root enrols for another user, as hospital IT does")


@pytest.fixture
def user():
    """A throwaway unprivileged user standing in for `fedge`: (name, uid, gid)."""
    import pwd

    name = f"fx{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True, timeout=60)
    try:
        pw = pwd.getpwnam(name)
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], timeout=60, check=False)


@pytest.fixture
def base():
    """A directory the throwaway user can reach (pytest's tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="fedge-enrol-root-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_user(name: str, script: str) -> None:
    subprocess.run(["runuser", "-u", name, "--", "sh", "-ec", script], check=True,
                   timeout=60)


def enrol(file: Path, state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "enrol", str(file),
                           "--state-dir", str(state), *extra], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def enrolled(user, base):
    """A state dir owned by `user` (0700, as the package makes /var/lib/fedge), enrolled
    once by root from a root-only enrolment file: (state, file)."""
    _, uid, gid = user
    console = ConsoleStore.init(base / "console", coordinator_endpoint="tcp://127.0.0.1:7001")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=base / "h1.fedge-enrol")
    os.chmod(file, 0o600)  # root's alone: root reads it, not the user
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, uid, gid)
    r = enrol(file, state)
    assert r.returncode == 0, r.stderr
    return state, file


def owners(state: Path) -> set[int]:
    return {p.lstat().st_uid for p in state.rglob("*")}


def test_root_enrol_writes_everything_as_the_state_dirs_owner(user, enrolled):
    _, uid, _ = user
    state, file = enrolled
    assert owners(state) == {uid}
    assert stat.S_IMODE((state / "keys" / "identity.key").stat().st_mode) == 0o600
    r = enrol(file, state)  # the same file again
    assert r.returncode == 0, r.stderr
    assert owners(state) == {uid}
    lines = (state / "enrolment-history.jsonl").read_text().splitlines()
    assert [json.loads(line)["uid"] for line in lines] == [0, 0]  # who ran it: root


def test_root_enrol_does_not_append_to_a_file_the_history_symlink_points_at(
        user, base, enrolled):
    """The service user points enrolment-history.jsonl at a root-only shell rc file and
    puts a command substitution where the console fingerprint was: root must append
    nothing there (sourcing it would run the command as root)."""
    name, _, _ = user
    state, file = enrolled
    rc = base / "root_bashrc"
    rc.write_text("# root shell rc\n")
    os.chmod(rc, 0o600)
    as_user(name, f"""cd {state}
rm -f enrolment-history.jsonl; ln -s {rc} enrolment-history.jsonl""")
    r = enrol(file, state)
    assert r.returncode == 0, r.stderr  # installed; only its history line is lost
    assert "cannot be appended" in r.stderr
    assert rc.read_text() == "# root shell rc\n"
    assert (state / "enrolment-history.jsonl").is_symlink()


def test_values_the_service_user_wrote_into_enrolment_json_are_not_copied_to_history(
        user, enrolled):
    name, _, _ = user
    state, file = enrolled
    meta = json.loads((state / "enrolment.json").read_text())
    meta["console_fingerprint"] = "$(id > /tmp/pwned)"
    meta["site"] = "h1"  # the site must still read as h1 (else: another site, refused)
    doc = state / "enrolment.json.new"
    doc.write_text(json.dumps(meta))
    os.chown(doc, *user[1:])
    as_user(name, f"cd {state}; mv enrolment.json.new enrolment.json")
    r = enrol(file, state)
    assert r.returncode == 0, r.stderr
    last = json.loads((state / "enrolment-history.jsonl").read_text().splitlines()[-1])
    assert last["previous"]["site"] == "h1"
    assert last["previous"]["console_fingerprint"] is None
    # the planted text itself, not its first two characters: '$' and '(' are Z85, so
    # about one random coordinator key in 240 holds "$(" (CI could fail on it); Z85
    # has no space, so no key holds "$(id "
    assert "$(id " not in (state / "enrolment-history.jsonl").read_text()


@pytest.mark.parametrize("replace", [False, True])
def test_root_enrol_does_not_write_into_a_directory_the_keys_symlink_points_at(
        user, base, enrolled, replace):
    """keys/ swapped for a symlink to a directory of root's: root neither chmods that
    directory nor writes the new keys into it. Without --replace the enrolment is
    refused (the pinned coordinator cannot be read); with it, writing fails as the
    owner."""
    name, _, _ = user
    state, file = enrolled
    rootdir = base / "rootdir"
    rootdir.mkdir(mode=0o755)
    os.chmod(rootdir, 0o755)
    (rootdir / "x").write_text("root only\n")
    as_user(name, f"cd {state}; mv keys keys.old; ln -s {rootdir} keys")
    r = enrol(file, state, *(["--replace"] if replace else []))
    assert r.returncode == 2, (r.stdout, r.stderr)
    if not replace:
        assert "coordinator.json is missing" in r.stderr
    assert stat.S_IMODE(rootdir.stat().st_mode) == 0o755
    assert sorted(p.name for p in rootdir.iterdir()) == ["x"]
    assert (rootdir / "x").read_text() == "root only\n"


def test_a_removed_pinned_coordinator_is_not_taken_as_no_pin(user, enrolled):
    """Removing keys/coordinator.json must not get round the refusal to change the
    coordinator this appliance is pinned to."""
    name, _, _ = user
    state, file = enrolled
    as_user(name, f"rm {state}/keys/coordinator.json")
    r = enrol(file, state)
    assert r.returncode == 2
    assert f"{state / 'keys' / 'coordinator.json'} is missing" in r.stderr
    assert "--replace" in r.stderr
    assert not (state / "keys" / "coordinator.json").exists()
    r = enrol(file, state, "--replace")
    assert r.returncode == 0, r.stderr
    assert json.loads((state / "keys" / "coordinator.json").read_text())["endpoint"] == (
        "tcp://127.0.0.1:7001")


def test_root_enrol_chowns_nothing_it_did_not_write(user, enrolled):
    """The old hand-over walked the state dir and chowned every root-owned entry to the
    owner: a directory swapped for a symlink mid-walk turned that into chowning root's
    files anywhere. Now nothing is chowned; root's own file in there stays root's."""
    _, uid, gid = user
    state, file = enrolled
    zz = state / "zz"
    zz.mkdir()
    os.chown(zz, uid, gid)
    (zz / "victim").write_text("root's\n")
    os.chmod(zz / "victim", 0o600)
    r = enrol(file, state)
    assert r.returncode == 0, r.stderr
    assert (zz / "victim").stat().st_uid == 0
    assert owners(state) - {uid} == {0}
