"""`fedge serve` refuses a poll interval its watcher thread cannot wait on and a thread
count that would exhaust the machine, and Ctrl-C stops it without a traceback. The
real CLI in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def max_threads() -> int:
    return 4 * (os.cpu_count() or 1)  # the rule --threads is held to



def _serve(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path),
         "--port", "0", *extra], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["1e10", "inf", "3601", "nan"])
def test_a_poll_interval_the_watcher_cannot_wait_on_is_refused(tmp_path: Path,
                                                                value: str) -> None:
    # 1e10 or inf started, then killed the watcher thread (OverflowError): new model
    # versions were never loaded
    proc = _serve(tmp_path, "--poll-interval", value)
    assert proc.returncode == 2
    assert "--poll-interval" in proc.stderr
    assert "must be > 0 seconds and at most 3600" in proc.stderr
    assert "Traceback" not in proc.stderr and "listening" not in proc.stdout


@pytest.mark.parametrize("value", [str(max_threads() + 1), "100000",
                                   "99999999999999999999"])
def test_more_threads_than_four_per_cpu_are_refused(tmp_path: Path, value: str) -> None:
    proc = _serve(tmp_path, "--threads", value)
    assert proc.returncode == 2
    assert f"{value} is more than {max_threads()} (4 per CPU" in proc.stderr
    assert "listening" not in proc.stdout


def test_ctrl_c_stops_serve_with_130_and_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path / "models"),
         "--port", "0", "--threads", str(max_threads())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert "fedge serve listening on http://127.0.0.1:" in proc.stdout.readline()
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
