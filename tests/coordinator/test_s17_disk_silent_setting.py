"""A site the coordinator counts disconnected for its own silence check (the transport
said nothing) is said so naming the setting it was held to and its file, as the
transport's went-silent line does (process._went_silent): "not heard from for over
30 s ([heartbeat] timeout_s = 30 in FILE): counted as disconnected"."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.process import serve
from fedge.coordinator.service import Coordinator
from fedge.transport import CurveKeyPair
from tests.coordinator.test_s15_joblog_lines import LOGGER, heartbeat, lines, send


def test_a_site_silent_past_the_timeout_is_said_with_the_setting_and_its_file(
        federation, caplog):
    fed = federation(["a", "b"])
    fed.coord.config_path = Path("/etc/fedge/coordinator.toml")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        send(fed, "b", heartbeat("b"))
        fed.coord.tick()
        fed.clock.t += fed.coord.heartbeat_timeout_s + 1
        fed.coord.tick()
    assert lines(caplog, "site b not heard") == [
        "site b not heard from for over 30 s ([heartbeat] timeout_s = 30 in "
        "/etc/fedge/coordinator.toml): counted as disconnected"]


def test_serve_hands_the_coordinator_its_config_file(tmp_path):
    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8, np.float32))
    keys = CurveKeyPair.generate()
    toml = tmp_path / "coordinator.toml"
    cfg = CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                            b"", b"", tick_s=0.02, path=toml)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        await asyncio.sleep(0.3)
        stop.set()
        return await served

    assert asyncio.run(go()) == 0
    assert coord.config_path == toml
