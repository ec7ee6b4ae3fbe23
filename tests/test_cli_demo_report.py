"""`fedge demo --report PATH` where PATH is a file is refused in one line (it was a
FileExistsError traceback once the federation had been set up). Real CLI, subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_report_path_that_is_a_file_is_refused_in_one_line(tmp_path: Path) -> None:
    report = tmp_path / "empty"
    report.write_text("")
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "demo", "--report", str(report),
                           "--rounds", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"fedge demo: --report {report} exists and is not a directory (the report is a "
        "directory of curves, metrics.json and model.onnx)")
    assert report.read_text() == ""
