"""A directory under the agent's state dir that a round writes (privacy/, secagg/,
jobs/), which the agent's user cannot write, e.g. privacy/ left by a `sudo fedge
agent run` by hand. The health probe tested only the top of the state dir: the site
stayed eligible, was picked, and refused every attempt ("the privacy ledger cannot be
saved"), failing the job for the others. Now the probe tries each such directory that
exists, and the site reports itself not eligible naming it.

Another user's files are made real without a second user: as root, the process that
meets them runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (setpriv), so
mode bits bind it as they bind the service user; as any other user, chmod does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.health import EligibilityPolicy, collect
from fedge.health.collect import ROUND_DIRS, remove_stale_probes

CPU_ONLY = EligibilityPolicy(allow_cpu_only=True, min_free_disk_bytes=0,
                             min_available_memory_bytes=0)
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]


def as_service_user(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a Python that mode bits bind (see the module doc)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
    prefix = NODAC if os.geteuid() == 0 else []
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("sub", ROUND_DIRS)
def test_a_round_directory_that_cannot_be_written_makes_the_site_not_eligible(
        tmp_path: Path, sub: str) -> None:
    """A regular file where the directory should be (ENOTDIR, as root too)."""
    assert set(ROUND_DIRS) == {"privacy", "secagg", "jobs"}
    state = tmp_path / "state"
    state.mkdir()
    (state / sub).write_text("not a directory\n")
    verdict = CPU_ONLY.decide(collect(state))
    assert not verdict.eligible
    assert verdict.reason == (f"state directory's {sub}/ cannot be written (the health probe "
                              "could not create a file in it): [Errno 20] Not a directory")
    assert str(state) not in verdict.reason  # it goes to the coordinator


PROBE = r'''
import json, logging, sys
from fedge.health import EligibilityPolicy, collect
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
policy = EligibilityPolicy(allow_cpu_only=True, min_free_disk_bytes=0,
                           min_available_memory_bytes=0)
verdict = policy.decide(collect(sys.argv[1]))
print(json.dumps([verdict.eligible, verdict.reason]))
'''


def test_privacy_dir_of_another_user_is_named_with_the_chown(tmp_path: Path) -> None:
    """The reviewer's case: privacy/ not writable by the agent's user."""
    state = tmp_path / "state"
    (state / "privacy").mkdir(parents=True)
    (state / "secagg").mkdir()
    (state / "privacy").chmod(0o555)
    try:
        done = as_service_user(PROBE, str(state))
    finally:
        (state / "privacy").chmod(0o700)
    assert done.returncode == 0, done.stderr
    eligible, reason = json.loads(done.stdout)
    assert not eligible
    assert reason == ("state directory's privacy/ cannot be written (the health probe could "
                      "not create a file in it): [Errno 13] Permission denied")
    assert (f"WARNING state dir {state / 'privacy'} cannot be written: [Errno 13] Permission "
            f"denied: '{state / 'privacy'}/.fedge-health-probe-" in done.stderr)
    assert f"(e.g. chown -R fedge: {state})" in done.stderr
    # writable again: eligible, and the probes left nothing anywhere
    done = as_service_user(PROBE, str(state))
    assert json.loads(done.stdout)[0] is True, done.stdout
    assert [p.name for p in state.rglob("*")] in (["privacy", "secagg"], ["secagg", "privacy"])


def test_a_probe_file_a_killed_probe_left_in_a_round_directory_is_swept(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "privacy").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = state / "privacy" / f".fedge-health-probe-{dead.pid}-1"
    left.write_text("fedge health probe\n")
    old = time.time() - 3600
    os.utime(left, (old, old))
    assert remove_stale_probes(state) == [left]
    assert not left.exists()
