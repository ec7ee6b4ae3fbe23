"""upgrade_backup as root never opens a database as root (review r6).

The package's postinst runs ``python3 -m fedge.coordinator.upgrade_backup backup`` as
root over /var/lib/fedge-coordinator and /var/lib/fedge, directories the fedge user
owns, and a compromised coordinator runs as that user. The copy's child ran as the
owner that ``stat`` (following links) gave, taken after the look for databases: a
``coordinator.sqlite3`` swapped meanwhile for a symbolic link to a file of root's gave
a child running as root, writing by path in that user's directory, and a database of
root's there got one without any race. The owner now comes from ``lstat`` just before
each child starts; a link, or a database of root's, is not opened and is named.

Real files, real SQLite, the real module run as root (with an interpreter nobody can
run, ``reachable_base``), the user ``nobody`` as the fedge user, as in the review's
reproduction. The race is made certain, not timed: the first database's copy waits
for a lock the test holds while nobody swaps the second database for the link.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from debian_package.test_s19_upgrade_backup import (
    BACKUP,
    backup,
    dump,
    interpreter,
    nobody,
    reachable_base,
)
from fedge.coordinator.store import DB_NAME

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="root runs the copy for the owner")


def small_schema_2(db: Path) -> None:
    """A database that reads as schema version 2 (rollback journal: a lock the test
    holds keeps a reader waiting, where WAL would not)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.close()


def owned_dir(base: Path, name: str) -> Path:
    user = nobody()
    d = base / name
    d.mkdir(mode=0o755)
    os.chown(d, user.pw_uid, user.pw_gid)
    return d


def give(path: Path) -> None:
    user = nobody()
    os.chown(path, user.pw_uid, user.pw_gid)


def root_owned(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs for p in d.iterdir() if os.lstat(p).st_uid == 0)


def as_nobody(code: str) -> None:
    user = nobody()
    subprocess.run(["/usr/bin/python3", "-I", "-c", code], check=True, timeout=60, cwd="/",
                   user=user.pw_uid, group=user.pw_gid, extra_groups=[])


