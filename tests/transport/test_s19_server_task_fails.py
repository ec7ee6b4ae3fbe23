"""A server socket whose own task dies (its reader, its heartbeats) says so, and so does
its owner: ``recv`` raises naming the task and the error (a waiting one is woken),
``on_failure`` is called, and the coordinator stops, exit 70, so that systemd restarts
it. The tasks had no done-callback: a dead reader left the coordinator waiting on an
empty queue for ever, deaf to every site while it ticked, pinged its watchdog and
looked alive; the error surfaced, if at all, as "Task exception was never retrieved".
The coordinator's outbox, too, dropped a message whose site's key it could not look
up without a word.

Real ZeroMQ + CURVE on 127.0.0.1, the real serve loop and SQLite; the fault is a method
of a real object raising (fault injection, not a stand-in for a boundary)."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from fedge.coordinator import process
from fedge.coordinator.service import Coordinator, Outgoing
from fedge.transport import (
    Backoff,
    ClientSocket,
    CurveKeyPair,
    HeartbeatConfig,
    ServerSocket,
    TransportError,
)
from fedge.transport.heartbeat import HeartbeatMonitor
from fedge.wire import messages as m
from tests.coordinator.test_s17_disk_queued_job_waits import _config, _until

pytestmark = pytest.mark.timeout(90)

HB = HeartbeatConfig(interval=0.1, timeout=0.6)


def test_a_dead_reader_wakes_recv_with_its_error_and_is_logged(caplog) -> None:
    async def main() -> tuple[str, float, list[BaseException]]:
        server_keys, client_keys = CurveKeyPair.generate(), CurveKeyPair.generate()
        failures: list[BaseException] = []
        server = ServerSocket(server_keys, allowed=[client_keys.public], heartbeat=HB)
        endpoint = server.bind("tcp://127.0.0.1:0")
        client = ClientSocket(client_keys, server_keys.public, endpoint, heartbeat=HB,
                              backoff=Backoff(initial=0.05, maximum=0.2, jitter=0.5,
                                              rng=random.Random(0)))
        try:
            client.start()
            await client.wait_connected(5)
            waiting = asyncio.create_task(server.recv(timeout=30))
            await asyncio.sleep(0.05)

            def broken(rid, first):  # type: ignore[no-untyped-def]
                raise RuntimeError("injected fault in the reader")

            server._track = broken  # type: ignore[method-assign]  # the client's next beat
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(TransportError) as err:
                await waiting
            took = asyncio.get_running_loop().time() - t0
            with pytest.raises(TransportError):  # and every recv after it, at once
                await server.recv(timeout=30)
            failures.append(server.failure)  # type: ignore[arg-type]
            return str(err.value), took, failures
        finally:
            await client.close()
            await server.close()

    with caplog.at_level(logging.DEBUG, logger="fedge.transport"):
        text, took, failures = asyncio.run(asyncio.wait_for(main(), 40))
    assert text.endswith(" no longer works: its reader stopped on an error: RuntimeError: "
                         "injected fault in the reader"), text
    assert text.startswith("the server socket on tcp://127.0.0.1:"), text
    assert took < 5, took
    assert isinstance(failures[0], RuntimeError)
    (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.name == "fedge.transport.server" and line.exc_info is not None
    assert "its reader stopped on an error: RuntimeError: injected fault" in line.getMessage()


def test_a_coordinator_whose_socket_task_dies_stops_with_70(tmp_path, caplog,
                                                             monkeypatch) -> None:
    """The socket's heartbeat task dies (its monitor raising): the serve loop logs it
    once at ERROR, with the traceback, and returns 70; the process exits with it."""
    def broken(self, now):  # type: ignore[no-untyped-def]
        raise RuntimeError("injected fault in the heartbeats")

    coord = Coordinator(tmp_path / "coord")

    async def go() -> tuple[int, float]:
        served = asyncio.create_task(process.serve(_config(coord), coordinator=coord))
        assert await _until(lambda: (coord.state_dir / "endpoint").exists(), 10)
        monkeypatch.setattr(HeartbeatMonitor, "expired", broken)
        t0 = asyncio.get_running_loop().time()
        code = await asyncio.wait_for(served, 20)
        return code, asyncio.get_running_loop().time() - t0

    with caplog.at_level(logging.INFO, logger="fedge"):
        code, took = asyncio.run(go())
    assert code == 70 == process.TRANSPORT_FAILED_EXIT
    assert took < 10, took
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    (line,) = errors
    assert line.name == "fedge.coordinator" and line.exc_info is not None
    text = line.getMessage()
    assert text.startswith("the coordinator's socket no longer works (tcp://127.0.0.1:"), text
    assert text.endswith("): RuntimeError: injected fault in the heartbeats; the "
                         "coordinator stops (exit 70) so that systemd restarts it"), text


def test_a_message_for_a_site_whose_key_cannot_be_looked_up_is_logged(tmp_path,
                                                                     caplog) -> None:
    coord = Coordinator(tmp_path / "coord")

    async def go() -> None:
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(_config(coord), stop=stop,
                                                   coordinator=coord))
        assert await _until(lambda: (coord.state_dir / "endpoint").exists(), 10)
        coord.outbox.append(Outgoing("site-gone", m.Rejected(reason="not enrolled")))
        said = await _until(lambda: any("site-gone" in r.getMessage()
                                        for r in caplog.records), 10)
        stop.set()
        assert await served == 0
        assert said

    with caplog.at_level(logging.INFO, logger="fedge.coordinator"):
        asyncio.run(go())
    (line,) = [r for r in caplog.records if "site-gone" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.getMessage() == ("Rejected for site-gone not sent: its key cannot be "
                                 "looked up: StoreError: \"unknown site 'site-gone'\"")
