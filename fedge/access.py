"""What this user cannot write, said for a check: the agent's and the coordinator's
``state_dir_problems`` (fedge.agent.process, fedge.coordinator.config), which look at
their state directory as ``fedge agent check`` / ``fedge coordinator check`` run, each
path named with its mode and owner. Light on purpose (os alone, pwd when an owner is
named): both checks import it, and the coordinator's runs it in a child dropped to the
service user, which may not read the modules it has not imported yet."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cannot_write(path: Path, what: str, need: int, user: str) -> str | None:
    """None when this user may use ``path`` as ``need`` says (``os.access`` modes: mode
    bits, ACLs, a read-only mount; nothing written); else "WHAT PATH (mode M, owner O[,
    on a read-only file system]) cannot be written USER", ``user`` the words for who
    looked (" as user fedge": fedge.text.as_user)."""
    if os.access(path, need):
        return None
    ro = ""
    with contextlib.suppress(OSError):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            ro = ", on a read-only file system"
    try:
        st = os.stat(path)
        mode = f" (mode {st.st_mode & 0o7777:04o}, owner {owner_name(st.st_uid)}{ro})"
    except OSError:
        mode = ro and f" ({ro[2:]})"
    return f"{what} {path}{mode} cannot be written{user}"


def owner_name(uid: int) -> str:
    """The user name of ``uid``, or "uid N" where it has no passwd entry."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
