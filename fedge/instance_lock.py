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


class InstanceLocked(RuntimeError):
    """Another process holds the state directory's lock (its pid in the message when
    known), or the lock file cannot be opened or locked (named)."""


def hold(state_dir: Path, role: str) -> Path:
    """Take ``<state_dir>/<role>.lock`` for the life of this process and write this
    pid into it. Taking it again in the same process is a no-op.

    Returns the lock file's path.

    Raises:
        InstanceLocked: another process holds it, or the file cannot be opened or
            locked (permissions, a read-only file system); the message names the
            directory.
    """
    path = Path(state_dir) / f"{role}.lock"
    key = path.absolute()
    if key in _HELD:
        return path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.EROFS:
            # a file system remounted read-only: nothing here can be written, so a
            # second process could not corrupt it either; the service must still
            # start and say so (its health verdict names the directory)
            log.warning("state directory %s is on a read-only file system: running "
                        "without the %s lock (%s)", state_dir, role, path)
            return path
        raise InstanceLocked(f"cannot open the {role} lock {path}: {exc.strerror or exc}"
                             ) from None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            who = f"another {role} (pid {holder})" if holder else f"another {role}"
            raise InstanceLocked(f"{who} is running on state directory {Path(state_dir)} "
                                 f"(it holds {path}); one {role} per state directory"
                                 ) from None
        raise InstanceLocked(f"cannot lock {path}: {exc.strerror or exc}") from None
    _HELD[key] = fd  # held from here, whether or not the pid can be written
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # a full disk: the lock holds, only its pid note is missing
        log.warning("%s lock %s taken, but this pid could not be written into it: %s",
                    role, path, exc.strerror or exc)
    return path


def _holder(fd: int) -> int | None:
    """The pid the holder wrote into the lock file, if it reads as one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
