"""The coordinator database's copy from before 0.3.0's one-way migration (schema 2 -> 3).

0.3.0 migrates the coordinator database at its first start and 0.2.0 refuses the
result; under systemd, postinst's try-restart on upgrade is that first start. So
postinst `configure <version before 0.3>` copies the database first
(fedge.coordinator.upgrade_backup), and the old package's prerm `upgrade <version
before 0.3>` (a downgrade) warns when the database is at schema 3.

The first tests run the module against real SQLite databases here; the last ones
install the real package (test_deb's `debs` fixture) and run its installed
maintainer scripts as dpkg would on an upgrade from 0.2.0-1, against a schema-2
database the fedge user owns. A schema-2 database is made as 0.2.0 left it: the
current Store's, with what migration step 3 adds taken away again.

Run as root, the module's tests put the database in a directory of nobody's and make
it nobody's (``state``, ``own``), as the fedge user's is: the module opens a database
only as its owner and never as root (test_s19_upgrade_backup_race.py).
"""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from debian_package import test_deb, test_maintainer_scripts
from fedge.coordinator import upgrade_backup
from fedge.coordinator.store import DB_NAME, Store

BACKUP = DB_NAME + ".pre-0.3.0"


@contextmanager
def reachable_base() -> Iterator[Path]:
    """As root: a directory nobody can reach (tmp_path's parents are root's, 0700),
    with ``venv/bin/python``, an interpreter nobody can run (this one is under /root)
    that imports this fedge (a .pth): the module's child, as nobody, runs the
    parent's interpreter, as the package's runs /usr/lib/fedge/bin/python3."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 here, for an interpreter nobody can run")
    base = Path(tempfile.mkdtemp(prefix="fedge-upgrade-backup-"))
    try:
        base.chmod(0o755)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip",
                        str(base / "venv")], check=True, timeout=120)
        source = Path(upgrade_backup.__file__).parents[2]  # the fedge under test
        for site in (base / "venv" / "lib").glob("python3*/site-packages"):
            (site / "fedge-under-test.pth").write_text(f"{source}\n")
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def interpreter(state_dir: Path) -> str:
    """The interpreter to run the module with for ``state_dir``: the one
    ``reachable_base`` made above it, where there is one; else this one."""
    python = state_dir.parent / "venv" / "bin" / "python"
    return str(python) if python.exists() else sys.executable


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The state directory for a run of the module: tmp_path, this user's; as root, a
    directory of nobody's (``own`` makes what the test put there nobody's) in a
    ``reachable_base``, as the fedge user's is."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    user = nobody()
    with reachable_base() as base:
        d = base / "state"
        d.mkdir(mode=0o700)
        os.chown(d, user.pw_uid, user.pw_gid)
        yield d


def nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here, to own the database as the fedge user does")


def own(d: Path) -> None:
    """As root: everything in ``d`` becomes nobody's, with nobody's group."""
    if os.geteuid() == 0:
        user = nobody()
        for p in (d, *d.rglob("*")):
            os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)


def make_schema_2(state_dir: Path, sites: int = 2) -> Path:
    """A coordinator database as fedge 0.2.0 left it (schema version 2), with sites."""
    store = Store(state_dir)
    for i in range(sites):
        store.enrol(f"site-{i}", f"{i:040d}", bytes(32), actor="test")
    store.close()
    db = state_dir / DB_NAME
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TABLE ledger_marks")
    conn.execute("DROP TABLE revoked_keys")
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    return db


def dump(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def version(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return upgrade_backup.schema_version(conn)
    finally:
        conn.close()


def backup(*dirs: Path, action: str = "backup") -> subprocess.CompletedProcess[str]:
    args = [a for d in dirs for a in ("--state-dir", str(d))]
    return subprocess.run([interpreter(dirs[0]), "-m", "fedge.coordinator.upgrade_backup",
                           action, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_copy_is_the_last_commit_while_a_writer_holds_the_database(state: Path) -> None:
    """A coordinator writing meanwhile: the copy is the database at its last commit
    (WAL: the open write transaction neither blocks the copy nor is in it), one file,
    mode 0600, and the store then migrates the original and leaves the copy alone."""
    db = make_schema_2(state)
    before = dump(db)
    writer = sqlite3.connect(db, isolation_level=None, timeout=5)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO audit(time, actor, action, detail) VALUES (1, 'x', 'y', 'z')")
    own(state)  # -wal and -shm too, as the coordinator's are
    try:
        proc = backup(state)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert proc.returncode == 0, proc.stderr
    copy = state / BACKUP
    assert proc.stderr.strip() == (
        f"saved the coordinator database (schema version 2) as {copy}: fedge 0.2.0 needs it "
        "to go back, as 0.3.0 migrates the database at its first start")
    assert dump(copy) == before and version(copy) == 2
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    conn = sqlite3.connect(copy)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    conn.close()
    assert sorted(p.name for p in state.iterdir() if "pre-0.3.0" in p.name) == [BACKUP]
    Store(state).close()  # 0.3.0's first start
    assert version(db) == 3 and version(copy) == 2 and dump(copy) == before


def test_a_second_run_keeps_the_first_copy(state: Path) -> None:
    db = make_schema_2(state)
    own(state)
    assert backup(state).returncode == 0
    copy = state / BACKUP
    first, inode = dump(copy), copy.stat().st_ino
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO audit(time, actor, action, detail) VALUES (2, 'x', 'later', '')")
    conn.close()
    own(state)
    proc = backup(state)
    assert proc.returncode == 0, proc.stderr
    assert "kept the existing" in proc.stderr and str(copy) in proc.stderr
    assert copy.stat().st_ino == inode and dump(copy) == first


def test_a_database_already_at_schema_3_gets_no_copy(state: Path) -> None:
    Store(state).close()
    own(state)
    proc = backup(state)
    assert proc.returncode == 0, proc.stderr
    assert "already at schema version 3" in proc.stderr
    assert not (state / BACKUP).exists()


def test_no_database_no_copy_and_no_word(tmp_path: Path) -> None:
    proc = backup(tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert list(tmp_path.iterdir()) == []


def test_a_copy_that_cannot_be_made_fails_and_leaves_nothing(state: Path) -> None:
    (state / DB_NAME).write_bytes(b"not SQLite at all" * 100)
    own(state)
    proc = backup(state)
    assert proc.returncode == 1
    assert f"could not back up the coordinator database: cannot copy {state / DB_NAME}" in (
        proc.stderr)
    assert sorted(p.name for p in state.iterdir()) == [DB_NAME]


def test_state_dirs_follow_coordinator_toml(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text('state_dir = "state"\n')
    assert upgrade_backup.state_dirs(config) == [
        tmp_path / "state", Path("/var/lib/fedge-coordinator"), Path("/var/lib/fedge")]
    config.write_text("not = [toml")
    assert upgrade_backup.state_dirs(config) == [
        Path("/var/lib/fedge-coordinator"), Path("/var/lib/fedge")]


def test_downgrade_note_names_the_copy_only_at_schema_3(state: Path) -> None:
    def note() -> subprocess.CompletedProcess[str]:
        return backup(state, action="downgrade-note")
    make_schema_2(state)
    own(state)
    assert (note().returncode, note().stderr) == (0, "")
    assert backup(state).returncode == 0
    Store(state).close()
    own(state)
    proc = note()
    assert proc.returncode == 0
    assert "is at schema version 3: fedge releases before 0.3.0 refuse it" in proc.stderr
    assert f"the copy from before 0.3.0 is {state / BACKUP}" in proc.stderr


# -- the installed package's maintainer scripts -------------------------------------

debs = test_deb.debs
STATE = Path("/var/lib/fedge-coordinator")
POSTINST = "/var/lib/dpkg/info/fedge.postinst"
PRERM = "/var/lib/dpkg/info/fedge.prerm"


@pytest.fixture(scope="module")
def installed(debs: tuple[Path, Path]) -> Iterator[pwd.struct_passwd]:
    if STATE.exists():
        pytest.skip(f"{STATE} exists here already; not touching it")
    test_deb.sh("dpkg", "--force-unsafe-io", "-i", str(debs[0]))
    yield pwd.getpwnam("fedge")
    # the debs fixture purges the package (and with it the state directory)


def fedge_schema_2(user: pwd.struct_passwd) -> Path:
    """A schema-2 database in the package's state directory, all of it the fedge
    user's, as the 0.2.0 coordinator left it."""
    if STATE.exists():
        for p in STATE.iterdir():
            p.unlink()
    else:
        STATE.mkdir(mode=0o700)
    db = make_schema_2(STATE)
    for p in (STATE, *STATE.iterdir()):
        os.chown(p, user.pw_uid, user.pw_gid)
        if p.is_file():
            p.chmod(0o600)
    return db


