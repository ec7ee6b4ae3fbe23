"""The coordinator database's copy from before its one-way migration, for the package.

fedge 0.3.0 brings the coordinator's database (``<state_dir>/coordinator.sqlite3``)
from schema version 2 to 3 at the coordinator's first start, and 0.2.0 refuses a
version-3 database (:mod:`fedge.coordinator.store`): going back to 0.2.0 needs the
database as it was before that start. The package's postinst, on an upgrade from a
release before 0.3, runs ``backup`` before it restarts the coordinator (a running one
would otherwise be on the new code, and its database migrated, before anyone read
the upgrade notes); the prerm, on a downgrade to a release before 0.3, runs
``downgrade-note``, which says that such a release will refuse the database and
where the copy is.

``backup`` makes ``coordinator.sqlite3.pre-0.3.0`` beside each coordinator database
still below schema version 3, with SQLite's online backup API: a consistent
snapshot at one transaction, also while a coordinator is running and writing (a
read transaction in WAL mode blocks no writer; a copy of the files could catch the
database and its WAL at different instants). The copy is a plain rollback-journal
database in one file (no ``-wal`` beside it to lose), checked with ``PRAGMA
quick_check`` and made durable before it takes its name; an existing file of that
name is never replaced, so a second run, or a backup the administrator put there,
is kept as it is.

Everything that opens a database runs as the database file's owner (the fedge user),
in a child process with that user's primary group (from the user database, not the
file's group), no supplementary groups and umask 077: opening a WAL database makes
``-shm``/``-wal`` files beside it, which root would make root's (the coordinator
could then not open its own database), and a directory the fedge user owns is one
where root should not create files by path (that user could put a symbolic link in
the way). So the copy is the fedge user's, mode 0600, as the database is.

Root itself never opens a database or writes in the state directory, and never runs
the child as root: the postinst runs this as root over directories the fedge user
owns, and a compromised coordinator runs as that user. The owner comes from
``lstat`` (never following a link), taken just before that database's child starts,
so a database swapped meanwhile for a symbolic link to a file of root's is seen as
the link. A ``coordinator.sqlite3`` that is a symbolic link, or that belongs to root
(or to a user whose primary group is root's, or to a uid with no user), is not
opened: ``backup`` names it and why, says what to do, and fails, unless the copy's
name already exists (an administrator's own copy: kept, as always). The packaged
coordinator runs as user fedge and makes no such database; one of root's there is
someone's own setup, whose copy only its administrator can make safely. The child,
now the owner, looks again (``O_NOFOLLOW``) and refuses a link before SQLite opens
the database by path: a link swapped in after that leads only where the owner can
read and write anyway.

Which databases: the ``state_dir`` that ``/etc/fedge/coordinator.toml`` names (the
package's default, ``/var/lib/fedge-coordinator``, where it names none), and
``/var/lib/fedge``, where packages before 0.2.0 kept the coordinator's state and
where postinst leaves it when moving it is ambiguous.

Exit status of ``backup``: 0 when every database below version 3 has its copy (made
now or before) or there is none; 1 when a copy could not be made or a database was
not opened (above; each named on stderr), and the package's postinst then does not
restart the coordinator. ``downgrade-note`` always exits 0: it only informs (a
database it did not open is named, as not checked).
"""

from __future__ import annotations

import argparse
import os
import pwd
import sqlite3
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

MODULE = "fedge.coordinator.upgrade_backup"  # not __name__: "__main__" under -m
DB_NAME = "coordinator.sqlite3"  # fedge.coordinator.store.DB_NAME, not imported: see below
# The schema version that no release before 0.3 can open, and the copy's suffix.
ONE_WAY_SCHEMA = 3
SUFFIX = ".pre-0.3.0"
CONFIG = Path("/etc/fedge/coordinator.toml")
DEFAULT_STATE_DIR = Path("/var/lib/fedge-coordinator")
LEGACY_STATE_DIR = Path("/var/lib/fedge")
# How long the copy waits for a lock another connection holds (a running coordinator
# holds its write lock for milliseconds; WAL recovery at another open, a little more).
BUSY_TIMEOUT_S = 60.0

