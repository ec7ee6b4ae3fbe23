"""While the next job's starting model waits for a disk that cannot take it, the
coordinator still ticks: a site gone silent past the heartbeat timeout is counted
disconnected, and the summaries of refused events are written. The loop skipped the
tick for as long as the wait lasted (its branch for the job waiting was an ``elif``
before the tick), so the silence checks and those summaries stopped.

The full disk is real: the state directory on its own tmpfs with 2 MB left and a
4.4 MB starting model (skipped where a tmpfs cannot be mounted). The real serve loop,
SQLite, the model built in its child process, and a site over CurveZMQ on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging

from fedge.coordinator import process
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.service import Coordinator
from fedge.secagg.keys import Identity
from fedge.transport import ClientSocket, CurveKeyPair, HeartbeatConfig
from fedge.wire import codec
from tests.coordinator.test_hostile_messages import _wait
from tests.coordinator.test_s15_joblog_lines import LOGGER, heartbeat, lines
from tests.coordinator.test_s17_disk_export_retried import BIG_PLAN, leave_free
from tests.update.test_audit_crash_full_disk import small_disk


def test_a_site_gone_silent_is_counted_disconnected_while_a_job_waits_for_the_disk(
        tmp_path, caplog):
    with small_disk(tmp_path / "coord", "16m") as state_dir:
        # the coordinator's own silence check: 0.5 s; the transport's (ZeroMQ's
        # heartbeats, which the agent's socket keeps sending) 30 s
        coord = Coordinator(state_dir, heartbeat_timeout_s=0.5)
        site = CurveKeyPair.generate()
        coord.enrol("a", site.public, Identity.generate().public_bytes(), actor="test")
        job = coord.submit_job(BIG_PLAN, actor="test")
        leave_free(state_dir, 2 << 20)
        keys = CurveKeyPair.generate()
        cfg = CoordinatorConfig(state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                                b"", b"", heartbeat_interval_s=0.1, heartbeat_timeout_s=30.0,
                                tick_s=0.02)

        async def go():
            stop = asyncio.Event()
            served = asyncio.create_task(process.serve(cfg, stop=stop, coordinator=coord))
            assert await _wait(lambda: bool(lines(caplog, f"job {job} waits")), 30), \
                caplog.text
            endpoint = (state_dir / "endpoint").read_text().strip()
            async with ClientSocket(site, keys.public, endpoint,
                                    heartbeat=HeartbeatConfig(0.1, 30.0)) as c:
                await c.wait_connected(20)
                await c.send(codec.encode(heartbeat("a"), sender="a"))
                assert await _wait(lambda: bool(lines(caplog, "site a connected")), 10)
                # then nothing more from it: past 0.5 s, the tick's check counts it gone
                gone = await _wait(lambda: bool(lines(caplog, "site a not heard from")), 10)
            status = coord.store.job(job).status
            stop.set()
            assert await served == 0
            return gone, status

        with caplog.at_level(logging.INFO, logger=LOGGER):
            gone, status = asyncio.run(go())
    assert status == "queued"  # still waiting for the disk
    assert gone, caplog.text
    (line,) = lines(caplog, "site a not heard from")
    assert line == ("site a not heard from for over 0.5 s ([heartbeat] timeout_s = 0.5): "
                    "counted as disconnected"), line
