"""`run_as` drops root's supplementary groups with its uid and gid: the child acting
for the service user holds none of root's groups (group root, admin groups), so a
symlink that user planted reaches nothing a group of root's could write.

Real root, real fork, in a fresh Python process: run_as (rightly) refuses to fork
beside threads, and the test process may hold some (other tests', pytest-timeout's).
The child process sets its groups to [0], as under sudo or systemd. Kills mutation
M50 (``os.setgroups([])`` deleted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: run_as drops privileges only from root")

PROBE = """
import json, os
from fedge.as_owner import run_as
os.setgroups([0])
before = os.getgroups()
child = run_as((65534, 65534), lambda: [os.getuid(), os.getgid(), os.getgroups()],
               what="probe")
print(json.dumps({"before": before, "child": child,
                  "after": [os.geteuid(), os.getgroups()]}))
"""


def test_the_child_acting_for_the_owner_keeps_none_of_roots_groups() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["before"] == [0]
    assert seen["child"] == [65534, 65534, []]
    # the parent is untouched: only the child dropped
    assert seen["after"] == [0, [0]]