def child_running(db: Path) -> bool:
    """Whether a copy-one child for ``db`` runs now (its command line, from /proc)."""
    want = f"copy-one\0{db}\0".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if want in Path(f"/proc/{entry}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


@pytest.fixture
def base() -> Iterator[Path]:
    with reachable_base() as path:
        yield path


@as_root
def test_a_database_swapped_for_a_link_before_its_child_runs_gets_no_root_child(
        base: Path) -> None:
    """r6's race: while d1's copy runs (here: waits for the test's lock), nobody swaps
    d2's database for a symbolic link to a database only root can read. d2 gets no
    child as root and no copy of root's database; it is named, and backup fails."""
    rootonly = base / "rootonly"
    rootonly.mkdir(mode=0o700)
    secret = rootonly / "secret.sqlite3"
    conn = sqlite3.connect(secret, isolation_level=None)
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES ('root secret')")
    conn.close()
    secret_before = dump(secret)
    d1, d2 = owned_dir(base, "d1"), owned_dir(base, "d2")
    for d in (d1, d2):
        small_schema_2(d / DB_NAME)
        give(d / DB_NAME)
    holder = sqlite3.connect(d1 / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # d1's copy waits (busy timeout) until ROLLBACK
    proc = subprocess.Popen(
        [interpreter(d1), "-m", "fedge.coordinator.upgrade_backup", "backup",
         "--state-dir", str(d1), "--state-dir", str(d2)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if child_running(d1 / DB_NAME) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert child_running(d1 / DB_NAME), "d1's copy never started"
        # the fedge user, as itself: d2's database becomes the link
        as_nobody(f"import os; d = {str(d2)!r}\n"
                  f"os.rename(d + '/{DB_NAME}', d + '/moved.sqlite3')\n"
                  f"os.symlink({str(secret)!r}, d + '/{DB_NAME}')")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        err = proc.communicate(timeout=120)[1]
    assert root_owned(d1, d2) == [], err
    assert not os.path.lexists(d2 / BACKUP), err
    assert dump(secret) == secret_before
    assert proc.returncode == 1, err
    assert err.splitlines()[1] == (
        f"could not back up the coordinator database: {d2 / DB_NAME} is a symbolic link "
        f"(to {secret}), and a link in the coordinator's state directory is not "
        "followed (its owner could point it at a file of root's): replace the link with "
        f"the database it leads to, or put your own copy at {d2 / BACKUP}")
    copy = d1 / BACKUP  # d1, before the swap, copied as its owner
    st = copy.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody().pw_uid, 0o600)
    assert dump(copy) == dump(d1 / DB_NAME)


@as_root
def test_a_database_of_roots_in_the_owners_directory_is_not_opened_as_root(
        base: Path) -> None:
    """No race at all: a database of root's in nobody's directory. Not opened (no
    -wal, -shm or copy of root's there), named with what to do, backup fails; once
    the administrator put a copy at the name, it is kept and backup succeeds."""
    d = owned_dir(base, "state")
    db = d / DB_NAME
    small_schema_2(db)  # root's
    proc = backup(d)
    assert root_owned(d) == [str(db)], proc.stderr
    assert sorted(p.name for p in d.iterdir()) == [DB_NAME], proc.stderr
    assert proc.returncode == 1, proc.stderr
    why = (f"{db} belongs to root, and a database is opened only as its owner, never as "
           "root (the files SQLite makes beside it would be root's, and the directory's "
           "owner could lead root's writes elsewhere with a link); the packaged "
           "fedge-coordinator runs as user fedge and makes no database of root's")
    assert proc.stderr.strip() == (
        f"could not back up the coordinator database: {why}: with fedge-coordinator "
        f"stopped, chown {db} (and its -wal and -shm, if there) to the user "
        f"fedge-coordinator runs as, or put your own copy at {d / BACKUP}")

    note = backup(d, action="downgrade-note")
    assert (note.returncode, note.stderr.strip()) == (0, (
        f"{db} was not checked for schema version 3 (which fedge releases before 0.3.0 "
        f"refuse): {why}"))

    shutil.copyfile(db, d / BACKUP)  # the administrator's own copy
    proc = backup(d)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == (
        f"kept the existing {d / BACKUP} (the coordinator database from before 0.3.0; "
        f"fedge 0.2.0 needs it to go back); not opened: {why}")


@as_root
def test_the_copy_is_the_owners_with_the_owners_primary_group(base: Path) -> None:
    """The normal case: copied as the owner, mode 0600; the child's group is the
    owner's primary group (the user database), not the file's (here root's)."""
    d = owned_dir(base, "state")
    db = d / DB_NAME
    small_schema_2(db)
    user = nobody()
    os.chown(db, user.pw_uid, 0)
    db.chmod(0o640)
    proc = backup(d)
    assert proc.returncode == 0, proc.stderr
    st = (d / BACKUP).stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        user.pw_uid, user.pw_gid, 0o600), proc.stderr
    assert dump(d / BACKUP) == dump(db)
    assert root_owned(d) == []


def test_a_database_that_is_a_link_is_named_and_not_copied(tmp_path: Path) -> None:
    """Any user: a coordinator.sqlite3 that is a symbolic link (found so, no race) is
    not followed; it was skipped without a word, and the coordinator would migrate the
    database it leads to with no copy."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    small_schema_2(elsewhere / "real.sqlite3")
    d = tmp_path / "state"
    d.mkdir()
    (d / DB_NAME).symlink_to(elsewhere / "real.sqlite3")
    proc = backup(d)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"could not back up the coordinator database: {d / DB_NAME} is a symbolic link "
        f"(to {elsewhere / 'real.sqlite3'}), and a link in the coordinator's state "
        "directory is not followed (its owner could point it at a file of root's): "
        f"replace the link with the database it leads to, or put your own copy at "
        f"{d / BACKUP}")
    assert sorted(p.name for p in d.iterdir()) == [DB_NAME]


def test_the_owners_child_does_not_follow_a_link_swapped_in_after_the_look(
        tmp_path: Path) -> None:
    """The child's half (copy-one), already running as the owner, finds a link where
    the parent saw the database: it does not open it (SQLite's mode=ro would follow)."""
    small_schema_2(tmp_path / "real.sqlite3")
    (tmp_path / DB_NAME).symlink_to(tmp_path / "real.sqlite3")
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.coordinator.upgrade_backup", "copy-one",
         str(tmp_path / DB_NAME)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip() == (
        f"could not back up the coordinator database: {tmp_path / DB_NAME} is now a "
        f"symbolic link (to {tmp_path / 'real.sqlite3'}): not opened")
    assert not os.path.lexists(tmp_path / BACKUP)
