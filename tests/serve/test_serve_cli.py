"""`fedge serve` / `fedge export` argument checking (in-process: argparse only, nothing heavy)."""

from __future__ import annotations

import subprocess
import sys

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
