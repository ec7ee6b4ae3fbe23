"""A site whose agent sends heartbeats less often than the coordinator's [heartbeat]
timeout_s flaps, "connected" then "disconnected: its connection closed or went silent",
and nobody said why. The line now says how long it was silent, the setting it was held
to and the file, and that the agent's interval_s must be shorter; a site that keeps
doing it is warned of once. Over real CurveZMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.process import serve
from fedge.coordinator.service import Coordinator
from fedge.secagg.keys import Identity
from fedge.transport import ClientSocket, CurveKeyPair, HeartbeatConfig
from fedge.wire import codec
from tests.coordinator.test_hostile_messages import _wait
from tests.coordinator.test_s15_joblog_lines import LOGGER, heartbeat, lines


def test_a_site_heard_less_often_than_the_timeout_is_said_why_and_warned_of_once(
        tmp_path, caplog):
    # the coordinator's own link check waits 30 s: the transport's 0.4 s drops the site
    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8, np.float32),
                        heartbeat_timeout_s=30.0)
    site = CurveKeyPair.generate()
    coord.enrol("a", site.public, Identity.generate().public_bytes(), actor="test")
    keys = CurveKeyPair.generate()
    toml = tmp_path / "coordinator.toml"
    cfg = CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                            b"", b"", heartbeat_interval_s=0.1, heartbeat_timeout_s=0.4,
                            tick_s=0.02, path=toml)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        assert await _wait(lambda: (coord.state_dir / "endpoint").exists())
        endpoint = (coord.state_dir / "endpoint").read_text().strip()
        # an agent beating every 0.7 s, its timeout its own
        async with ClientSocket(site, keys.public, endpoint,
                                heartbeat=HeartbeatConfig(0.7, 10.0)) as c:
            await c.wait_connected(20)
            for _ in range(5):
                await c.send(codec.encode(heartbeat("a"), sender="a"))
                if lines(caplog, "site a went silent"):
                    break
                await asyncio.sleep(0.7)
        stop.set()
        return await served

    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert asyncio.run(go()) == 0
    gone = lines(caplog, "site a disconnected")
    assert gone, caplog.text  # (after LINK_LOG_BURST lines a window counts them)
    assert gone[0].startswith("site a disconnected: went silent: nothing came from it for "), gone
    assert gone[0].endswith(f" s, past [heartbeat] timeout_s = 0.4 in {toml}; its agent's "
                            "[heartbeat] interval_s must be shorter (127.0.0.1)"), gone
    silent_s = float(gone[0].split("for ")[1].split(" s,")[0])
    assert 0.4 <= silent_s < 5, gone
    (warning,) = lines(caplog, "site a went silent", level=logging.WARNING)
    assert warning == ("site a went silent 3 times in 600 s, coming back each time: an agent "
                       "sending its heartbeats less often than this coordinator's [heartbeat] "
                       f"timeout_s = 0.4 in {toml} does that. Its agent.toml's [heartbeat] "
                       "interval_s must be shorter (default 1.0)"), warning
