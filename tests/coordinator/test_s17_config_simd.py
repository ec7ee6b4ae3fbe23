"""A $FEDGE_SIMD that names no usable path stops the coordinator at start (exit 2, the
message the agent gives): it started, and every secure round then failed at unmasking
with "ValueError: FEDGE_SIMD='avx9' is not a PRG path"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.coordinator.test_s17_coord_config_bom import provision

REPO = Path(__file__).resolve().parents[2]


def test_the_coordinator_refuses_to_start_with_a_fedge_simd_it_cannot_use(tmp_path):
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\nbind = "tcp://127.0.0.1:0"\n')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                         cwd=REPO, env=os.environ | {"FEDGE_SIMD": "avx9"})
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("fedge coordinator: FEDGE_SIMD='avx9' names no usable path (this "
                           "CPU has: "), last
    assert last.endswith("unset it or name one of those"), last
    assert not (tmp_path / "st" / "endpoint").exists()  # it never listened
