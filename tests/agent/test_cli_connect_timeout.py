"""`fedge agent --connect-timeout` must be a finite number of seconds > 0: 0 or -1
gave up at once with exit 3, blaming a coordinator that was up; nan waited forever.
The real CLI in a subprocess (refused before any config is read)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("argv", [["--connect-timeout", "{v}", "--config", "{c}"],
                                  ["run", "--config", "{c}", "--connect-timeout", "{v}"]])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_connect_timeout_that_is_not_positive_and_finite_is_refused(
        tmp_path: Path, argv: list[str], value: str) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "agent",
         *(a.format(v=value, c=cfg) for a in argv)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert (f"--connect-timeout: {float(value)} must be a finite number of seconds > 0"
            in proc.stderr)
    assert "coordinator" not in proc.stderr.splitlines()[-1]


def test_an_agent_whose_fedge_simd_names_no_usable_path_refuses_to_start(
        tmp_path: Path) -> None:
    """Every masking call would raise: the site would only drop out of every secure
    round, silently. It is refused at start, naming the variable."""
    import os

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "run", "--config",
                           str(cfg)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FEDGE_SIMD": "AVX512"})
    assert proc.returncode == 2
    assert "FEDGE_SIMD='AVX512' names no usable path" in proc.stderr
    assert "Traceback" not in proc.stderr
