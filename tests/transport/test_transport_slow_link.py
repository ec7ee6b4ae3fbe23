"""A model larger than one frame can carry within the ZMTP heartbeat timeout still
arrives over a slow link.

libzmq restarts its ZMTP heartbeat timeout and TTL timers only when a whole frame
has been received.  A model sent as one frame over a link too slow to carry it
within the timeout was cut off mid-frame every time (a 4.4 MB model at 100 KB/s
against the 30 s floor: the site never trained, "connection lost during
training").  Here a real CurveZMQ server and client talk through a throttling TCP
proxy, with the ZMTP timeout shortened to 1.5 s and the link capped so that the
8 MB message, as one frame, would take ~2.7 s, while one default chunk
(``fedge.wire.DEFAULT_CHUNK_BYTES``) takes ~0.35 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

import numpy as np
import pytest

from fedge.transport import (
    Backoff,
    ClientEvent,
    ClientSocket,
    CurveKeyPair,
    HeartbeatConfig,
    Peer,
    ServerSocket,
)
from fedge.transport.server import MAX_FRAMES_PER_MESSAGE
from fedge.wire import DEFAULT_CHUNK_BYTES, Tensor, decode, encode, message

pytestmark = pytest.mark.timeout(60)

RATE = 3_000_000  # bytes per second, each direction
MODEL_BYTES = 8_000_000  # one frame: ~2.7 s at RATE
ZMTP_TIMEOUT = 1.5  # seconds
SLOW_HB = HeartbeatConfig(interval=0.25, timeout=3.0, zmtp_timeout=ZMTP_TIMEOUT)


@message("test.transport.slowlink", max_bytes=None, tensors={"weights": Tensor("uint8", 1)})
@dataclass(frozen=True)
class Model:
    weights: np.ndarray


class ThrottlingProxy:
    """A TCP proxy on 127.0.0.1 that forwards each direction at ``rate`` bytes/s."""

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        for r, w in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.ensure_future(self._pump(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        start, sent = time.monotonic(), 0
        try:
            while data := await r.read(16 * 1024):
                w.write(data)
                await w.drain()
                sent += len(data)
                # pace against the clock, so the link's rate does not drift down
                await asyncio.sleep(max(0.0, start + sent / self.rate - time.monotonic()))
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _first(received: asyncio.Future[object], lost: asyncio.Future[str],
                 timeout: float) -> object:
    """The received message, or fail naming the connection loss that came first."""
    done, _ = await asyncio.wait({received, lost}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if received in done:
        return received.result()
    if lost in done:
        raise AssertionError(f"the connection was lost mid-transfer: {lost.result()}")
    raise AssertionError(f"nothing arrived within {timeout} s")


async def _transfer(direction: str) -> None:
    server_keys, agent = CurveKeyPair.generate(), CurveKeyPair.generate()
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[str] = loop.create_future()

    def on_peer_lost(peer: Peer) -> None:
        if not lost.done():
            lost.set_result(f"the server lost its peer {peer.address}")

    def on_event(event: ClientEvent) -> None:
        if event.kind != "connected" and not lost.done():
            lost.set_result(f"client event {event.kind}: {event.detail}")

    server = ServerSocket(server_keys, allowed=[agent.public], heartbeat=SLOW_HB,
                          on_peer_lost=on_peer_lost)
    port = int(server.bind("tcp://127.0.0.1:0").rsplit(":", 1)[1])
    proxy = ThrottlingProxy(port, RATE)
    client = ClientSocket(
        agent, server_keys.public, f"tcp://127.0.0.1:{await proxy.start()}",
        heartbeat=SLOW_HB, on_event=on_event,
        backoff=Backoff(initial=0.1, maximum=0.5, rng=random.Random(0)),
    )
    client.start()
    try:
        await client.wait_connected(10)
        await client.send(encode(Model(np.zeros(1, np.uint8)), sender="agent"), timeout=5)
        hello = await server.recv(timeout=5)
        weights = np.random.default_rng(7).integers(0, 256, MODEL_BYTES, dtype=np.uint8)
        frames = encode(Model(weights), sender="x")
        t = time.monotonic()
        if direction == "coordinator_to_agent":  # a TrainTask
            await server.send(hello.peer, frames)
            received = asyncio.ensure_future(client.recv())
        else:  # the agent's update
            await client.send(frames, timeout=5)
            received = asyncio.ensure_future(server.recv())
        try:
            got = await _first(received, lost, timeout=4 * MODEL_BYTES / RATE + 5)
        finally:
            received.cancel()
        elapsed = time.monotonic() - t
        got_frames = got if isinstance(got, list) else got.frames  # type: ignore[attr-defined]
        env = decode(got_frames, max_bytes=MODEL_BYTES + (1 << 20))
        np.testing.assert_array_equal(env.body.weights, weights)
        # the link was really that slow: one frame of it would have outlived the timeout
        assert elapsed > 0.8 * MODEL_BYTES / RATE > ZMTP_TIMEOUT
        assert proxy.connections == 1 and not lost.done()
    finally:
        await client.close()
        await server.close()
        await proxy.close()


@pytest.mark.parametrize("direction", ["coordinator_to_agent", "agent_to_coordinator"])
def test_model_arrives_over_a_link_too_slow_for_one_frame_within_the_zmtp_timeout(
    direction: str,
) -> None:
    asyncio.run(asyncio.wait_for(_transfer(direction), 45))
    # why it arrives: each default chunk crosses this link well within the timeout
    assert DEFAULT_CHUNK_BYTES / RATE < ZMTP_TIMEOUT / 3


def test_a_100_mb_model_in_default_chunks_stays_within_the_servers_frame_limit() -> None:
    """The server (this and earlier releases) refuses more than MAX_FRAMES_PER_MESSAGE
    frames; the codec's chunks keep a 100 MB model far below it, and at one 16 GiB
    tensor still within it."""
    weights = np.zeros(100_000_000, np.uint8)
    frames = encode(Model(weights), sender="x")
    assert all(len(memoryview(f)) <= DEFAULT_CHUNK_BYTES for f in frames[2:])
    assert len(frames) == 2 + -(-weights.nbytes // DEFAULT_CHUNK_BYTES) <= 100
    assert (16 << 30) // DEFAULT_CHUNK_BYTES + 2 <= MAX_FRAMES_PER_MESSAGE