# This module imports nothing of fedge's beyond the standard library: it runs from a
# maintainer script, as root and then as the fedge user, where a heavier import (the
# store pulls in fedge.secagg) is only more that can fail before the copy is made.


class BackupError(Exception):
    """A copy that could not be made; the message names the database and why."""


class Refused(BackupError):
    """A database this does not open (the module docstring): ``why`` names it and the
    reason, ``fix`` what the administrator can do (empty when nothing but looking)."""

    def __init__(self, why: str, fix: str = "") -> None:
        super().__init__(why)
        self.why = why
        self.fix = fix


def state_dirs(config: Path = CONFIG) -> list[Path]:
    """The directories that may hold a coordinator database, most likely first.

    coordinator.toml's top-level ``state_dir`` (relative to the file's directory, as
    :func:`fedge.coordinator.config.load` reads it) when the file is readable TOML and
    sets one, else the default; then the legacy directory. A config this cannot read
    falls back to the default: the coordinator would refuse it anyway, and the copy
    of the database in the default place is still worth making."""
    configured = DEFAULT_STATE_DIR
    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raw = {}
    value = raw.get("state_dir")
    if isinstance(value, str) and value:
        configured = Path(value) if Path(value).is_absolute() else config.parent / value
    found: list[Path] = []
    for d in (configured, DEFAULT_STATE_DIR, LEGACY_STATE_DIR):
        if d not in found:
            found.append(d)
    return found


def _check_regular(db: Path) -> None:
    """In the child, as the owner: ``db`` is a regular file, not a symbolic link
    (SQLite's ``mode=ro`` would follow one). Raises OSError, or BackupError naming a
    link or another kind of file."""
    try:
        # O_NONBLOCK: a FIFO put there does not hang the open
        fd = os.open(db, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(db):
            raise BackupError(f"{db} is now a symbolic link (to {os.readlink(db)}): "
                              "not opened") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise BackupError(f"{db} is not a regular file: not opened")


def _connect_ro(db: Path) -> sqlite3.Connection:
    # mode=ro: nothing here writes to the source; the URI needs the path escaped
    # (a '?' or '#' in it would start the query or fragment).
    conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True,
                           timeout=BUSY_TIMEOUT_S, isolation_level=None)
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version as the store records it (``meta``'s
    ``schema_version``); 1 for a database from before ``meta`` had the key, 0 for
    one with no ``meta`` table (not a coordinator database the store has opened)."""
    tables = {str(r[0]) for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "meta" not in tables:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return 1 if row is None else int(row[0])


def copy_database(db: Path, dest: Path) -> str:
    """Make ``dest``, a consistent copy of ``db``, unless it exists; returns the line
    for the administrator. Runs as the database's owner (:func:`run_as_owner`).

    Raises:
        BackupError: the database could not be read, the copy not written or it did
            not check out; a partial copy is removed and ``dest`` not made.
    """
    if dest.exists() or dest.is_symlink():
        return (f"kept the existing {dest} (the coordinator database from before 0.3.0; "
                "fedge 0.2.0 needs it to go back)")
    try:
        _check_regular(db)
        src = _connect_ro(db)
    except OSError as exc:
        raise BackupError(f"cannot open {db}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:
        raise BackupError(f"cannot open {db}: {exc}") from exc
    try:
        version = schema_version(src)
        if version >= ONE_WAY_SCHEMA:
            return (f"{db} is already at schema version {version} and there is no "
                    f"{dest}: fedge 0.2.0 cannot open this database")
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.unlink(missing_ok=True)  # left by a run that stopped half-way
        try:
            out = sqlite3.connect(tmp, isolation_level=None)
            try:
                # pages=-1: the whole database in one step, under one read
                # transaction on the source: a snapshot at one commit.
                src.backup(out, pages=-1)
                out.execute("PRAGMA journal_mode=DELETE")  # one file, no -wal beside it
                problems = [str(r[0]) for r in out.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise BackupError(f"the copy of {db} fails quick_check: {problems[0]}")
                if schema_version(out) != version:
                    raise BackupError(f"the copy of {db} does not read back its schema "
                                      f"version {version}")
            finally:
                out.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # link, not rename: never replaces a dest that appeared meanwhile
            os.link(tmp, dest)
            tmp.unlink()
            fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy {db} to {dest}: {exc}") from exc
    except OSError as exc:
        raise BackupError(f"cannot write {dest}: {exc}") from exc
    finally:
        src.close()
    return (f"saved the coordinator database (schema version {version}) as {dest}: "
            "fedge 0.2.0 needs it to go back, as 0.3.0 migrates the database at its "
            "first start")


def downgrade_note(db: Path, dest: Path) -> str | None:
    """The warning for a downgrade to a release before 0.3 when ``db`` is at schema
    version 3 or later; None when it is not (or cannot be read: nothing to warn of
    for certain). Runs as the database's owner (:func:`run_as_owner`)."""
    try:
        _check_regular(db)
        conn = _connect_ro(db)
        try:
            version = schema_version(conn)
        finally:
            conn.close()
    except (OSError, BackupError, sqlite3.Error):
        return None
    if version < ONE_WAY_SCHEMA:
        return None
    if dest.exists():
        where = (f"the copy from before 0.3.0 is {dest}: with the coordinator stopped, "
                 f"remove {db}-wal and {db}-shm and copy it over {db} (what the "
                 "coordinator did since the upgrade is lost)")
    else:
        where = f"there is no copy from before 0.3.0 ({dest})"
    return (f"{db} is at schema version {version}: fedge releases before 0.3.0 refuse "
            f"it and fedge-coordinator will not start after this downgrade; {where}. "
            "See /usr/share/doc/fedge/README.Debian, Going back to 0.2.0")


