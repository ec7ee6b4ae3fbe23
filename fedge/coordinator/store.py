"""The coordinator's durable state: one SQLite database in WAL mode.

Tables: appliances (the fleet registry), operators, jobs, rounds, metrics, the
survivor sets a round's unmasking was asked over (``unmask_sets``) and an
append-only audit log. Every write is one transaction; a coordinator killed at
any instant leaves the database at the last committed write (WAL +
``synchronous=FULL``). The schema carries a version in ``meta``; an older
database is brought up to date at open (``_MIGRATIONS``, one transaction), one
written by a newer schema is refused rather than guessed at. Indexes are outside
the version: made at open where missing (``_INDEXES``), as any release can open a
database that has them.

A round row's ``dropped_json`` holds ``{site: why it was left out}`` (a committed
round: each site dropped from its survivors; a failed attempt: each site that
refused or was lost), in the site's own words where it gave any. Rows written
before it did hold a plain list of the dropped sites, read with no reasons. Schema
version 2 added ``unmask_sets``: a version-1 database is migrated at open, and a
release that knows only version 1 then refuses it (a downgrade cannot open it).
Schema version 3 added ``ledger_marks``: per site, the most released runs its privacy
ledger has reported (the heartbeat's health report, ``privacy_ledger_released``), and
when it last reported fewer (``rolled_back_to``): an appliance restored from an older
backup (:meth:`Store.note_ledger_released`). It is a version step, not an unversioned
table, because it guards the sites' privacy caps: a release that knows nothing of it
would let a rolled-back site train again, so it must refuse the database instead.
The same step added ``revoked_keys``: every CURVE key a site was ever revoked with
(an appliances row holds only the site's current key, so a site revoked, then
re-enrolled with a new key, would otherwise forget the old one). The step records the
keys of the sites revoked when it runs; :meth:`Store.enrol` refuses any key in it, for
any site. A version step for the same reason: a release without it would take a
revoked key back.

Model weights are not stored here: they live in safetensors checkpoints beside
the database (see :mod:`fedge.coordinator.checkpoint`); a round row is written
only after its checkpoint file is durable, so "last committed round" always
names a checkpoint that exists.

``eval_missing`` holds, per committed round, each survivor that is not in the
round's evaluation and why (``Round.eval_missing``). It is made at open where
missing, outside the version, as the indexes are: a release without it opens the
database all the same and only records no such reasons (a column of ``rounds``
would break its positional inserts, and a version step would refuse the downgrade
for a table that guards nothing). Rounds committed without a row have none.
``left_out`` is made the same way: per committed round, each enrolled site the
cohort left out and why (a version, a class order, a health verdict, not connected).
``declared_inputs`` is made the same way: per site, what its last heartbeat's
DatasetClasses said of its data sets (their tasks and input shapes, as a JSON object),
so that ``fedge coordinator submit``, another process, checks a plan's model against
them as the running coordinator does. A site's row is deleted with its revocation.

Heartbeats are the exception to "every write is one transaction": a fleet beating
every second would be one fsync per heartbeat, on the coordinator's event loop. Each
site's latest heartbeat is held in memory (:meth:`Store.record_heartbeat`) and they
are written together, one transaction for the whole fleet, at most every
HEARTBEAT_FLUSH_S (:meth:`Store.flush_heartbeats`) and at :meth:`Store.close`. This
Store's own readers (``appliance``, ``appliances``) see the latest heartbeat at once;
another process reading the database (``fedge coordinator status``, ``submit``) sees
it at most one flush old, and a coordinator killed loses at most that much of its
sites' last_seen and health, which the next heartbeats restore.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.secagg.errors import SecAggConfigError
from fedge.secagg.keys import check_client_id

# The disk refusing a write for now (full, over quota, read-only, failing): what the
# coordinator waits out (a queued job's starting model) or retries (an export).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

SCHEMA_VERSION = 3
DB_NAME = "coordinator.sqlite3"
# SQLite's unix VFS keeps a database's full path (symlinks resolved) in a 512-byte
# buffer that must also hold the "-journal" suffix: a longer path fails to open with
# only "unable to open database file", so that error names the length and this limit.
SQLITE_PATH_LIMIT = 504

APPLIANCE_STATUSES = ("enrolled", "revoked")
JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
# "interrupted": the attempt in progress when the coordinator stopped, recorded when
# a restarted coordinator resumes the job (not counted among its failed attempts)
# "cancelled": the attempt in progress when its job was cancelled (never retried, and
# not counted among the job's failed attempts)
ROUND_STATUSES = ("committed", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS appliances (
    site_id TEXT PRIMARY KEY,
    curve_public_z85 TEXT NOT NULL UNIQUE,
    ed25519_public BLOB NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('enrolled', 'revoked')),
    version TEXT NOT NULL DEFAULT '',
    last_seen REAL,
    health_json TEXT NOT NULL DEFAULT '{}',
    eligible INTEGER NOT NULL DEFAULT 1,
    eligibility_reason TEXT NOT NULL DEFAULT '',
    datasets_json TEXT NOT NULL DEFAULT '[]',
    current_task TEXT NOT NULL DEFAULT '',
    enrolled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    ed25519_public BLOB NOT NULL,
    role TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    plan_toml TEXT NOT NULL,
    status TEXT NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    committed_round INTEGER NOT NULL DEFAULT 0,
    failed_attempts INTEGER NOT NULL DEFAULT 0,
    final_digest TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    cohort_json TEXT NOT NULL,
    survivors_json TEXT NOT NULL,
    dropped_json TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (job_id, round, attempt)
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    split TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    n_examples INTEGER NOT NULL,
    PRIMARY KEY (job_id, round, site, split, name)
);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    state_json TEXT NOT NULL,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

# _SCHEMA above is version 1. Schema version -> the statements that bring a database
# of the version before it up to it; at open, every step a database lacks runs, in
# one transaction with the version's update (a new database takes them all).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # the survivor set each round's unmasking was asked over, so that a round retried
    # after a crash is summed over the same sites (fedge.coordinator.service)
    2: ("""CREATE TABLE IF NOT EXISTS unmask_sets (
            job_id TEXT NOT NULL,
            round INTEGER NOT NULL,
            survivors_json TEXT NOT NULL,
            recorded_at REAL NOT NULL,
            PRIMARY KEY (job_id, round))""",),
    # each site's privacy-ledger high-water mark (module doc; Store.note_ledger_released)
    # and every CURVE key a site was revoked with (module doc; Store.enrol, Store.revoke):
    # the sites revoked before the table existed bring their key, with no time, and so
    # does every key the audit log says was enrolled that no enrolled site holds now (a
    # site revoked and enrolled again with a new key, or re-keyed, before the table)
    3: ("""CREATE TABLE IF NOT EXISTS ledger_marks (
            site_id TEXT PRIMARY KEY,
            released INTEGER NOT NULL,
            rolled_back_to INTEGER,
            updated_at REAL NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS revoked_keys (
            curve_public_z85 TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            revoked_at REAL)""",
        """INSERT OR IGNORE INTO revoked_keys(curve_public_z85, site_id, revoked_at)
            SELECT curve_public_z85, site_id, NULL FROM appliances
            WHERE status = 'revoked'""",
        """INSERT OR IGNORE INTO revoked_keys(curve_public_z85, site_id, revoked_at)
            SELECT json_extract(detail, '$.curve_public'), json_extract(detail, '$.site'),
                   NULL
            FROM audit
            WHERE action = 'enrol' AND json_valid(detail)
              AND typeof(json_extract(detail, '$.curve_public')) = 'text'
              AND typeof(json_extract(detail, '$.site')) = 'text'
              AND json_extract(detail, '$.curve_public') NOT IN (
                  SELECT curve_public_z85 FROM appliances WHERE status != 'revoked')"""),
}

# The job an audit entry is about: its JSON detail's "job", NULL for any other detail.
# audit_log selects with this very expression, so that SQLite uses the index below.
_AUDIT_JOB = "CASE WHEN json_valid(detail) THEN json_extract(detail, '$.job') END"

# Indexes change no query's answer, only its cost: they are made at every open when
# missing, outside the version (a release without one opens the database all the same,
# so adding one need not make a downgrade refuse it, as a migration step would).
# audit_by_action_job: `jobs status` reads a job's final_test entry (audit_log with
# action and job); without it every entry ever audited is read, on the event loop.
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS audit_by_action_job ON audit(action, ({_AUDIT_JOB}));
"""
# outside the version too (module doc): what a release without it ignores
_UNVERSIONED_TABLES = """
CREATE TABLE IF NOT EXISTS eval_missing (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    reasons_json TEXT NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS left_out (
    job_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    reasons_json TEXT NOT NULL,
    PRIMARY KEY (job_id, round)
);
CREATE TABLE IF NOT EXISTS declared_inputs (
    site_id TEXT PRIMARY KEY,
    inputs_json TEXT NOT NULL
);
"""


# How long a write waits for another connection's lock. At open it is shorter: the
# other writers (`fedge coordinator submit/enrol`, the console's calls) hold the lock
# for milliseconds, so a lock still held after seconds is a process that keeps it
# (another coordinator), and saying so beats a silent half-minute wait.
BUSY_TIMEOUT_S = 30.0
OPEN_BUSY_TIMEOUT_S = 5.0
# The running coordinator's writes wait less: it handles every message on one event
# loop, which also sends systemd's watchdog pings, and a write waiting for an
# operator's sqlite3 shell (BEGIN IMMEDIATE) would freeze it. Once a write found the
# lock held that long, the following ones fail at once (a try, not a wait) until one
# succeeds or BUSY_QUIET_S pass without a try failing: the loop is blocked once per
# lock, not once per write (fedge.coordinator.process backs off meanwhile).
SERVICE_BUSY_TIMEOUT_S = 1.5
BUSY_QUIET_S = 5.0
# Held heartbeats are written at most this often (module doc): one transaction per
# interval for the whole fleet, however many sites beat how often.
HEARTBEAT_FLUSH_S = 5.0
# reports at or above its mark, in a row, that clear a site flagged as rolled back
LEDGER_CLEAR_REPORTS = 3


# a held heartbeat's columns (Store.record_heartbeat), then its site
_HEARTBEAT_UPDATE = (
    "UPDATE appliances SET version=?, last_seen=?, health_json=?, eligible=?,"
    " eligibility_reason=?, datasets_json=?, current_task=? WHERE site_id=?")


class StoreError(Exception):
    """A request the registry cannot satisfy (unknown site, duplicate key, ...)."""


CORRUPT_HINT = "restore it from a backup, or move it aside to start empty"


def is_corrupt(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the database file is damaged (not a database, malformed)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite saying another connection holds the lock (SQLITE_BUSY,
    SQLITE_LOCKED): the database is fine, a write has to wait for its turn."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def database_error(path: Path, exc: sqlite3.Error) -> str:
    """One line naming the database file and what SQLite said about it; for a corrupt
    one, also what the operator can do; for a disk error on a full or read-only file
    system, that (disk_note)."""
    if is_corrupt(exc):
        return f"database {path} is corrupt: {exc} ({CORRUPT_HINT})"
    return f"database {path}: {type(exc).__name__}: {exc}{disk_note(path.parent, exc)}"


# A file system with less than this left (for the caller) is called full: SQLite needs
# room for its -wal and its 32 KiB -shm to open a database in WAL mode at all.
FULL_BELOW_BYTES = 1 << 20
# what SQLite says when the disk refuses it: "disk I/O error", "database or disk is
# full", "unable to open database file", "attempt to write a readonly database"
_DISK_CODES = (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
               sqlite3.SQLITE_READONLY)


def disk_note(directory: Path, exc: sqlite3.Error | None = None) -> str:
    """Why SQLite's "disk I/O error" (and the like) may be the disk's: "; the file
    system holding DIR is full (N bytes free)" or "... is mounted read-only"; "" when
    ``exc`` is no such error or the file system is neither (os.statvfs)."""
    if exc is not None:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None or code & 0xFF not in _DISK_CODES:
            return ""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    if st.f_flag & os.ST_RDONLY:
        return f"; the file system holding {directory} is mounted read-only"
    free = st.f_bavail * st.f_frsize
    if free < FULL_BELOW_BYTES:
        return f"; the file system holding {directory} is full ({free} bytes free)"
    if st.f_files and st.f_favail == 0:
        return f"; the file system holding {directory} has no free inodes"
    return ""


def coordinator_running(state_dir: Path) -> bool:
    """Whether a coordinator holds ``state_dir``'s lock (fedge.instance_lock: a
    ``lockf`` of coordinator.lock, or on a read-only file system a ``flock`` of the
    directory), tested without taking it. Not for the process that holds it: closing
    the test's descriptor would drop a POSIX lock this process held on the file."""
    lock = Path(state_dir) / "coordinator.lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    except OSError:
        return True  # cannot tell: taken as running
    if fd >= 0:
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
    try:
        dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(dfd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(dfd)
    return False


def open_read_only(path: Path) -> sqlite3.Connection:
    """``path`` opened read-only (SQLite ``mode=ro``): nothing is created, migrated or
    locked for writing, and a running coordinator's writes go on meanwhile. Where that
    cannot be opened because SQLite cannot make the -shm file beside it (a full disk,
    a read-only file system, after a clean stop removed it), it is opened as
    ``immutable=1`` (no -shm, no locks), but only where that reads what is there: no
    -wal file holding writes (a clean stop leaves none) and no coordinator running on
    the directory (coordinator_running), whose writes immutable would not see.

    Raises:
        sqlite3.Error: it cannot be read either way (the first error).
    """
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=OPEN_BUSY_TIMEOUT_S)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_locked(exc) or is_corrupt(exc):
            raise
        wal = path.with_name(path.name + "-wal")
        try:
            pending = wal.stat().st_size > 0
        except FileNotFoundError:
            pending = False
        if pending or coordinator_running(path.parent):
            raise
        first = exc
    conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        conn.close()
        raise first from None
    return conn


class StoreNeedsWrite(Exception):
    """A database opened read-only that this release must bring up to date (an older
    schema version, or a table made at open missing) before it can read it."""


# A detail's field, NULL when the detail is not JSON (as _AUDIT_JOB).
def _audit_field(name: str) -> str:
    return f"CASE WHEN json_valid(detail) THEN json_extract(detail, '$.{name}') END"


def read_audit(conn: sqlite3.Connection, *, actions: Sequence[str] = (),
               job: str | None = None, site: str | None = None, actor: str | None = None,
               since: float | None = None, limit: int = 1000,
               scan: int | None = None, until_id: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` audit entries that match, oldest first: ``actions`` (any
    of them, exactly), ``job`` (a JSON detail's "job"), ``site`` (the actor, or a JSON
    detail's "site" or "accused": what a site did and what was found about it),
    ``actor`` (exactly: "operator:NAME", "coordinator", a site), ``since`` (a Unix
    time: entries written at or after it), ``until_id`` (entries with an id at most
    it: those written up to a given one, e.g. ``Store.audit_id_at_open``). ``scan``
    bounds the work: only the newest ``scan`` entries are looked at, whatever matches
    (the admin channel answers on the coordinator's event loop). Takes a connection,
    not a Store: `fedge coordinator audit` reads a database opened read-only.

    Without ``scan``, ``actions`` (and ``job``) are read from the index
    audit_by_action_job, and any other query walks the table from the newest entry
    back to the ``limit``-th match: the whole table when fewer match.

    Raises: sqlite3.Error."""
    where: list[str] = []
    args: list[Any] = []
    if scan is not None:
        # the newest `scan` ids, walked by rowid: "+action" keeps SQLite off the index,
        # whose matches for a frequent action (late_message) grow without bound
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0]
        where.append("id > ?")
        args.append(newest - scan)
    if actions:
        column = "+action" if scan is not None else "action"
        where.append(f"{column} IN ({', '.join('?' * len(actions))})")
        args += list(actions)
    if job is not None:
        where.append(f"{_AUDIT_JOB} = ?")
        args.append(job)
    if site is not None:
        where.append(f"(actor = ? OR {_audit_field('site')} = ? "
                     f"OR {_audit_field('accused')} = ?)")
        args += [site, site, site]
    if actor is not None:
        where.append("actor = ?")
        args.append(actor)
    if since is not None:
        where.append("time >= ?")
        args.append(since)
    if until_id is not None:
        where.append("id <= ?")
        args.append(until_id)
    q = "SELECT id, time, actor, action, detail FROM audit"
    if where:
        q += " WHERE " + " AND ".join(where)
    rows = conn.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
    return [{"id": r[0], "time": r[1], "actor": r[2], "action": r[3], "detail": r[4]}
            for r in reversed(rows)]


@dataclass(frozen=True)
class Appliance:
    site_id: str
    curve_public_z85: str
    ed25519_public: bytes
    status: str
    version: str
    last_seen: float | None
    health: dict[str, Any]
    eligible: bool
    eligibility_reason: str
    datasets: list[str]
    current_task: str
    enrolled_at: float
    # the most released runs this site's privacy ledger has reported (None: it never
    # reported any), and how many it holds now when that is fewer: its ledger went back
    # (Store.note_ledger_released); None when it has not
    ledger_mark: int | None = None
    ledger_rolled_back_to: int | None = None

    @property
    def ledger_rollback(self) -> str:
        """Why this site is left out of every new cohort, its privacy ledger holding
        fewer released runs than it reported before; "" when it does not."""
        if self.ledger_rolled_back_to is None or self.ledger_mark is None:
            return ""
        return ledger_rollback_reason(self.site_id, self.ledger_rolled_back_to,
                                      self.ledger_mark)

    def to_dict(self) -> dict[str, Any]:
        rollback = self.ledger_rollback if self.status == "enrolled" else ""
        return {
            "site_id": self.site_id,
            "curve_public_z85": self.curve_public_z85,
            "ed25519_public": self.ed25519_public.hex(),
            "status": self.status,
            "version": self.version,
            "last_seen": self.last_seen,
            "health": self.health,
            # what the registry's default (1) says of a site never heard from, or
            # revoked, is no verdict: neither can join a cohort
            "eligible": self.eligible and self.status == "enrolled"
            and self.last_seen is not None and not rollback,
            "eligibility_reason": (
                rollback if rollback
                else self.eligibility_reason if self.status == "enrolled"
                and self.last_seen is not None
                else "revoked" if self.status == "revoked"
                else f"{self.status}" if self.status != "enrolled"
                else "no health report yet (never connected)"),
            "datasets": self.datasets,
            "current_task": self.current_task,
            "enrolled_at": self.enrolled_at,
            # absent for a site whose agent never reported its ledger (one before the
            # field, or one keeping none)
            **({} if self.ledger_mark is None else {"privacy_ledger": {
                "released_mark": self.ledger_mark,
                "released_now": (self.ledger_mark if self.ledger_rolled_back_to is None
                                 else self.ledger_rolled_back_to),
                "rolled_back": self.ledger_rolled_back_to is not None}}),
        }


# the audit actions of a site's privacy-ledger mark (Store.note_ledger_released, ledger_ack)
LEDGER_ROLLED_BACK = "privacy_ledger_rolled_back"
LEDGER_CAUGHT_UP = "privacy_ledger_caught_up"
LEDGER_ACCEPTED = "privacy_ledger_accepted"


def ledger_rollback_reason(site: str, now: int, was: int) -> str:
    """Why ``site`` is left out of every new cohort: its ledger holds ``now`` released
    runs, fewer than the ``was`` it reported before."""
    return (f"{site}'s privacy ledger holds {now} released runs, fewer than the {was} it "
            "reported before (restored from a backup?): its privacy budget cannot be "
            "trusted; the site's operator must restore the newer ledger, or the "
            f"coordinator's operator runs `fedge console ledger-ack {site}` to accept the "
            "lower count")


@dataclass(frozen=True)
class LedgerEvent:
    """A change of a site's privacy-ledger state worth saying (Store.note_ledger_released):
    ``action`` LEDGER_ROLLED_BACK (it reported ``now`` released runs, fewer than the
    mark ``was``) or LEDGER_CAUGHT_UP (it reports ``now`` >= ``was`` again)."""
    site: str
    action: str
    was: int
    now: int


@dataclass(frozen=True)
class Job:
    job_id: str
    plan_toml: str
    status: str
    submitted_by: str
    submitted_at: float
    updated_at: float
    committed_round: int
    failed_attempts: int
    final_digest: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("plan_toml")
        return d


@dataclass(frozen=True)
class RoundRecord:
    job_id: str
    round: int
    attempt: int
    status: str
    started_at: float
    ended_at: float
    cohort: list[str]
    survivors: list[str]
    dropped: list[str]
    model_digest: str
    reason: str
    # site -> why it was left out of this attempt (module doc); {} for older rows
    dropped_reasons: dict[str, str] = field(default_factory=dict)
    # a committed round's survivor -> why it is not in the round's evaluation
    eval_missing: dict[str, str] = field(default_factory=dict)
    # a committed round's enrolled site not in its cohort -> why (the cohort's exclusion)
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CancelledAttempt:
    """The attempt at round ``round`` in progress when its job was cancelled, as
    :meth:`Store.set_job_status` records it (status "cancelled"): its cohort had been
    asked to train, so sites may have trained and released an update in it."""
    round: int
    started_at: float
    cohort: list[str]
    reason: str
    # each cohort site that had refused or been lost by then, and why
    dropped_reasons: dict[str, str] = field(default_factory=dict)
    # the sites whose updates the round's sum held, when it was formed before the
    # cancel (the round was being evaluated): a release each (report.client_privacy)
    survivors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InterruptedAttempt:
    """The attempt at round ``round`` in progress when the coordinator stopped (killed,
    restarted), as a restarted coordinator resuming the job records it
    (:meth:`Store.interrupted_round`, status "interrupted"): its cohort had been asked
    to train, so sites may have trained and released an update in it."""
    round: int
    started_at: float
    # the last the database heard of the coordinator before it stopped (a lower bound:
    # when it stopped is written nowhere)
    ended_at: float
    cohort: list[str]
    reason: str
    # the sites whose updates the round's sum held, when it was formed before the stop
    # (the round was being evaluated): a release each (report.client_privacy)
    survivors: list[str] = field(default_factory=list)


class Store:
    """Thread-safe access to ``<state_dir>/coordinator.sqlite3``.

    ``clock``: the wall clock (``time.time``) that dates every row it writes; nothing
    here measures time with it (the lock's timers read ``time.monotonic``).
    ``monotonic``: what measures HEARTBEAT_FLUSH_S between heartbeat flushes (the
    coordinator passes its own clock, so its tests step it).

    ``busy_timeout_s``: how long a write waits for another connection's lock
    (BUSY_TIMEOUT_S for the short-lived commands; the running coordinator passes
    SERVICE_BUSY_TIMEOUT_S). A write that finds the lock held raises
    ``sqlite3.OperationalError`` (``is_locked``); ``lock_waits`` counts those that
    waited busy_timeout_s first (the others failed at once, BUSY_QUIET_S), and
    ``locked_since`` says since when (monotonic) writes have been failing so, None
    once one succeeds.

    ``read_only``: opened with :func:`open_read_only` for a command that only reads
    (``fedge coordinator status``): nothing is made or written, so it reads on a full
    or read-only disk too; raises StoreNeedsWrite where the database must first be
    brought up to date (an older release's), and the state directory is not made.

    Raises:
        StoreError: on opening a database whose schema version is newer than
            this code's, one that is not an SQLite database or fails SQLite's
            ``quick_check`` (corrupt), one another process holds locked for
            longer than OPEN_BUSY_TIMEOUT_S, or one SQLite cannot open at all (a
            path past SQLITE_PATH_LIMIT bytes is named as such).
    """

    def __init__(self, state_dir: str | Path, *, clock: Any = time.time,
                 busy_timeout_s: float = BUSY_TIMEOUT_S,
                 monotonic: Any = time.monotonic, read_only: bool = False) -> None:
        self.state_dir = Path(state_dir)
        if not read_only:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DB_NAME
        self._clock = clock
        self._lock = threading.RLock()
        self._busy_timeout_s = busy_timeout_s
        self.lock_waits = 0
        self.locked_since: float | None = None
        self._busy_at = float("-inf")  # monotonic: when a write last found the lock held
        # site -> its latest heartbeat's appliances columns, not yet written (module doc)
        self._heartbeats: dict[str, tuple[Any, ...]] = {}
        # site -> what its latest heartbeat declared of its data sets (JSON), not yet
        # written; site -> the JSON last written (unchanged declarations are not rewritten)
        self._inputs: dict[str, str] = {}
        self._inputs_written: dict[str, str] = {}
        self._monotonic = monotonic
        self._heartbeats_tried_at = monotonic()  # the last flush that wrote or failed
        # site -> (its privacy-ledger mark, the fewer runs it reports now or None), as
        # ledger_marks holds them once written; site -> the change not written yet (a
        # locked database) with the events it is, written by the site's next report
        self._ledger_marks: dict[str, tuple[int, int | None]] = {}
        self._ledger_unwritten: dict[str, list[LedgerEvent]] = {}
        # marks that only rose (no event): written with the next heartbeat flush
        self._ledger_rose: set[str] = set()
        # a flagged site's reports at or above its mark in a row (LEDGER_CLEAR_REPORTS)
        self._ledger_streak: dict[str, int] = {}
        self.audit_id_at_open = 0  # set by _open (the newest entry before it)
        if read_only:
            self._open_read_only()
            return
        try:
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None,
                timeout=OPEN_BUSY_TIMEOUT_S,
            )
        except sqlite3.DatabaseError as exc:
            raise StoreError(self._open_refused(exc)) from exc
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(self._open_refused(exc)) from exc
        except BaseException:
            self._conn.close()
            raise
        self._set_busy_timeout(busy_timeout_s)

    @property
    def busy_timeout_s(self) -> float:
        """How long a write waits for another connection's lock (class docstring)."""
        return self._busy_timeout_s

    @busy_timeout_s.setter
    def busy_timeout_s(self, seconds: float) -> None:
        with self._lock:
            self._busy_timeout_s = seconds
            self._set_busy_timeout(seconds)

    def _set_busy_timeout(self, seconds: float) -> None:
        self._conn.execute(f"PRAGMA busy_timeout={int(seconds * 1000)}")

    def _open_refused(self, exc: sqlite3.DatabaseError) -> str:
        if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return (f"database {self.path} is locked by another process (still after "
                    f"{OPEN_BUSY_TIMEOUT_S:.0f} s): another coordinator on the same state "
                    f"dir, or a command still writing to it? ({exc})")
        reason = f"cannot open database {self.path}: {exc}"
        length = len(os.fsencode(os.path.realpath(self.path)))
        if length > SQLITE_PATH_LIMIT:
            return (f"cannot open database {self.path}: its full path, symlinks resolved, "
                    f"is {length} bytes, past SQLite's limit of {SQLITE_PATH_LIMIT}; give "
                    f"the coordinator a shorter state_dir ({exc})")
        if is_corrupt(exc):
            reason += f" (corrupt: {CORRUPT_HINT})"
        return reason + disk_note(self.state_dir, exc)

    def _open_read_only(self) -> None:
        """``read_only``: the database opened with open_read_only (nothing created,
        migrated or written; on a full or read-only disk too), checked as _open checks
        it.

        Raises:
            StoreError: as the class says. StoreNeedsWrite: this release must bring the
                database up to date first (a read-write open does).
        """
        if not self.path.is_file():
            raise StoreError(f"cannot open database {self.path}: no such file")
        try:
            conn = open_read_only(self.path)
        except sqlite3.DatabaseError as exc:
            raise StoreError(self._open_refused(exc)) from exc
        conn.isolation_level = None
        self._conn = conn
        try:
            problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                first = " ".join(problems[0].split())
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise StoreError(f"cannot open database {self.path}: quick_check found "
                                 f"{first}{more} (corrupt: {CORRUPT_HINT})")
            tables = {str(r[0]) for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'"
                               ).fetchone() if "meta" in tables else None
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {row[0]}, newer than this "
                    f"fedge's {SCHEMA_VERSION}; upgrade fedge before opening it")
            needed = {"eval_missing", "left_out", "declared_inputs", "ledger_marks"}
            if row is None or int(row[0]) < SCHEMA_VERSION or not needed <= tables:
                raise StoreNeedsWrite(f"database {self.path} is to be brought up to date")
            self._ledger_marks = {
                str(r[0]): (int(r[1]), None if r[2] is None else int(r[2]))
                for r in conn.execute(
                    "SELECT site_id, released, rolled_back_to FROM ledger_marks")}
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(self._open_refused(exc)) from exc
        except BaseException:
            conn.close()
            raise

    def _open(self) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # A damaged page past the header opens fine and fails only the queries that
        # touch it, as a traceback deep in a command: check every page once, here.
        problems = [str(r[0]) for r in self._conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            first = " ".join(problems[0].split())  # SQLite's report spans lines
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"cannot open database {self.path}: quick_check found {first}"
                             f"{more} (corrupt: {CORRUPT_HINT})")
        # executescript commits implicitly, so run it outside our BEGIN.
        with self._lock:
            self._conn.executescript(_SCHEMA + _INDEXES + _UNVERSIONED_TABLES)
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = 1 if row is None else int(row[0])  # new: _SCHEMA just made version 1
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"database {self.path} has schema version {row[0]}, newer than this "
                    f"fedge's {SCHEMA_VERSION}; upgrade fedge before opening it"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    c.execute(statement)
            c.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (str(SCHEMA_VERSION),))
            # the newest entry written before this Store opened (0: none), by an
            # earlier process: what a coordinator knows of its predecessor's last act
            self.audit_id_at_open = int(
                c.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()[0])
            if row is not None and version < SCHEMA_VERSION:
                self._audit(c, "coordinator", "schema_migrated",
                            {"from": version, "to": SCHEMA_VERSION})
            self._ledger_marks = {
                str(r[0]): (int(r[1]), None if r[2] is None else int(r[2]))
                for r in c.execute(
                    "SELECT site_id, released, rolled_back_to FROM ledger_marks")}

    def close(self) -> None:
        """Write the heartbeats still held, then close.

        Raises:
            sqlite3.Error: they could not be written (the connection is closed all the same).
        """
        with self._lock:
            try:
                self.flush_heartbeats(force=True)
            finally:
                self._heartbeats.clear()
                self._inputs.clear()
                self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._begin()
            try:
                yield self._conn
            except BaseException:
                # SQLite rolls back by itself after some errors (SQLITE_FULL, IOERR):
                # a second ROLLBACK would raise and hide the error that matters
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                # a COMMIT that failed (disk full) may leave the transaction open, and
                # every later BEGIN would then fail: end it, so a retry starts clean
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._lock_free()

    def _begin(self) -> None:
        """BEGIN IMMEDIATE: the write lock, waited for busy_timeout_s, or not at all while
        the lock has just been found held (SERVICE_BUSY_TIMEOUT_S above).

        Raises:
            sqlite3.OperationalError: the lock is held (``is_locked``), or SQLite failed.
        """
        now = time.monotonic()
        wait = now - self._busy_at >= BUSY_QUIET_S
        try:
            self._begin_immediate(wait=wait)
        except sqlite3.OperationalError as exc:
            if is_locked(exc):
                self.lock_waits += wait
                if self.locked_since is None:
                    self.locked_since = now
            raise

    def _begin_immediate(self, *, wait: bool) -> None:
        """BEGIN IMMEDIATE, waiting busy_timeout_s for the lock, or (``wait`` False) not at
        all; a lock found held starts BUSY_QUIET_S anew.

        Raises:
            sqlite3.OperationalError: the lock is held (``is_locked``), or SQLite failed.
        """
        if not wait:
            self._set_busy_timeout(0)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if is_locked(exc):
                self._busy_at = time.monotonic()
            raise
        finally:
            if not wait:
                self._set_busy_timeout(self.busy_timeout_s)

    def _lock_free(self) -> None:
        """The write lock was had: the next write waits for it again, and writes are no
        longer failing on it."""
        self._busy_at = float("-inf")
        self.locked_since = None

    def writable(self) -> bool:
        """Whether the write lock can be had now: taken and given back at once, without
        waiting. True ends ``locked_since``.

        Raises:
            sqlite3.OperationalError: SQLite failed otherwise than on the lock.
        """
        with self._lock:
            try:
                self._begin_immediate(wait=False)
            except sqlite3.OperationalError as exc:
                if is_locked(exc):
                    return False
                raise
            self._conn.execute("ROLLBACK")
            self._lock_free()
            return True

    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key='schema_version'"
            ).fetchone()
        return int(row[0])

    # -- audit ------------------------------------------------------------------

    def _audit(self, c: sqlite3.Connection, actor: str, action: str, detail: Any) -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True)
        c.execute(
            "INSERT INTO audit(time, actor, action, detail) VALUES (?, ?, ?, ?)",
            (self._clock(), actor, action, text),
        )

    def audit(self, actor: str, action: str, detail: Any = "") -> None:
        """Append one audit entry (its own transaction)."""
        with self._tx() as c:
            self._audit(c, actor, action, detail)

    def audit_log(self, *, action: str | None = None, job: str | None = None,
                  limit: int = 1000, actions: Sequence[str] = (), site: str | None = None,
                  actor: str | None = None, since: float | None = None,
                  scan: int | None = None,
                  until_id: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first (:func:`read_audit`: ``action``
        and ``actions`` together are the actions asked for)."""
        wanted = (*actions, *(() if action is None else (action,)))
        with self._lock:
            return read_audit(self._conn, actions=wanted, job=job, site=site, actor=actor,
                              since=since, limit=limit, scan=scan, until_id=until_id)

    # min and max in one SELECT make SQLite scan the whole table (its quick path takes
    # one aggregate alone): two subqueries read one row each, whatever the log's size
    AUDIT_ID_SPAN_SQL = "SELECT (SELECT min(id) FROM audit), (SELECT max(id) FROM audit)"

    def audit_id_span(self) -> tuple[int, int] | None:
        """The oldest and newest audit entry's id; None when there is none."""
        with self._lock:
            row = self._conn.execute(self.AUDIT_ID_SPAN_SQL).fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]))

    # -- appliances ---------------------------------------------------------------

    def enrol(self, site_id: str, curve_public_z85: str, ed25519_public: bytes, *,
              actor: str) -> Appliance:
        """Register (or re-enrol a revoked) appliance. A revoked site comes back only
        with a new CURVE key: every key any site was revoked with stays refused
        (``revoked_keys``), whichever path enrols it (the admin channel, the host
        command `fedge coordinator enrol`). An enrolled site is not re-keyed: it is
        revoked first, as the admin channel requires (there is no override there, so
        none here). Enrolling an enrolled site with its own key again is allowed.

        Raises:
            StoreError: the site id breaks the site-name rule (`check_client_id`,
                the console's), the CURVE key is not 40 z85 characters, the
                Ed25519 key is not 32 bytes, the CURVE key already belongs to
                another site, the CURVE key was revoked (for this site or another),
                the site is enrolled with another CURVE key, or an enrolled site
                has the same id except for case.
        """
        try:
            check_client_id(site_id, what="site id")
        except SecAggConfigError as exc:
            raise StoreError(str(exc)) from None
        if len(curve_public_z85) != 40:
            raise StoreError(
                f"CURVE public key for {site_id!r} has {len(curve_public_z85)} characters; "
                "a z85 CURVE key has 40"
            )
        if len(ed25519_public) != 32:
            raise StoreError(
                f"Ed25519 public key for {site_id!r} has {len(ed25519_public)} bytes;"
                " it must have 32"
            )
        now = self._clock()
        with self._tx() as c:
            revoked = c.execute(
                "SELECT site_id FROM revoked_keys WHERE curve_public_z85 = ?",
                (curve_public_z85,),
            ).fetchone()
            if revoked is not None:
                whose = (f"site {site_id!r} was revoked with this CURVE key"
                         if revoked[0] == site_id else
                         f"this CURVE key was revoked (site {revoked[0]!r})")
                raise StoreError(
                    f"{whose} ({curve_public_z85}); a revoked key cannot be enrolled "
                    f"again: enrol the site with a new identity (`fedge console enrol "
                    f"{site_id}`)"
                )
            held = c.execute(
                "SELECT curve_public_z85 FROM appliances WHERE site_id = ?"
                " AND status = 'enrolled'",
                (site_id,),
            ).fetchone()
            if held is not None and held[0] != curve_public_z85:
                raise StoreError(
                    f"site {site_id!r} is enrolled with another CURVE key ({held[0]}); a "
                    "site is not re-keyed while enrolled: revoke it first (`fedge console "
                    f"revoke {site_id}`, then `fedge console enrol {site_id}`)"
                )
            other = c.execute(
                "SELECT site_id FROM appliances WHERE curve_public_z85 = ? AND site_id != ?",
                (curve_public_z85, site_id),
            ).fetchone()
            if other is not None:
                raise StoreError(
                    f"CURVE key {curve_public_z85} is already enrolled for site {other[0]!r}"
                )
            twin = c.execute(
                "SELECT site_id FROM appliances WHERE lower(site_id) = lower(?)"
                " AND site_id != ? AND status = 'enrolled'",
                (site_id, site_id),
            ).fetchone()
            if twin is not None:
                raise StoreError(
                    f"site id {site_id!r} differs from the enrolled site {twin[0]!r} only in "
                    "case; site ids must differ in more than case"
                )
            c.execute(
                "INSERT INTO appliances(site_id, curve_public_z85, ed25519_public, status,"
                " enrolled_at) VALUES (?, ?, ?, 'enrolled', ?)"
                " ON CONFLICT(site_id) DO UPDATE SET curve_public_z85=excluded.curve_public_z85,"
                " ed25519_public=excluded.ed25519_public, status='enrolled',"
                " enrolled_at=excluded.enrolled_at",
                (site_id, curve_public_z85, bytes(ed25519_public), now),
            )
            self._audit(c, actor, "enrol", {"site": site_id, "curve_public": curve_public_z85})
        return self.appliance(site_id)

    def revoke(self, site_id: str, *, actor: str) -> Appliance:
        """Mark an appliance revoked.

        Raises:
            StoreError: unknown site.
        """
        with self._lock:
            held = self._heartbeats.get(site_id)
            with self._tx() as c:
                if held is not None:  # first: flushed later, it would undo current_task=''
                    c.execute(_HEARTBEAT_UPDATE, (*held, site_id))
                cur = c.execute(
                    "UPDATE appliances SET status='revoked', current_task='' WHERE site_id = ?",
                    (site_id,),
                )
                if cur.rowcount == 0:
                    raise StoreError(f"cannot revoke unknown site {site_id!r}")
                # kept apart from the row, which a re-enrolment re-keys (Store.enrol)
                c.execute(
                    "INSERT OR IGNORE INTO revoked_keys(curve_public_z85, site_id, revoked_at)"
                    " SELECT curve_public_z85, site_id, ? FROM appliances WHERE site_id = ?",
                    (self._clock(), site_id),
                )
                # what it declared of its data sets is not the fleet's any more (a site
                # enrolled again under the name declares its own with its heartbeats)
                c.execute("DELETE FROM declared_inputs WHERE site_id = ?", (site_id,))
                self._audit(c, actor, "revoke", {"site": site_id})
            self._heartbeats.pop(site_id, None)
            self._inputs.pop(site_id, None)
            # or a re-enrolled site's first declaration, the same as before, is not written
            self._inputs_written.pop(site_id, None)
        return self.appliance(site_id)

    def appliance(self, site_id: str) -> Appliance:
        """Raises: StoreError: unknown site."""
        with self._lock:
            row = self._conn.execute(
                "SELECT * FROM appliances WHERE site_id = ?", (site_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown site {site_id!r}")
            return _appliance(self._with_heartbeat(row), self._ledger_marks.get(site_id))

    def appliances(self, *, status: str | None = None) -> list[Appliance]:
        q = "SELECT * FROM appliances"
        args: tuple[Any, ...] = ()
        if status is not None:
            q += " WHERE status = ?"
            args = (status,)
        with self._lock:
            rows = self._conn.execute(q + " ORDER BY site_id", args).fetchall()
            return [_appliance(self._with_heartbeat(r), self._ledger_marks.get(r[0]))
                    for r in rows]

    def _with_heartbeat(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """An appliances row with its site's held heartbeat, if any, in place of the
        written one (the caller holds the lock)."""
        held = self._heartbeats.get(row[0])
        return row if held is None else (*row[:4], *held, *row[11:])

    def site_for_key(self, curve_public_z85: str) -> str | None:
        """The enrolled (not revoked) site holding this CURVE key, if any."""
        with self._lock:
            row = self._conn.execute(
                "SELECT site_id FROM appliances WHERE curve_public_z85 = ? AND status='enrolled'",
                (curve_public_z85,),
            ).fetchone()
        return None if row is None else str(row[0])

    def allowed_keys(self) -> set[str]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT curve_public_z85 FROM appliances WHERE status='enrolled'"
            ).fetchall()
        return {r[0] for r in rows}

    def record_heartbeat(self, site_id: str, *, version: str, health: dict[str, Any],
                         eligible: bool, reason: str, datasets: list[str],
                         current_task: str, inputs: dict[str, Any] | None = None) -> None:
        """Hold ``site_id``'s heartbeat (seen now) as its latest, replacing the one held;
        this Store's readers see it at once, the database once it is flushed (module
        doc), which this call does when HEARTBEAT_FLUSH_S has passed since the last.
        ``inputs``: what the DatasetClasses before it declared of the site's data sets
        (a JSON object, :meth:`declared_inputs`; {} for nothing); None keeps the last.

        Raises:
            StoreError: unknown site (nothing is held).
            sqlite3.OperationalError: the flush due failed (the heartbeat is held all
                the same, and written by a later flush).
        """
        with self._lock:
            # a site held already was checked when first held (rows are never deleted;
            # revoke drops what it holds), so the lookup is once per site, not per beat
            if site_id not in self._heartbeats and self._conn.execute(
                    "SELECT 1 FROM appliances WHERE site_id=?", (site_id,)).fetchone() is None:
                raise StoreError(f"heartbeat from unknown site {site_id!r}")
            self._heartbeats[site_id] = (
                version, self._clock(), json.dumps(health, sort_keys=True, default=str),
                int(eligible), reason, json.dumps(sorted(datasets)), current_task)
            if inputs is not None:
                text = json.dumps(inputs, sort_keys=True)
                if text != self._inputs_written.get(site_id):
                    self._inputs[site_id] = text
                else:
                    self._inputs.pop(site_id, None)
            self.flush_heartbeats()

    def flush_heartbeats(self, *, force: bool = False) -> int:
        """Write every held heartbeat in one transaction, if HEARTBEAT_FLUSH_S has passed
        since the last try (``force``: now); returns how many were written. A failed
        write keeps them held, for the next try.

        Raises:
            sqlite3.OperationalError: the database cannot take the write now (locked,
                disk full).
        """
        with self._lock:
            now = self._monotonic()
            if not (self._heartbeats or self._ledger_rose) or (
                    not force and now - self._heartbeats_tried_at < HEARTBEAT_FLUSH_S):
                return 0
            self._heartbeats_tried_at = now
            held = dict(self._heartbeats)
            inputs = dict(self._inputs)
            rose = set(self._ledger_rose)
            with self._tx() as c:
                c.executemany(_HEARTBEAT_UPDATE,
                              [(*columns, site) for site, columns in held.items()])
                c.executemany("INSERT OR REPLACE INTO declared_inputs VALUES (?, ?)",
                              sorted(inputs.items()))
                for site in rose:
                    self._write_mark(c, site, self._ledger_marks[site])
            self._ledger_rose -= rose
            for site, columns in held.items():
                if self._heartbeats.get(site) is columns:
                    del self._heartbeats[site]
            for site, text in inputs.items():
                self._inputs_written[site] = text
                if self._inputs.get(site) is text:
                    del self._inputs[site]
            return len(held)

    def declared_inputs(self) -> dict[str, dict[str, Any]]:
        """What each site's last heartbeat declared of its data sets (the JSON object
        its ``record_heartbeat`` was given), held or written; a site never heard from
        since this table existed, or whose record does not read, is absent."""
        with self._lock:
            rows = dict(self._conn.execute(
                "SELECT site_id, inputs_json FROM declared_inputs").fetchall())
            rows.update(self._inputs)
        out = {}
        for site, text in rows.items():
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                out[str(site)] = value
        return out

    # -- privacy-ledger marks ------------------------------------------------------

    def note_ledger_released(self, site_id: str, released: int) -> list[LedgerEvent]:
        """``site_id``'s heartbeat says its privacy ledger holds ``released`` released
        runs. Entries are only ever added to a ledger, so the count never goes down on
        the appliance; fewer than the site's mark (the most it has reported) is a
        ledger rolled back, by a restore from a backup, and the site is flagged
        (``Appliance.ledger_rollback``) until it reports the mark again
        LEDGER_CLEAR_REPORTS times in a row (the newer ledger restored: it clears by
        itself; a count that alternates, two machines holding one site's keys, stays
        flagged and writes nothing more) or an operator accepts the lower count
        (:meth:`ledger_ack`). A flag set or cleared is written with its audit rows in
        one transaction at once; a mark that only rose (each site once a round) is
        written with the next heartbeat flush (HEARTBEAT_FLUSH_S: a coordinator killed
        meanwhile keeps a lower mark, which flags nothing); an unchanged count writes
        nothing. Returns the events to say (flagged, caught up), usually none.

        The change holds in memory at once, so the flag keeps the site out of cohorts
        even while the database refuses the write; that is retried at its next report.

        Raises:
            sqlite3.OperationalError: the write failed (locked, disk full).
        """
        with self._lock:
            held = self._ledger_marks.get(site_id)
            if held is not None and held[1] is not None and released >= held[0]:
                # caught up only once it holds: two machines with one site's keys
                # (or a clone left running) alternate, and must not flip it each time
                streak = self._ledger_streak.get(site_id, 0) + 1
                if streak < LEDGER_CLEAR_REPORTS:
                    self._ledger_streak[site_id] = streak
                    return []
            self._ledger_streak.pop(site_id, None)
            new, event = _ledger_step(site_id, held, released)
            if new == held and site_id not in self._ledger_unwritten:
                return []
            self._ledger_marks[site_id] = new
            if event is None and site_id not in self._ledger_unwritten:
                self._ledger_rose.add(site_id)
                return []
            self._ledger_rose.discard(site_id)  # written below, whole
            events = self._ledger_unwritten.setdefault(site_id, [])
            if event is not None:
                events.append(event)
            with self._tx() as c:
                self._write_mark(c, site_id, new)
                for e in events:
                    self._audit(c, "coordinator", e.action,
                                {"site": site_id, "was": e.was, "now": e.now})
            del self._ledger_unwritten[site_id]
            return events

    def ledger_flag(self, site_id: str) -> tuple[int, int] | None:
        """(the mark, the count it fell to) while ``site_id``'s ledger is flagged as
        rolled back, else None; from memory (asked on every heartbeat)."""
        held = self._ledger_marks.get(site_id)
        return None if held is None or held[1] is None else (held[0], held[1])

    def ledger_ack(self, site_id: str, *, actor: str) -> tuple[int, int]:
        """Accept the lower count of a site whose privacy ledger was rolled back: its
        mark becomes the count it reports now, the flag goes, and the audit log says
        who accepted it. Returns (the old mark, the new).

        Raises:
            StoreError: unknown site, or one whose ledger is not flagged as rolled back.
        """
        with self._lock:
            self.appliance(site_id)  # unknown: StoreError
            held = self._ledger_marks.get(site_id)
            if held is None or held[1] is None:
                raise StoreError(
                    f"site {site_id!r}'s privacy ledger is not flagged as rolled back "
                    + ("(it has not reported its ledger)" if held is None else
                       f"(it reports {held[0]} released runs, its most so far)")
                    + ": nothing to accept")
            was, now = held
            new = (now, None)
            with self._tx() as c:
                self._write_mark(c, site_id, new)
                self._audit(c, actor, LEDGER_ACCEPTED,
                            {"site": site_id, "was": was, "now": now})
            self._ledger_marks[site_id] = new
            self._ledger_unwritten.pop(site_id, None)
            self._ledger_streak.pop(site_id, None)
            self._ledger_rose.discard(site_id)
            return was, now

    def _write_mark(self, c: sqlite3.Connection, site_id: str,
                    mark: tuple[int, int | None]) -> None:
        c.execute("INSERT INTO ledger_marks(site_id, released, rolled_back_to, updated_at)"
                  " VALUES (?, ?, ?, ?) ON CONFLICT(site_id) DO UPDATE SET"
                  " released=excluded.released, rolled_back_to=excluded.rolled_back_to,"
                  " updated_at=excluded.updated_at",
                  (site_id, mark[0], mark[1], self._clock()))

    # -- operators ----------------------------------------------------------------

    def add_operator(self, name: str, ed25519_public: bytes, role: str, *, actor: str) -> None:
        """Raises: StoreError: bad key length or duplicate name."""
        if len(ed25519_public) != 32:
            raise StoreError(f"operator {name!r} key has {len(ed25519_public)} bytes, needs 32")
        with self._tx() as c:
            try:
                c.execute(
                    "INSERT INTO operators(name, ed25519_public, role, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (name, bytes(ed25519_public), role, self._clock()),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"operator {name!r} already exists") from exc
            self._audit(c, actor, "add_operator", {"name": name, "role": role})

    def operators(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT name, ed25519_public, role, created_at FROM operators ORDER BY name"
            ).fetchall()
        return [
            {"name": r[0], "ed25519_public": bytes(r[1]), "role": r[2], "created_at": r[3]}
            for r in rows
        ]

    # -- jobs ---------------------------------------------------------------------

    def create_job(self, job_id: str, plan_toml: str, *, actor: str) -> Job:
        """Raises: StoreError: duplicate job id."""
        now = self._clock()
        with self._tx() as c:
            try:
                c.execute(
                    "INSERT INTO jobs(job_id, plan_toml, status, submitted_by, submitted_at,"
                    " updated_at) VALUES (?, ?, 'queued', ?, ?, ?)",
                    (job_id, plan_toml, actor, now, now),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"job {job_id!r} already exists") from exc
            self._audit(c, actor, "submit_job", {"job": job_id})
        return self.job(job_id)

    def job(self, job_id: str) -> Job:
        """Raises: StoreError: unknown job."""
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"unknown job {job_id!r}")
        return Job(*row)

    def jobs(self, *, status: str | None = None) -> list[Job]:
        """The jobs (of ``status``), in the order they were submitted: by insertion (the
        table's rowid), never by ``submitted_at``, a wall-clock time that a step of the
        clock backwards would put a later job's before an earlier one's. Every jobs
        table has the rowid (its key is TEXT), so databases of any version order so."""
        q = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if status is not None:
            q += " WHERE status = ?"
            args = (status,)
        with self._lock:
            rows = self._conn.execute(q + " ORDER BY rowid", args).fetchall()
        return [Job(*r) for r in rows]

    def job_count(self, status: str) -> int:
        """How many jobs have ``status``."""
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM jobs WHERE status = ?",
                                     (status,)).fetchone()
        return int(row[0])

    def set_job_status(self, job_id: str, status: str, *, actor: str, error: str = "",
                       final_digest: str = "",
                       cancelled_attempt: CancelledAttempt | None = None) -> None:
        """``cancelled_attempt`` (only with status "cancelled"): the round attempt the
        cancel cut short, recorded in the same transaction as a "cancelled" row of the
        rounds table (its cohort; its survivors if its sum had been formed), so the
        report and ``jobs status`` show it; it does not count among the job's failed attempts.

        Raises: StoreError: unknown job or status."""
        if status not in JOB_STATUSES:
            raise StoreError(f"job status {status!r} is not one of {JOB_STATUSES}")
        if cancelled_attempt is not None and status != "cancelled":
            raise StoreError(f"a cancelled attempt cannot be recorded with job status "
                             f"{status!r}")
        with self._tx() as c:
            if cancelled_attempt is not None:
                a = cancelled_attempt
                c.execute(
                    "INSERT INTO rounds VALUES (?, ?, ?, 'cancelled', ?, ?, ?, ?, ?, '', ?)",
                    (job_id, a.round, self._next_attempt(c, job_id, a.round), a.started_at,
                     self._clock(), json.dumps(list(a.cohort)), json.dumps(list(a.survivors)),
                     json.dumps(dict(a.dropped_reasons)), a.reason))
                self._audit(c, actor, "round_cancelled",
                            {"job": job_id, "round": a.round, "reason": a.reason})
            self._set_job_status(c, job_id, status, actor=actor, error=error,
                                 final_digest=final_digest)

    def _set_job_status(self, c: sqlite3.Connection, job_id: str, status: str, *,
                        actor: str, error: str = "", final_digest: str = "") -> None:
        """set_job_status within the caller's transaction (``final_digest`` '' keeps the
        job's). Raises: StoreError: unknown job."""
        cur = c.execute(
            "UPDATE jobs SET status=?, error=?, final_digest=CASE WHEN ?='' THEN"
            " final_digest ELSE ? END, updated_at=? WHERE job_id=?",
            (status, error, final_digest, final_digest, self._clock(), job_id),
        )
        if cur.rowcount == 0:
            raise StoreError(f"unknown job {job_id!r}")
        self._audit(c, actor, f"job_{status}", {"job": job_id, "error": error})

    def set_final_digest(self, job_id: str, digest: str) -> None:
        """Name the weights of a job's ``final.safetensors`` (a failed job's last
        committed model, written after its status). Raises: StoreError: unknown job."""
        with self._tx() as c:
            cur = c.execute("UPDATE jobs SET final_digest=?, updated_at=? WHERE job_id=?",
                            (digest, self._clock(), job_id))
            if cur.rowcount == 0:
                raise StoreError(f"unknown job {job_id!r}")

    # -- rounds -------------------------------------------------------------------

    def commit_round(self, job_id: str, rnd: int, *, started_at: float, cohort: list[str],
                     survivors: list[str], dropped: list[str], model_digest: str,
                     metrics: list[tuple[str, str, str, float, int]],
                     dropped_reasons: dict[str, str] | None = None,
                     eval_missing: dict[str, str] | None = None,
                     left_out: dict[str, str] | None = None) -> None:
        """Record round ``rnd`` of a job as committed, with its metrics, atomically.

        ``metrics`` rows are (site, split, name, value, n_examples). The
        checkpoint for this round must already be durable on disk.
        ``dropped_reasons``: why each of ``dropped`` was left out (module doc).
        ``eval_missing``: why each survivor not in the round's evaluation is not.
        ``left_out``: why each enrolled site not in the round's cohort was left out.

        Raises:
            StoreError: unknown job, or ``rnd`` is not the job's next round.
        """
        with self._tx() as c:
            row = c.execute(
                "SELECT committed_round FROM jobs WHERE job_id=?", (job_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown job {job_id!r}")
            if rnd != row[0] + 1:
                raise StoreError(
                    f"round {rnd} of job {job_id!r} cannot be committed after round {row[0]}"
                )
            attempt = self._next_attempt(c, job_id, rnd)
            c.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, 'committed', ?, ?, ?, ?, ?, ?, '')",
                (job_id, rnd, attempt, started_at, self._clock(), json.dumps(cohort),
                 json.dumps(survivors),
                 json.dumps({s: (dropped_reasons or {}).get(s, "") for s in dropped}),
                 model_digest),
            )
            c.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(job_id, rnd, s, sp, n, float(v), int(k)) for s, sp, n, v, k in metrics],
            )
            if eval_missing:
                c.execute("INSERT OR REPLACE INTO eval_missing VALUES (?, ?, ?)",
                          (job_id, rnd, json.dumps({str(k): str(v) for k, v
                                                    in sorted(eval_missing.items())})))
            if left_out:
                c.execute("INSERT OR REPLACE INTO left_out VALUES (?, ?, ?)",
                          (job_id, rnd, json.dumps({str(k): str(v) for k, v
                                                    in sorted(left_out.items())})))
            c.execute(
                "UPDATE jobs SET committed_round=?, failed_attempts=0, updated_at=? WHERE job_id=?",
                (rnd, self._clock(), job_id),
            )
            # a committed round is never run again: its survivor set guards nothing now
            # (its survivors are in the round's row)
            c.execute("DELETE FROM unmask_sets WHERE job_id=? AND round=?", (job_id, rnd))
            self._audit(c, "coordinator", "round_committed",
                        {"job": job_id, "round": rnd, "survivors": survivors,
                         "dropped": dropped, "digest": model_digest,
                         **({"dropped_reasons": dropped_reasons} if dropped_reasons else {}),
                         **({"eval_missing": eval_missing} if eval_missing else {}),
                         **({"left_out": left_out} if left_out else {})})

    def fail_round(self, job_id: str, rnd: int, *, started_at: float, cohort: list[str],
                   reason: str, max_attempts: int | None = None,
                   dropped_reasons: dict[str, str] | None = None,
                   survivors: Sequence[str] = (), job_error: str = "") -> int:
        """Record a failed attempt at round ``rnd``; returns the job's failed-attempt count.
        ``dropped_reasons``: each site that refused or was lost, and why (module doc).
        ``survivors``: the sites whose updates the attempt's sum held when the sum was
        unmasked before the attempt failed (rejected out of bounds, by the strategy, or
        its evaluation cut short): the coordinator learned it, a release each
        (report.client_privacy); empty when no sum was formed.

        With ``max_attempts``, a count that reaches it marks the job failed in the same
        transaction ("round r failed n times; last: reason"), so a write failing in
        between can neither lose the job's end nor count one attempt twice.
        ``job_error`` (not empty): the job is marked failed in the same transaction with
        that error whatever the count (an attempt the coordinator will not retry: every
        site refused the round twice in the same words).

        Raises:
            StoreError: unknown job.
        """
        with self._tx() as c:
            attempt = self._next_attempt(c, job_id, rnd)
            c.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, 'failed', ?, ?, ?, ?, ?, '', ?)",
                (job_id, rnd, attempt, started_at, self._clock(), json.dumps(cohort),
                 json.dumps(sorted(survivors)), json.dumps(dict(dropped_reasons or {})),
                 reason),
            )
            cur = c.execute(
                "UPDATE jobs SET failed_attempts=failed_attempts+1, updated_at=? WHERE job_id=?",
                (self._clock(), job_id),
            )
            if cur.rowcount == 0:
                raise StoreError(f"unknown job {job_id!r}")
            self._audit(c, "coordinator", "round_failed",
                        {"job": job_id, "round": rnd, "reason": reason,
                         **({"survivors": sorted(survivors)} if survivors else {})})
            row = c.execute("SELECT failed_attempts FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            attempts = int(row[0])
            if job_error:
                self._set_job_status(c, job_id, "failed", actor="coordinator",
                                     error=job_error)
            elif max_attempts is not None and attempts >= max_attempts:
                self._set_job_status(c, job_id, "failed", actor="coordinator",
                                     error=f"round {rnd} failed {attempts} times; last: {reason}")
        return attempts

    def interrupted_round(self, job_id: str, attempt: InterruptedAttempt) -> None:
        """Record the attempt the coordinator's stop cut short as an "interrupted" row of
        the rounds table (its cohort; its survivors if its sum had been formed),
        audited ``round_interrupted``; it does not count among the job's failed
        attempts.

        Raises: StoreError: unknown job."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM jobs WHERE job_id=?", (job_id,)).fetchone() is None:
                raise StoreError(f"unknown job {job_id!r}")
            c.execute(
                "INSERT INTO rounds VALUES (?, ?, ?, 'interrupted', ?, ?, ?, ?, '{}', '', ?)",
                (job_id, attempt.round, self._next_attempt(c, job_id, attempt.round),
                 attempt.started_at, attempt.ended_at, json.dumps(list(attempt.cohort)),
                 json.dumps(list(attempt.survivors)), attempt.reason))
            self._audit(c, "coordinator", "round_interrupted",
                        {"job": job_id, "round": attempt.round, "reason": attempt.reason})

    def record_unmask_set(self, job_id: str, rnd: int, survivors: list[str]) -> None:
        """Record, before any site is asked to unmask it, that round ``rnd``'s sum is over
        ``survivors``. Sites log each reveal and refuse to unmask one update over a
        second set (a second sum would give the difference), so every later attempt at
        the round must sum over the same set; recording it again is a no-op.

        Raises:
            StoreError: another set is recorded for the round (nothing is written).
            sqlite3.OperationalError: the database cannot take the write now.
        """
        now = sorted(survivors)
        with self._tx() as c:
            row = c.execute("SELECT survivors_json FROM unmask_sets WHERE job_id=? AND round=?",
                            (job_id, rnd)).fetchone()
            if row is not None:
                earlier = json.loads(row[0])
                if earlier != now:
                    raise StoreError(
                        f"round {rnd} of job {job_id} was already unmasked over {earlier}; "
                        f"asking to unmask it over {now} would reveal a difference")
                return
            c.execute("INSERT INTO unmask_sets VALUES (?, ?, ?, ?)",
                      (job_id, rnd, json.dumps(now), self._clock()))
            self._audit(c, "coordinator", "unmask_set_recorded",
                        {"job": job_id, "round": rnd, "survivors": now})

    def unmask_set(self, job_id: str, rnd: int) -> list[str] | None:
        """The survivor set round ``rnd``'s unmasking was asked over, or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT survivors_json FROM unmask_sets WHERE job_id=? AND round=?",
                (job_id, rnd)).fetchone()
        return None if row is None else [str(s) for s in json.loads(row[0])]

    @staticmethod
    def _next_attempt(c: sqlite3.Connection, job_id: str, rnd: int) -> int:
        row = c.execute(
            "SELECT COALESCE(MAX(attempt), 0) FROM rounds WHERE job_id=? AND round=?",
            (job_id, rnd),
        ).fetchone()
        return int(row[0]) + 1

    def rounds(self, job_id: str) -> list[RoundRecord]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM rounds WHERE job_id=? ORDER BY round, attempt", (job_id,)
            ).fetchall()
            not_evaluated = {int(r[0]): json.loads(r[1]) for r in self._conn.execute(
                "SELECT round, reasons_json FROM eval_missing WHERE job_id=?", (job_id,))}
            outside = {int(r[0]): json.loads(r[1]) for r in self._conn.execute(
                "SELECT round, reasons_json FROM left_out WHERE job_id=?", (job_id,))}
        out = []
        for r in rows:
            dropped = json.loads(r[8])  # {site: reason}, or a list in older rows
            reasons = ({str(k): str(v) for k, v in dropped.items()}
                       if isinstance(dropped, dict) else {})
            out.append(RoundRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]),
                                   json.loads(r[7]), sorted(dropped), r[9], r[10],
                                   {k: v for k, v in reasons.items() if v},
                                   dict(not_evaluated.get(r[1], {}))
                                   if r[3] == "committed" else {},
                                   dict(outside.get(r[1], {}))
                                   if r[3] == "committed" else {}))
        return out

    def metrics(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT round, site, split, name, value, n_examples FROM metrics WHERE job_id=?"
                " ORDER BY round, site, split, name",
                (job_id,),
            ).fetchall()
        return [
            {"round": r[0], "site": r[1], "split": r[2], "name": r[3], "value": r[4],
             "n_examples": r[5]}
            for r in rows
        ]


    # -- roll-outs of signed updates ------------------------------------------------

    def save_rollout(self, rollout_id: str, state: dict[str, Any]) -> None:
        """Insert or replace one roll-out's state (``Rollout.to_state()``), so a
        restarted coordinator goes on with it."""
        now = self._clock()
        with self._tx() as c:
            c.execute(
                "INSERT INTO rollouts(rollout_id, state_json, started_at, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(rollout_id) DO UPDATE SET "
                "state_json = excluded.state_json, updated_at = excluded.updated_at",
                (rollout_id, json.dumps(state, sort_keys=True), now, now),
            )

    def rollouts(self) -> list[dict[str, Any]]:
        """Every saved roll-out state, oldest first (by insertion, as :meth:`jobs`)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT state_json FROM rollouts ORDER BY rowid"
            ).fetchall()
        return [json.loads(r[0]) for r in rows]


def _ledger_step(site: str, held: tuple[int, int | None] | None, released: int
                 ) -> tuple[tuple[int, int | None], LedgerEvent | None]:
    """A site's (mark, rolled back to) after it reports ``released`` runs, and the event
    that is (Store.note_ledger_released)."""
    if held is None:  # its first report: the mark starts there
        return (released, None), None
    mark, rolled_back_to = held
    if released >= mark:
        event = (None if rolled_back_to is None
                 else LedgerEvent(site, LEDGER_CAUGHT_UP, mark, released))
        return (released, None), event
    if rolled_back_to is None:
        return (mark, released), LedgerEvent(site, LEDGER_ROLLED_BACK, mark, released)
    return (mark, released), None  # still behind: its count now is kept for the reason


def _appliance(row: tuple[Any, ...], mark: tuple[int, int | None] | None) -> Appliance:
    return Appliance(
        site_id=row[0], curve_public_z85=row[1], ed25519_public=bytes(row[2]), status=row[3],
        version=row[4], last_seen=row[5], health=json.loads(row[6]), eligible=bool(row[7]),
        eligibility_reason=row[8], datasets=json.loads(row[9]), current_task=row[10],
        enrolled_at=row[11],
        ledger_mark=None if mark is None else mark[0],
        ledger_rolled_back_to=None if mark is None else mark[1],
    )
