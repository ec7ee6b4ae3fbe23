"""`fedge serve` / `fedge export` argument checking (in-process: argparse only, nothing heavy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cli import build_parser


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["serve", "--port", "70000"], "port 70000 is outside 0..65535"),
        (["serve", "--port", "http"], "port 'http' is not an integer"),
        (["serve", "--threads", "0"], "0 must be >= 1"),
        (["serve", "--poll-interval", "-1"], "-1.0 must be > 0 seconds"),
        (["serve", "--max-body-bytes", "lots"], "'lots' is not an integer"),
        (["serve", "--max-connections", "0"], "0 must be >= 1"),
        (["serve", "--idle-timeout", "0"], "0.0 must be a finite number of seconds > 0"),
        (["serve", "--request-timeout", "inf"], "inf must be a finite number of seconds > 0"),
        (["serve", "--request-timeout", "soon"], "'soon' is not a number of seconds"),
        (["export", "--job", "j", "--input-shape", "3,x"], "comma-separated integers"),
        (["export", "--job", "j", "--input-shape", "3,0"], "needs positive dimensions"),
        (["export"], "--job"),
    ],
)
def test_bad_arguments_are_refused_with_the_rule(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_an_open_file_limit_too_low_for_any_connection_is_a_clear_error(
    tmp_path: Path,
) -> None:
    import resource

    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path),
         "--port", "0"], capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (60, 60)),
    )
    assert proc.returncode == 1
    assert "fedge serve: the open-file limit of 60 leaves no descriptors for client " \
           "connections; raise it above 64" in proc.stderr


def test_registering_and_parsing_imports_nothing_heavy() -> None:
    # a fresh interpreter: this test process has torch loaded already
    code = (
        "import argparse, sys\n"
        "from fedge.serve import cli\n"
        "parser = argparse.ArgumentParser(); cli.register(parser.add_subparsers())\n"
        "parser.parse_args(['serve', '--port', '0'])\n"
        "parser.parse_args(['export', '--job', 'j'])\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'uvicorn', 'numpy')"
        " if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
