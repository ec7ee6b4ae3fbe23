"""`run_as` drops root's supplementary groups with its uid and gid: the child acting
for the service user holds none of root's groups (group root, admin groups), so a
symlink that user planted reaches nothing a group of root's could write.

Real root, real fork; the parent's groups are set to [0] as under sudo or systemd
and put back afterwards. Kills mutation M50 (``os.setgroups([])`` deleted)."""

from __future__ import annotations

import os

import pytest

from fedge.as_owner import run_as

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: run_as drops privileges only from root")

NOBODY = (65534, 65534)


@pytest.fixture
def root_in_group_root():
    """This process keeps group root as a supplementary group, as under sudo."""
    held = os.getgroups()
    os.setgroups([0])
    try:
        yield
    finally:
        os.setgroups(held)


# pytest-timeout's thread method would start a timer thread, and run_as (rightly)
# refuses to fork beside threads: SIGALRM bounds this test instead.
@pytest.mark.timeout(60, method="signal")
def test_the_child_acting_for_the_owner_keeps_none_of_roots_groups(
    root_in_group_root: None,
) -> None:
    assert os.getgroups() == [0]
    uid, gid, groups = run_as(
        NOBODY, lambda: [os.getuid(), os.getgid(), os.getgroups()], what="probe")
    assert (uid, gid) == NOBODY
    assert groups == []
    # the parent is untouched: only the child dropped
    assert os.getgroups() == [0] and os.geteuid() == 0
