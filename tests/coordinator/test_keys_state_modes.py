"""State created by hand (umask 022, not under the unit's UMask=0077) is not left
readable by other local users: the coordinator's new state directory is 0700."""

from __future__ import annotations

import os
import stat

from fedge.console.store import ConsoleStore
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.process import build_coordinator


def test_a_new_coordinator_state_dir_is_0700_under_umask_022(tmp_path):
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://127.0.0.1:1")
    state = tmp_path / "var" / "coordinator"
    cfg = CoordinatorConfig(state_dir=state, bind="tcp://127.0.0.1:1", curve_public="",
                            curve_secret="", roster=console.roster().to_bytes(),
                            roster_public_key=console.roster_public_key())
    old = os.umask(0o022)
    try:
        coord = build_coordinator(cfg)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert any(state.iterdir()), "the database is inside it"
    finally:
        coord.close()
