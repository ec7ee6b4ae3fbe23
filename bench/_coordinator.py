"""A real `fedge coordinator` process for the benches that need one (scale, updates)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedge.demo.loopback import wait_for

__all__ = ["start_coordinator"]


def start_coordinator(root: Path, coord_dir: Path, roster_public_key: str, *,
                      heartbeat: tuple[float, float], extra: str = "",
                      env: dict[str, str] | None = None,
                      ) -> tuple[subprocess.Popen[bytes], str]:
    """Write ``root/coordinator.toml`` (state ``coord_dir``, CURVE key
    ``root/keys/coordinator.key_secret``, roster ``root/roster.json``, an ephemeral
    loopback port, ``extra`` top-level lines) and start the coordinator, its output in
    ``root/coordinator.log``; returns the process and its endpoint once it listens.

    Raises: FederationError when it is not listening within 120 s (the process killed)."""
    cfg = root / "coordinator.toml"
    cfg.write_text(
        f'state_dir = "{coord_dir}"\nbind = "tcp://127.0.0.1:0"\n'
        f'curve_key = "{root / "keys" / "coordinator.key_secret"}"\n'
        f'roster = "{root / "roster.json"}"\n'
        f'roster_public_key = "{roster_public_key}"\n{extra}'
        f"[heartbeat]\ninterval_s = {heartbeat[0]}\ntimeout_s = {heartbeat[1]}\n")
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("NOTIFY_SOCKET", None)
    with open(root / "coordinator.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "--config",
                                 str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        endpoint = wait_for(lambda: (coord_dir / "endpoint").exists()
                            and (coord_dir / "endpoint").read_text().strip(), 120,
                            "the coordinator's endpoint")
    except BaseException:
        proc.kill()
        raise
    return proc, endpoint
