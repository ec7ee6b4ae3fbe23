"""The state directory's lock (fedge.instance_lock) belongs to the process that took
it: a child it forked (a torch DataLoader worker) does not hold it, so a SIGKILLed
agent whose child lives on does not keep its restart out."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.instance_lock import InstanceLocked, hold

REPO = Path(__file__).resolve().parents[2]

HOLD_AND_FORK = """
import os, sys, time
from pathlib import Path
from fedge.instance_lock import hold
hold(Path(sys.argv[1]), "agent")
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
Path(sys.argv[2]).write_text(str(child))
time.sleep(60)
"""

TAKE = """
import sys
from pathlib import Path
from fedge.instance_lock import InstanceLocked, hold
try:
    hold(Path(sys.argv[1]), "agent")
except InstanceLocked as exc:
    print(exc)
    sys.exit(2)
"""


def take(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", TAKE, str(state)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_a_forked_child_outliving_its_killed_parent_does_not_hold_the_lock(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    child_file = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(state),
                               str(child_file)], cwd=REPO)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not child_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(child_file.read_text())
        refused = take(state)
        assert refused.returncode == 2
        assert f"another agent (pid {parent.pid}) is running on state directory {state}" \
            in refused.stdout
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        os.kill(child, 0)  # the forked child lives on
        assert take(state).returncode == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_taking_it_again_in_the_same_process_is_a_no_op_and_a_bad_directory_is_named(
        tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert hold(state, "test-role") == hold(state, "test-role")
    with pytest.raises(InstanceLocked, match=r"cannot open the agent lock .*/missing/agent"):
        hold(tmp_path / "missing", "agent")


def test_a_lock_whose_pid_cannot_be_written_still_holds_and_the_process_goes_on(
        tmp_path: Path) -> None:
    """A full disk (here: a file size limit of 0 bytes) made writing the pid raise out
    of `hold`, a traceback where the agent used to start and report itself not
    eligible. The lock is taken, the pid note is missing, a second holder is refused."""
    code = """
import resource, signal, sys
from pathlib import Path
from fedge.instance_lock import InstanceLocked, hold
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
hold(Path(sys.argv[1]), "agent")
print("held", flush=True)
sys.stdin.readline()
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = ""
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "held":
            _, err = proc.communicate(timeout=30)
        assert line == "held", err
        with pytest.raises(InstanceLocked, match="another agent"):
            hold(tmp_path, "agent")
    finally:
        if proc.returncode is None:
            _, err = proc.communicate("\n", timeout=30)
    assert proc.returncode == 0, err


HOLD_OR_SAY = """
import sys, time
from pathlib import Path
from fedge.instance_lock import InstanceLocked, hold
try:
    hold(Path(sys.argv[1]), "agent")
except InstanceLocked as exc:
    print("refused:", exc, flush=True)
    sys.exit(0)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _read_only_view(state: Path, script: str) -> subprocess.CompletedProcess:
    """Run `script` (bash) where ``state`` is bind-mounted read-only, in a private mount
    namespace; skip where this machine allows none (no root, no unshare)."""
    import shutil

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a read-only bind mount")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m refused here: {probe.stderr.decode()[-200:]}")
    return subprocess.run(
        ["unshare", "-m", "bash", "-c",
         f"mount --bind {state} {state} && mount -o remount,ro,bind {state} && {script}"],
        capture_output=True, text=True, timeout=120)


def test_on_a_read_only_state_dir_a_second_agent_is_still_refused(tmp_path: Path) -> None:
    """A file system remounted read-only cannot hold a written lock file: the lock is
    taken without writing, and a second agent is refused all the same, whether the
    first took its lock on the read-only directory or while it was writable."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.lock").write_text("")
    code = tmp_path / "hold.py"
    code.write_text(HOLD_OR_SAY)
    py = f"{sys.executable} {code} {state}"
    both = _read_only_view(state, f"({py} 5 &) ; sleep 2; {py} 0; wait")
    assert both.returncode == 0, both.stderr
    assert both.stdout.splitlines()[0] == "held", both.stdout + both.stderr
    assert both.stdout.splitlines()[1].startswith("refused: another agent is running on "
                                                  f"state directory {state}"), both.stdout
    first = subprocess.Popen([sys.executable, str(code), str(state), "20"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "held"
        late = _read_only_view(state, f"{py} 0")
        assert late.stdout.startswith(f"refused: another agent (pid {first.pid})"), \
            late.stdout + late.stderr
    finally:
        first.kill()
        first.wait(timeout=30)
