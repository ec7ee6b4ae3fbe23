"""Root does not fork from a process running threads to write as another user (diff
review s14 L4): an agent run as root (a container) whose updater installs a model into
a repository another uid owns is refused with that owner named, and nothing is
written; the same install with no other thread (the command line) still writes as
the owner. Real root, a real throwaway user, a real thread, the real repository."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedge.serve.repository import ModelRepository
from tests.serve.test_install_as_root import (  # noqa: F401
    NO_THREAD_TIMEOUT,
    base,
    owned_dir,
    pytestmark,
    user,
)

__all__ = ["pytestmark"]


@NO_THREAD_TIMEOUT
def test_a_root_process_running_threads_is_refused_naming_the_owner(
        user, base, cox_v1: tuple[Path, torch.nn.Module]) -> None:  # noqa: F811
    repo_dir = owned_dir(base / "models", user)
    repo = ModelRepository(repo_dir)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, args=(30,), name="agent-executor")
    worker.start()
    try:
        with pytest.raises(OSError, match=(
                rf"installing 'cox' into {repo_dir}: the directory \(or one on the way to "
                rf"it\) belongs to uid {user[1]}, .* this process runs 2 threads, .* does "
                rf"not fork: run this process as uid {user[1]}")):
            repo.install("cox", cox_v1[0].read_bytes())
    finally:
        stop.set()
        worker.join(timeout=30)
    assert list(repo_dir.iterdir()) == []  # nothing written, by anyone
    # the command line's case: no other thread, written as the owner
    assert threading.active_count() == 1
    assert repo.install("cox", cox_v1[0]) == 1
    assert repo.path("cox", 1).stat().st_uid == user[1]