def owner_credentials(db: Path) -> dict[str, object] | None:
    """``subprocess.run``'s user/group/extra_groups for ``db``'s child: its owner, that
    user's primary group, no supplementary groups; {} when this process is not root
    (the child runs as this user); None when ``db`` is gone. From ``lstat``, taken
    now, just before the child starts: see the module docstring.

    Raises:
        Refused: ``db`` is a symbolic link or no regular file, or, as root, belongs
            to root, to a user whose primary group is root's or to a uid with no user.
        OSError: ``db`` cannot be looked at.
    """
    try:
        st = os.lstat(db)
    except FileNotFoundError:
        return None
    chown = (f"with fedge-coordinator stopped, chown {db} (and its -wal and -shm, if "
             "there) to the user fedge-coordinator runs as")
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(db)
        except OSError as exc:
            target = f"unreadable: {exc.strerror}"
        raise Refused(f"{db} is a symbolic link (to {target}), and a link in the "
                      "coordinator's state directory is not followed (its owner could "
                      "point it at a file of root's)",
                      "replace the link with the database it leads to")
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{db} is not a regular file")
    if os.geteuid() != 0:
        return {}
    if st.st_uid == 0:
        raise Refused(
            f"{db} belongs to root, and a database is opened only as its owner, never "
            "as root (the files SQLite makes beside it would be root's, and the "
            "directory's owner could lead root's writes elsewhere with a link); the "
            "packaged fedge-coordinator runs as user fedge and makes no database of "
            "root's", chown)
    try:
        user = pwd.getpwuid(st.st_uid)
    except KeyError:
        raise Refused(f"{db} belongs to uid {st.st_uid}, which has no entry in the user "
                      "database, and a database is opened only as its owner, with that "
                      "user's primary group", chown) from None
    if user.pw_gid == 0:
        raise Refused(f"{db} belongs to user {user.pw_name}, whose primary group is root "
                      "(gid 0), and a database is opened only as its owner with that "
                      "user's primary group, never with root's", chown)
    return {"user": st.st_uid, "group": user.pw_gid, "extra_groups": []}