def script(path: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", path, *args], capture_output=True, text=True, timeout=300,
                          cwd="/", env={**os.environ, **env}, check=False)


def deb_test(f: Callable[..., None]) -> Callable[..., None]:
    """test_deb's marks: slow, root, the tools, /usr/bin/python3."""
    for mark in reversed(test_deb.pytestmark):
        f = mark(f)
    return f


@deb_test
def test_installed_postinst_copies_the_database_on_upgrade_from_0_2(
        installed: pwd.struct_passwd) -> None:
    """postinst configure 0.2.0-1: the copy, the fedge user's, 0600, equal; a re-run
    keeps it; configure 0.3.0-1 (a reinstall) makes none; prerm upgrade 0.2.0-1 (a
    downgrade) warns once the database is at schema 3."""
    user = installed
    db = fedge_schema_2(user)
    before = dump(db)
    proc = script(POSTINST, "configure", "0.2.0-1")
    assert proc.returncode == 0, proc.stderr
    copy = STATE / BACKUP
    assert (f"fedge: saved the coordinator database (schema version 2) as {copy}: "
            "fedge 0.2.0 needs it to go back") in proc.stderr
    st = copy.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, user.pw_gid, 0o600)
    assert dump(copy) == before
    # nothing of root's left beside the database (-wal/-shm the coordinator must open)
    assert {p.stat().st_uid for p in STATE.iterdir()} == {user.pw_uid}

    inode = st.st_ino
    proc = script(POSTINST, "configure", "0.2.0-1")
    assert proc.returncode == 0 and "kept the existing" in proc.stderr, proc.stderr
    assert copy.stat().st_ino == inode

    copy.unlink()
    proc = script(POSTINST, "configure", f"{test_deb.upstream()}-1")  # a reinstall
    assert proc.returncode == 0, proc.stderr
    assert not copy.exists() and "saved the coordinator database" not in proc.stderr

    # a downgrade from a migrated database: prerm of the installed (0.3) package
    assert script(POSTINST, "configure", "0.2.0-1").returncode == 0
    proc = script(PRERM, "upgrade", "0.2.0-1")
    assert (proc.returncode, proc.stderr) == (0, ""), "schema 2: nothing to warn of"
    subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                    "--clear-groups", "/usr/lib/fedge/bin/python3", "-c",
                    f"from fedge.coordinator.store import Store; Store({str(STATE)!r}).close()"],
                   check=True, timeout=120, cwd="/")
    assert version(db) == 3
    proc = script(PRERM, "upgrade", "0.2.0-1")
    assert proc.returncode == 0, proc.stderr
    assert (f"fedge: {db} is at schema version 3: fedge releases before 0.3.0 refuse it and "
            "fedge-coordinator will not start after this downgrade; the copy from before "
            f"0.3.0 is {copy}") in proc.stderr
    assert script(PRERM, "upgrade", f"{test_deb.upstream()}-2").stderr == ""  # an upgrade


