"""Write into another user's directory, when run as root, as that user.

`sudo fedge agent enrol` writes into /var/lib/fedge, and `sudo fedge export
--install` into a model repository, both owned by the less trusted service user
(fedge). Root following a symlink that user planted there (``keys`` pointing at a
directory of root's, ``enrolment-history.jsonl`` at /root/.bashrc), or chowning a
path that user swapped for a symlink mid-walk, hands that user root. So root does
not write there at all: `run_as` forks a child that drops to the directory's owner
(no supplementary groups, umask 077) and does the writing, so the kernel's own
permission checks apply and a planted symlink reaches nothing that user could not
write anyway; the files it creates are that user's, with no chown afterwards. The
parent keeps what needs root (reading the operator's root-only enrolment file, the
systemd credentials) and hands data to the child in memory (fork) and takes its
answer back as JSON over a pipe (never pickle: the child's side is the other
user's).

`fedge coordinator check --user NAME` uses it too, to look as the service would: its
child takes NAME's supplementary groups (``groups_of``), as systemd's ``User=NAME``
gives them to the service (initgroups), so what NAME may write only through a group
is not reported as denied.

The child's credentials change, so the kernel makes it non-dumpable: the service
user cannot ptrace it, only kill it, which `run_as` reports as an error.

Only a process with no other thread forks: the command-line entry points (`fedge
agent enrol`, `fedge export --install` / `--out`) run none. A child forked beside
threads (the agent's event loop executor, ZeroMQ's, torch's) holds a copy of every
lock they held at that instant, and the Python it runs can hang on one. A process
running threads as root (an agent run as root in a container, installing a model
into a repository another uid owns) is refused with the owner named: run it as that
user, or install from the command line.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

Owner = tuple[int, int]


def owner_to_act_as(path: str | os.PathLike[str]) -> Owner | None:
    """The (uid, gid) to write under `path` as: when this process is root and `path`,
    or a directory on the way to it (the nearest existing one when `path` does not
    exist yet), belongs to another user, the deepest such owner. None when not root,
    or when every existing component is root's (root writes there itself, as before)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    full = Path(os.path.abspath(path))
    owner: Owner | None = None
    for part in [*reversed(full.parents), full]:
        try:
            st = os.lstat(part)
        except FileNotFoundError:
            break
        if st.st_uid != 0:
            owner = (st.st_uid, st.st_gid)
    return owner


def run_as(owner: Owner | None, fn: Callable[[], Any], *, what: str,
           raises: tuple[type[Exception], ...] = (), umask: int | None = 0o077,
           groups_of: str | None = None) -> Any:
    """Run `fn` (no arguments, returning a JSON value) as `owner` in a forked child
    and return what it returned; with `owner` None, just call it here.

    `umask`: the child's; None keeps this process's (files meant to be shared, such as
    a model repository's, keep the modes they had when root wrote them).

    `groups_of`: a user name, whose supplementary groups the child takes (its
    ``getgrouplist``, looked up here, before the fork), as a service run as that user
    (systemd's ``User=``) has them; None (the writers, acting for a directory's owner):
    none at all, so nothing a group of root's, or any group, could write is reached.

    The exceptions named in `raises` (by class name; their message), and OSError (its
    errno, text and file name), are raised again here.

    Raises:
        OSError: `fn` raised it, or the child could not drop to `owner` or died without
            an answer (killed: names the signal); or this process runs other threads
            (module doc: it does not fork then; names the owner, and nothing runs); or
            `groups_of`'s groups could not be looked up (named; nothing runs).
        RuntimeError: `fn` raised anything else (its traceback is on stderr).
        any class in `raises`: `fn` raised it.
    """
    if owner is None:
        return fn()
    uid, gid = owner
    threads = threading.active_count()
    if threads > 1:
        raise OSError(
            f"{what}: the directory (or one on the way to it) belongs to uid {uid}, so "
            f"root writes there only as that user, from a child it forks; this process "
            f"runs {threads} threads, and a child forked beside them can hang on a lock "
            f"one of them held, so it does not fork: run this process as uid {uid}, or "
            "do it from the command line (`fedge export --install`), which runs none")
    groups: list[int] = []
    if groups_of is not None:
        try:
            groups = os.getgrouplist(groups_of, gid)
        except (OSError, KeyError) as exc:
            raise OSError(f"{what}: the groups of user {groups_of} cannot be looked up: "
                          f"{exc}") from None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # or the child's exit would not, but a buffered line would twice
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            answer: dict[str, Any]
            try:
                os.setgroups(groups)
                os.setgid(gid)  # as root: real, effective and saved
                os.setuid(uid)
                if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) \
                        or set(os.getgroups()) - {gid} != set(groups) - {gid}:
                    raise OSError(f"could not drop to uid {uid} gid {gid} groups {groups}")
                if umask is not None:
                    os.umask(umask)
                answer = {"value": fn()}
            except OSError as exc:
                answer = {"oserror": [exc.errno, exc.strerror or str(exc),
                                      None if exc.filename is None else str(exc.filename)]}
            except Exception as exc:
                named = type(exc).__name__ in {c.__name__ for c in raises}
                if not named:
                    traceback.print_exc()
                answer = {"raised": type(exc).__name__, "message": str(exc)}
            data = json.dumps(answer).encode()
            while data:
                data = data[os.write(w, data):]
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    try:
        answer = json.loads(b"".join(chunks))
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        died = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                else f"exit status {os.waitstatus_to_exitcode(status)}")
        raise OSError(f"{what}, run as uid {uid}, ended without an answer ({died})") from None
    if "value" in answer:
        return answer["value"]
    if "oserror" in answer:
        errno_, text, filename = answer["oserror"]
        if errno_ is None:
            raise OSError(f"{what} as uid {uid}: {text}")
        raise OSError(errno_, text, *([filename] if filename is not None else []))
    for cls in raises:
        if cls.__name__ == answer.get("raised"):
            raise cls(str(answer.get("message")))
    raise RuntimeError(f"{what} failed as uid {uid}: {answer.get('raised')}: "
                       f"{answer.get('message')}")
