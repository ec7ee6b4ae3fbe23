"""A message the server's reader already holds, waiting for room in a full receive
queue, is not delivered when its sender's key is revoked during that wait; the other
appliances' messages, queued before and sent after, are.

`_purge_queue` drops what is already queued; this is the one message read off the
socket but not yet queued. Kills mutation M18 (server.py's "not revoked while we
waited" check made ``if True``).

Real ZeroMQ + CURVE on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedge.transport import Backoff, ClientSocket, CurveKeyPair, HeartbeatConfig, ServerSocket
from fedge.wire import Tensor, decode, encode, message

pytestmark = pytest.mark.timeout(60)

HB = HeartbeatConfig(interval=0.1, timeout=0.6)


@message("test.transport.s15.held", max_bytes=None, tensors={"data": Tensor("float32", 1)})
@dataclass(frozen=True)
class Held:
    name: str
    data: np.ndarray


def blob(name: str) -> list[Any]:
    """A message of about 20 000 bytes: two fit in a 50 000-byte queue, three do not."""
    return encode(Held(name, np.full(5000, 1, np.float32)), sender="s")


def run(coro: Coroutine[Any, Any, Any], timeout: float = 40.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_a_message_held_for_queue_room_is_dropped_when_its_key_is_revoked_meanwhile() -> None:
    async def main() -> None:
        server_keys, keep, revoke = (CurveKeyPair.generate() for _ in range(3))
        server = ServerSocket(server_keys, allowed=[keep.public, revoke.public],
                              heartbeat=HB, queue_bytes=50_000)
        endpoint = server.bind("tcp://127.0.0.1:0")
        clients = [ClientSocket(k, server_keys.public, endpoint, heartbeat=HB,
                                backoff=Backoff(initial=0.05, maximum=0.2, jitter=0.5,
                                                rng=random.Random(0)))
                   for k in (keep, revoke)]
        good, bad = clients
        try:
            for c in clients:
                c.start()
            await good.wait_connected(5)
            await bad.wait_connected(5)
            # the queue fills with the kept appliance's messages
            for name in ("kept-0", "kept-1"):
                await good.send(blob(name), timeout=5)
            await wait_until(lambda: server._queue.qsize() == 2)
            # the revoked appliance's one message is read and held: no room for it
            await bad.send(blob("revoked"), timeout=5)
            await wait_until(lambda: server._reader_waiting)
            assert server._queue.qsize() == 2
            server.set_allowed([keep.public])
            await good.send(blob("kept-after"), timeout=5)
            got = []
            with contextlib.suppress(TimeoutError):
                while len(got) < 10:
                    got.append(await server.recv(timeout=1.0))
            assert [decode(m.frames, max_bytes=1 << 20).body.name for m in got] == [
                "kept-0", "kept-1", "kept-after"]
            assert {m.peer.public_key for m in got} == {keep.public}
            assert server._queued_bytes == 0
        finally:
            for c in clients:
                await c.close()
            await server.close()

    run(main())