@deb_test
def test_installed_postinst_fails_before_any_restart_when_the_copy_cannot_be_made(
        installed: pwd.struct_passwd) -> None:
    """The fedge user cannot write the state directory: no copy, configure fails
    (exit 1, before the systemd section: nothing restarted), saying what to do;
    FEDGE_COORDINATOR_BACKUP=skip goes on without one."""
    db = fedge_schema_2(installed)
    STATE.chmod(0o500)
    try:
        proc = script(POSTINST, "configure", "0.2.0-1")
        assert proc.returncode == 1
        assert "fedge: could not back up the coordinator database: cannot" in proc.stderr
        assert "fedge-coordinator was not restarted and fedge is left unconfigured" in (
            proc.stderr)
        assert not (STATE / BACKUP).exists() and version(db) == 2
        proc = script(POSTINST, "configure", "0.2.0-1", FEDGE_COORDINATOR_BACKUP="skip")
        assert proc.returncode == 0, proc.stderr
        assert "FEDGE_COORDINATOR_BACKUP=skip" in proc.stderr
    finally:
        STATE.chmod(0o700)
    postinst = Path(POSTINST).read_text()
    assert postinst.index("backup_coordinator_database\n        fi") < postinst.index(
        "migrate_coordinator_state\n") < postinst.index("deb-systemd-invoke try-restart")