def run_as_owner(action: str, db: Path) -> subprocess.CompletedProcess[str] | None:
    """This module's ``action`` for one database, in a child process as the database
    file's owner (:func:`owner_credentials`; the module docstring), umask 077; None
    when ``db`` is gone.

    Raises:
        Refused: the child would not run as the owner (:func:`owner_credentials`).
        OSError: ``db`` cannot be looked at, or the child not started.
    """
    who = owner_credentials(db)
    if who is None:
        return None
    return subprocess.run(
        [sys.executable, "-I", "-B", "-m", MODULE, action, str(db)],
        capture_output=True, text=True, umask=0o077, cwd="/", check=False,
        **who)  # type: ignore[call-overload]


def databases(dirs: list[Path]) -> list[Path]:
    """Each ``<dir>/coordinator.sqlite3`` that is a regular file or a symbolic link
    (named and refused later, :func:`owner_credentials`), once. A look only: which
    user to be is decided again just before each one's child starts."""
    found: list[Path] = []
    seen: set[str] = set()
    for d in dirs:
        db = d / DB_NAME
        try:
            mode = os.lstat(db).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            # the directory's real path: the same database through a linked state_dir
            real = os.path.join(os.path.realpath(d), DB_NAME)
            if real not in seen:
                seen.add(real)
                found.append(db)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python3 -m {MODULE}",
                                     description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for name in ("backup", "downgrade-note"):
        p = sub.add_parser(name)
        p.add_argument("--config", type=Path, default=CONFIG)
        p.add_argument("--state-dir", type=Path, action="append", default=None,
                       help="look only here (repeatable); default: from --config")
    for name in ("copy-one", "note-one"):  # the child's half, as the owner
        sub.add_parser(name).add_argument("db", type=Path)
    args = parser.parse_args(argv)

    if args.action in ("copy-one", "note-one"):
        dest = args.db.with_name(args.db.name + SUFFIX)
        if args.action == "note-one":
            line = downgrade_note(args.db, dest)
            if line:
                print(line)
            return 0
        try:
            print(copy_database(args.db, dest))
        except BackupError as exc:
            print(f"could not back up the coordinator database: {exc}")
            return 1
        return 0

    failed = False
    for db in databases(args.state_dir or state_dirs(args.config)):
        child = "copy-one" if args.action == "backup" else "note-one"
        dest = db.with_name(db.name + SUFFIX)
        try:
            proc = run_as_owner(child, db)
        except Refused as exc:
            if args.action == "downgrade-note":
                print(f"{db} was not checked for schema version 3 (which fedge releases "
                      f"before 0.3.0 refuse): {exc.why}", file=sys.stderr)
            elif os.path.lexists(dest):  # an lstat: root opens nothing there
                print(f"kept the existing {dest} (the coordinator database from before "
                      "0.3.0; fedge 0.2.0 needs it to go back); not opened: "
                      f"{exc.why}", file=sys.stderr)
            else:
                own = f"put your own copy at {dest}"
                fix = f"{exc.fix}, or {own}" if exc.fix else own
                print(f"could not back up the coordinator database: {exc.why}: {fix}",
                      file=sys.stderr)
                failed = True
            continue
        except OSError as exc:
            if args.action == "downgrade-note":
                print(f"{db} was not checked for schema version 3 (which fedge releases "
                      f"before 0.3.0 refuse): {exc}", file=sys.stderr)
            else:
                print(f"could not back up the coordinator database {db}: {exc}",
                      file=sys.stderr)
                failed = True
            continue
        if proc is None:  # gone since it was found: nothing to copy, nothing migrated
            continue
        text = (proc.stdout + proc.stderr).strip()
        if text:
            print(text, file=sys.stderr)
        if proc.returncode != 0 and args.action == "backup":
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
