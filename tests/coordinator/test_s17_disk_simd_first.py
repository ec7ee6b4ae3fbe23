"""A $FEDGE_SIMD that names no usable path stops `fedge coordinator run` before it
touches the state directory: no directory, lock or database is made for a start that
is refused (the check ran after the lock was taken and the database opened, creating
both in a fresh state directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def test_a_bad_fedge_simd_makes_no_state_dir_lock_or_database(tmp_path):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\nbind = "tcp://127.0.0.1:0"\n')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=os.environ | {"FEDGE_SIMD": "avx9"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        "fedge coordinator: FEDGE_SIMD='avx9' names no usable path"), out.stderr
    assert not (tmp_path / "st").exists(), sorted(p.name for p in (tmp_path / "st").iterdir())
