"""What `fedge` does for every command: Ctrl-C while it is still importing exits 130
without a traceback, a reader that stops reading (`| head`) ends it quietly, and a
closed standard output is refused instead of losing what the command prints (a
submitted job's id). The real CLI in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

FEDGE = [sys.executable, "-m", "fedge.cli"]


def test_ctrl_c_while_the_command_imports_exits_130_without_a_traceback(
        tmp_path: Path) -> None:
    # -X importtime writes a line as each module finishes importing: after fedge.systemd
    # serve's handler imports the server (numpy, onnxruntime, starlette, then uvicorn)
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "fedge.cli", "serve", "--repository",
         str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        for _ in range(5000):
            line = proc.stderr.readline()
            assert line, "the command ended before it imported fedge.systemd"
            if line.rstrip().endswith("| fedge.systemd"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]


def _privacy_argv(tmp_path: Path) -> list[str]:
    """`fedge agent privacy` of an appliance that has not trained: a table on stdout
    (print, so buffered: argparse's --help swallows its own write errors)."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "enrolment.json").write_text("{}")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    return [*FEDGE, "agent", "privacy", "--config", str(cfg)]


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # `fedge ... | head -0`
    try:
        proc = subprocess.run(_privacy_argv(tmp_path), stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr  # 128 + SIGPIPE, as for other Unix tools
    assert proc.stderr == ""


def test_a_closed_stdout_is_refused_instead_of_losing_the_result(tmp_path: Path) -> None:
    # `fedge coordinator submit ... >&-` printed the new job's id to nowhere, rc 0
    proc = subprocess.run(_privacy_argv(tmp_path), stderr=subprocess.PIPE, text=True,
                          timeout=120, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fedge: standard output (file descriptor 1) is closed, so what this command prints "
        "would be lost; give it one (>/dev/null to discard it)")


def test_a_console_command_whose_reader_stops_reading_ends_quietly_too(tmp_path: Path) -> None:
    """The console's own error handler took the broken pipe for a failure to report
    (`fedge console: [Errno 32] Broken pipe`, rc 1)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*FEDGE, "console", "--home", str(tmp_path / "c"), "init",
                               "--coordinator", "tcp://127.0.0.1:7700"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
