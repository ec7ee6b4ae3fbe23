"""`fedge agent check` says what of the state directory the agent's user cannot write
(s19): the privacy ledger, a job's state, the reveal log and signed updates live
there, and check said "ok" for a directory the service could not write -- start then
stopped (its lock cannot be made there) or the first job failed.

Now: a lock it cannot take exits 2 (start stops; `fedge agent run` as that user does);
the rest exits 1 (the agent starts, each job fails), each naming the path, its mode
and owner, and the user. Nothing is written.

The real CLI in a subprocess. Another user's view without a second user: as root, the
process runs with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (setpriv), so mode
bits bind it as they bind the service user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent.test_s17_check_credentials import appliance

REPO = Path(__file__).resolve().parents[2]
NODAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         "--inh-caps", "-dac_override,-dac_read_search", "--"]


def agent(*argv: str) -> subprocess.CompletedProcess[str]:
    """`fedge agent ARGV` as the service user would run it: mode bits bind it."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot drop CAP_DAC_OVERRIDE")
        prefix = NODAC
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([*prefix, sys.executable, "-m", "fedge.cli", "agent", *argv],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def test_a_writable_state_dir_is_ok(tmp_path) -> None:
    _, config = appliance(tmp_path)
    done = agent("check", "--config", str(config))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"ok: {config}\n", "")


def test_a_state_dir_where_the_lock_cannot_be_made_is_refused_as_start_stops(tmp_path
                                                                             ) -> None:
    state, config = appliance(tmp_path)
    before = sorted(p.name for p in state.iterdir())
    state.chmod(0o500)
    try:
        done = agent("check", "--config", str(config))
        ran = agent("run", "--config", str(config))
    finally:
        state.chmod(0o700)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr == (
        f"fedge agent: state_dir {state} (mode 0500, owner {user()}) cannot be written as "
        f"user {user()}: `fedge agent run` as user {user()} would stop at start (it cannot "
        f"take its lock there); give the agent's user the directory (e.g. chown -R fedge: "
        f"{state})\n")
    # as start does stop, as that user, on its lock
    assert ran.returncode == 2 and f"cannot open the agent lock {state / 'agent.lock'}" \
        in ran.stderr, ran.stderr
    assert sorted(p.name for p in state.iterdir()) == before  # check wrote nothing


def test_a_state_dir_the_agent_cannot_write_beside_its_lock_exits_1(tmp_path) -> None:
    """The lock is there (an earlier start), so start goes on; each job fails."""
    state, config = appliance(tmp_path)
    (state / "agent.lock").write_bytes(b"")
    state.chmod(0o500)
    try:
        done = agent("check", "--config", str(config))
    finally:
        state.chmod(0o700)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert done.stderr == (
        f"fedge agent: state_dir {state} (mode 0500, owner {user()}) cannot be written as "
        f"user {user()}: the agent starts, but a job's state, the privacy ledger, the "
        "reveal log and signed updates cannot be written there: each job or update on it "
        f"fails; give the agent's user the directory (e.g. chown -R fedge: {state})\n")


def test_a_privacy_ledger_the_agent_cannot_write_exits_1_naming_it(tmp_path) -> None:
    state, config = appliance(tmp_path)
    privacy = state / "privacy"
    privacy.mkdir()
    ledger = privacy / "ledger.json"
    ledger.write_text("{}")
    ledger.chmod(0o400)
    privacy.chmod(0o500)
    try:
        done = agent("check", "--config", str(config))
    finally:
        privacy.chmod(0o700)
    assert (done.returncode, done.stdout) == (1, ""), done.stderr
    lines = done.stderr.splitlines()
    assert [line.partition(": the agent starts")[0] for line in lines] == [
        f"fedge agent: its directory {privacy} (mode 0500, owner {user()}) cannot be written "
        f"as user {user()}",
        f"fedge agent: its file {ledger} (mode 0400, owner {user()}) cannot be written as "
        f"user {user()}"]
