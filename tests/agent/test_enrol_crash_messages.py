"""What `fedge agent enrol` says when it could not finish: killed (its writer child
ended without an answer, perhaps after it installed everything) it says the
enrolment may have been installed and how to check; on a full disk it names the
file it was writing. Real command, real kill (strace's signal injection), a real
1 MiB tmpfs."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from tests.agent.test_enrol_crash_temps import base, enrol_argv, owner  # noqa: F401
from tests.update.test_audit_crash_full_disk import fill, small_disk


def enrolment_file(where: Path) -> Path:
    console = ConsoleStore.init(where / "console",
                                coordinator_endpoint="tcp://127.0.0.1:7001")
    file, _ = create_enrolment(console, "h1", valid_for=timedelta(days=1),
                               out=where / "h1.fedge-enrol")
    return file


def test_an_enrol_whose_writer_was_killed_says_it_may_be_installed_and_how_to_check(
        base, owner):  # noqa: F811
    if owner is None:
        pytest.skip("only root enrolling for the service user has a writer child")
    if shutil.which("strace") is None:
        pytest.skip("needs strace to kill the writer at an exact fsync")
    file = enrolment_file(base)
    state = base / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *owner)
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                        "-e", "inject=fsync:signal=KILL:when=1", *enrol_argv(file, state)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    said = r.stderr.strip().splitlines()[-1]
    assert "killed by signal 9" in said
    assert "the enrolment may have been installed" in said
    assert f"fedge agent audit --state-dir {state}" in said
    assert "running this enrolment again is safe" in said
    again = subprocess.run(enrol_argv(file, state), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr


def test_an_enrol_on_a_full_disk_names_the_file_it_was_writing(base):  # noqa: F811
    file = enrolment_file(base)
    with small_disk(base / "state") as state:
        fill(state)
        r = subprocess.run(enrol_argv(file, state), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2
        said = r.stderr.strip().splitlines()[-1]
        assert "No space left on device" in said
        assert f"writing {state / 'keys' / 'curve.json'}" in said
        assert "run it again" in said
        (state / "filler").unlink()
        again = subprocess.run(enrol_argv(file, state), capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr
