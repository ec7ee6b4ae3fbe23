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

The child's credentials change, so the kernel makes it non-dumpable: the service
user cannot ptrace it, only kill it, which `run_as` reports as an error.
"""

from __future__ import annotations

import json
import os
import sys
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
           raises: tuple[type[Exception], ...] = (), umask: int | None = 0o077) -> Any:
    """Run `fn` (no arguments, returning a JSON value) as `owner` in a forked child
    and return what it returned; with `owner` None, just call it here.

    `umask`: the child's; None keeps this process's (files meant to be shared, such as
    a model repository's, keep the modes they had when root wrote them).

    The exceptions named in `raises` (by class name; their message), and OSError (its
    errno, text and file name), are raised again here.

    Raises:
        OSError: `fn` raised it, or the child could not drop to `owner` or died without
            an answer (killed: names the signal).
        RuntimeError: `fn` raised anything else (its traceback is on stderr).
        any class in `raises`: `fn` raised it.
    """
    if owner is None:
        return fn()
    uid, gid = owner
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
                os.setgroups([])
                os.setgid(gid)  # as root: real, effective and saved
                os.setuid(uid)
                if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
                    raise OSError(f"could not drop to uid {uid} gid {gid}")
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