WRAP_SYSTEMCTL = """BIN=$(dirname "$(command -v systemctl)")
mv "$BIN/systemctl" "$BIN/systemctl.stub"
cat > "$BIN/systemctl" <<'EOS'
#!/bin/sh
# what the copy was when the coordinator was (re)started
for arg in "$@"; do
    case $arg in try-restart|restart|start)
        if [ -e /var/lib/fedge-coordinator/coordinator.sqlite3.pre-0.3.0 ]; then
            echo "copy made before: $*" >> "$LOG"
        else
            echo "no copy before: $*" >> "$LOG"
        fi ;;
    esac
done
exec "$(dirname "$0")/systemctl.stub" "$@"
EOS
chmod 755 "$BIN/systemctl"
"""


@deb_test
@test_maintainer_scripts.needs_namespace
@pytest.mark.parametrize("copy_fails", [False, True], ids=["copied", "copy-fails"])
def test_under_systemd_the_copy_is_made_before_the_running_coordinator_restarts(
        installed: pwd.struct_passwd, tmp_path: Path, copy_fails: bool) -> None:
    """r4's upgrade under systemd: a running coordinator, postinst configure 0.2.0-1.
    The copy exists when try-restart runs; when it cannot be made, configure fails
    with no restart at all (the coordinator stays as it was, still running)."""
    src = tmp_path / "src"
    src.mkdir()
    make_schema_2(src)
    proc = test_maintainer_scripts.in_scratch_root(tmp_path, f"""
sh $P/postinst configure '' 2>>$ERR
install -d -o fedge -g fedge -m 0700 /var/lib/fedge-coordinator
install -o fedge -g fedge -m 0600 {src / DB_NAME} /var/lib/fedge-coordinator/{DB_NAME}
{"chmod 0500 /var/lib/fedge-coordinator" if copy_fails else ""}
touch $ACTIVE/fedge-coordinator.service
{WRAP_SYSTEMCTL}
: > $LOG
rc=0
sh $P/postinst configure 0.2.0-1 2>>$ERR || rc=$?
echo "rc=$rc"
if [ -e $ACTIVE/fedge-coordinator.service ]; then echo "active after"; fi
""", systemd=True)
    err = test_maintainer_scripts.script_stderr(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr + err
    out = proc.stdout.splitlines()
    calls = (tmp_path / "systemctl.log").read_text().splitlines()
    assert "active after" in out, (out, calls, err)
    if copy_fails:
        assert "rc=1" in out, (out, err)
        assert not any("restart" in c or c.startswith("start") for c in calls), calls
        assert "fedge-coordinator was not restarted and fedge is left unconfigured" in err
    else:
        assert "rc=0" in out, (out, err)
        restarts = [c for c in calls if c.startswith(("copy made before:", "no copy before:"))]
        assert restarts and all(c.startswith("copy made before:") for c in restarts), calls
        assert any("try-restart" in c and "fedge-coordinator.service" in c
                   for c in restarts), calls
