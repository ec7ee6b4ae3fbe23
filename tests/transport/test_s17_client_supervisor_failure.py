"""A client whose sockets cannot be made says so (s17 F2).

The supervisor task makes every socket; when libzmq refused an option (a heartbeat
TTL above its cap) the task died with the exception unretrieved, and the agent kept
"connecting" for ever with nothing in its log. Now the failure is logged at ERROR and
``wait_connected`` / ``send`` raise ``NotConnected`` naming it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from fedge.transport import ClientSocket, CurveKeyPair, NotConnected
from fedge.transport.heartbeat import HeartbeatConfig


def client(heartbeat: HeartbeatConfig) -> ClientSocket:
    # nothing listens there: only making the socket is tried
    return ClientSocket(CurveKeyPair.generate(), CurveKeyPair.generate().public,
                        "tcp://127.0.0.1:9", heartbeat=heartbeat)


def test_a_socket_libzmq_refuses_is_logged_and_raised_to_whoever_waits(caplog) -> None:
    async def scenario() -> tuple[float, str, str]:
        c = client(HeartbeatConfig(1.0, 7000.0))  # TTL 7000000 ms: EINVAL
        c.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(NotConnected) as waited:
                await c.wait_connected(10)
            took = time.monotonic() - t0
            with pytest.raises(NotConnected) as sent:
                await c.send([b"x", b"y"], timeout=10)
        finally:
            await c.close()
        return took, str(waited.value), str(sent.value)

    with caplog.at_level(logging.ERROR, logger="fedge.transport.client"):
        took, waited, sent = asyncio.run(scenario())
    assert took < 5  # not the 10 s timeout
    why = "no connection to tcp://127.0.0.1:9 can be made: ZMQError: Invalid argument"
    assert waited == sent == why
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "no more connections to tcp://127.0.0.1:9: ZMQError" in record.getMessage()
    assert record.exc_info is not None


def test_a_client_that_can_make_its_socket_just_waits(caplog) -> None:
    async def scenario() -> None:
        c = client(HeartbeatConfig(1.0, 5.0))
        c.start()
        try:
            with pytest.raises(TimeoutError):
                await c.wait_connected(0.3)
        finally:
            await c.close()

    with caplog.at_level(logging.ERROR, logger="fedge.transport.client"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
