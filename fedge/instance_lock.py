"""One running coordinator, and one running agent, per state directory.

`fedge coordinator run` and `fedge agent run` each hold an exclusive lock on a file
in their state directory (``coordinator.lock``, ``agent.lock``) for the life of the
process. A second one on the same directory stops at once naming the directory and
the holder's pid: two coordinators on one database both drove the same job (one
went on with a job the other had cancelled, and each wrote the bound endpoint); two
agents on one directory took turns superseding each other's connection and shared
one privacy ledger.

The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: it belongs to the
process, so it goes when the process ends, however it ends (a SIGKILL leaves no
stale lock for the restart), and a forked child (a torch DataLoader worker, the
multiprocessing of a plan's model build) does not inherit it, so a child outliving
a killed agent cannot keep its restart out. The descriptor is not inherited across
exec either (Python's default): the A/B launcher takes no lock, and the agent it
execs takes its own. Read-only commands (``coordinator status``, ``agent privacy``)
take none.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# the descriptors held, so they are not closed (closing one would drop the lock)
_HELD: dict[Path, int] = {}
_HELD_TOO: list[int] = []  # a read-only hold's shared lock of the file, beside the dir's


class InstanceLocked(RuntimeError):
    """Another process holds the state directory's lock (its pid in the message when
    known), or the lock file cannot be opened or locked (named)."""


def hold(state_dir: Path, role: str) -> Path:
    """Take ``<state_dir>/<role>.lock`` for the life of this process and write this
    pid into it. Taking it again in the same process is a no-op.

    Returns the lock file's path.

    Raises:
        InstanceLocked: another process holds it, or the file cannot be opened or
            locked (permissions); the message names the directory. On a read-only
            file system the lock is taken without writing (`_hold_read_only`).
    """
    path = Path(state_dir) / f"{role}.lock"
    key = path.absolute()
    if key in _HELD:
        return path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            # a file system remounted read-only: the service must still start and say
            # so (its health verdict names the directory), but not beside another
            return _hold_read_only(Path(state_dir), path, role, key)
        raise InstanceLocked(f"cannot open the {role} lock {path}: {exc.strerror or exc}"
                             ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise _locked(role, Path(state_dir), f"it holds {path}", holder) from None
        raise InstanceLocked(f"cannot lock {path}: {exc.strerror or exc}") from None
    _HELD[key] = fd  # held from here, whether or not the pid can be written
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a full disk: the lock holds, only its pid note is missing
        log.warning("%s lock %s taken, but this pid could not be written into it: %s",
                    role, path, exc.strerror or exc)
    return path


def _hold_read_only(state_dir: Path, path: Path, role: str, key: Path) -> Path:
    """`hold` on a read-only file system, where the lock file cannot be opened for
    writing: a holder that took it while the disk was writable still excludes this
    process (a shared ``lockf`` of the file it holds exclusively fails), and two
    processes starting on the read-only directory exclude each other (``flock`` of the
    directory, which needs no write access; a forked child shares it, unlike ``lockf``).

    Raises: InstanceLocked, as `hold`."""
    fds: list[int] = []
    try:
        if os.path.lexists(path):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            fds.append(fd)
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise _locked(role, state_dir, f"it holds {path}", _holder(fd)) from None
        dfd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(dfd)
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise _locked(role, state_dir, "read-only: it holds the directory") from None
    except InstanceLocked:
        for fd in fds:
            os.close(fd)
        raise
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise InstanceLocked(f"cannot lock {path} on a read-only file system: "
                             f"{exc.strerror or exc}") from None
    log.warning("state directory %s is on a read-only file system: %s lock held without "
                "writing %s", state_dir, role, path)
    _HELD[key] = fds[-1]
    _HELD_TOO.extend(fds[:-1])
    return path


def _locked(role: str, state_dir: Path, how: str, holder: int | None = None
            ) -> InstanceLocked:
    who = f"another {role} (pid {holder})" if holder else f"another {role}"
    return InstanceLocked(f"{who} is running on state directory {state_dir} ({how}); one "
                          f"{role} per state directory")


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file, if it reads as one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def lock_holder(state_dir: Path, role: str = "coordinator") -> int | None:
    """The pid of the ``role`` holding ``state_dir``'s lock (`hold`: a ``lockf`` of
    ``<role>.lock``, or on a read-only file system a ``flock`` of the directory), 0
    when it is held by a process whose pid is not known here, None when none holds it.
    Tested without taking it (fcntl F_GETLK, /proc/locks), so a process starting
    meanwhile is not kept out, unlike a test lock (store.coordinator_running takes a
    shared one for a moment). `fedge coordinator check` asks it of a port's holder."""
    import struct
    import sys

    lock = Path(state_dir) / f"{role}.lock"
    if sys.platform == "linux":
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = -1  # none, or not readable: whoever cannot read it cannot start either
        if fd >= 0:
            try:
                fmt = "hhqqi"  # struct flock: l_type, l_whence, l_start, l_len, l_pid
                asked = struct.pack(fmt, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
                kind, _, _, _, pid = struct.unpack(fmt, fcntl.fcntl(fd, fcntl.F_GETLK, asked))
            except OSError:
                kind, pid = fcntl.F_UNLCK, 0
            finally:
                os.close(fd)  # this process holds no lock on it to lose
            if kind != fcntl.F_UNLCK:
                return max(pid, 0)
    try:
        st = os.stat(state_dir)
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():  # "1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF"
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4]) if fields[4].isdigit() else 0
    return None
