"""Root does not fork from a process running threads to write as another user (diff
review s14 L4): an agent run as root (a container) whose updater installs a model into
a repository another uid owns is refused with that owner named, and nothing is
written; the same install with no other thread (the command line) still writes as
the owner. Real root, a real throwaway user, a real thread, the real repository."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedge.serve.repository import ModelRepository
from tests.serve.test_install_as_root import (  # noqa: F401
    base,
    install_in_fresh_process,
    owned_dir,
    pytestmark,
    user,
)

__all__ = ["pytestmark"]


def test_a_root_process_running_threads_is_refused_naming_the_owner(
        user, base, cox_v1: tuple[Path, torch.nn.Module]) -> None:  # noqa: F811
    repo_dir = owned_dir(base / "models", user)
    said = install_in_fresh_process(repo_dir, cox_v1[0], threads=1, data="bytes")
    assert re.fullmatch(
        rf"OSError: installing 'cox' into {re.escape(str(repo_dir))}: the directory \(or one "
        rf"on the way to it\) belongs to uid {user[1]}, .* this process runs \d+ threads, .* "
        rf"does not fork: run this process as uid {user[1]}.*", said), said
    assert list(repo_dir.iterdir()) == []  # nothing written, by anyone
    # the command line's case: no other thread, written as the owner
    assert install_in_fresh_process(repo_dir, cox_v1[0]) == "installed 1"
    assert ModelRepository(repo_dir).path("cox", 1).stat().st_uid == user[1]
