"""ServerSocket and ClientSocket over real ZeroMQ + CurveZMQ on 127.0.0.1.

Every wait is bounded; ports are picked by the OS.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from fedge.transport import (
    Backoff,
    ClientEvent,
    ClientSocket,
    CurveKeyPair,
    HandshakeFailed,
    HeartbeatConfig,
    NotConnected,
    Peer,
    Refusal,
    ServerSocket,
    TransportError,
)
from fedge.wire import Tensor, decode, encode, message

pytestmark = pytest.mark.timeout(60)

FAST_HB = HeartbeatConfig(interval=0.1, timeout=0.6)


def fast_backoff() -> Backoff:
    return Backoff(initial=0.05, maximum=0.2, jitter=0.5, rng=random.Random(0))


@message("test.transport.blob", max_bytes=None, tensors={"data": Tensor("float32", 1)})
@dataclass(frozen=True)
class Blob:
    name: str
    data: np.ndarray


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Harness:
    """A server with recorded refusals/losses and clients with recorded events."""

    def __init__(self, **server_kw: Any) -> None:
        self.server_keys = CurveKeyPair.generate()
        self.refusals: list[Refusal] = []
        self.lost: list[Peer] = []
        self.superseded: list[tuple[Peer, Peer]] = []
        self.server = ServerSocket(
            self.server_keys,
            on_refused=self.refusals.append,
            on_peer_lost=self.lost.append,
            on_superseded=lambda old, new: self.superseded.append((old, new)),
            heartbeat=server_kw.pop("heartbeat", FAST_HB),
            **server_kw,
        )
        self.clients: list[ClientSocket] = []
        self.endpoint = ""

    def start(self) -> str:
        self.endpoint = self.server.bind("tcp://127.0.0.1:0")
        return self.endpoint

    def client(self, keys: CurveKeyPair, *, server_key: str | None = None,
               endpoint: str | None = None, **kw: Any) -> tuple[ClientSocket, list[ClientEvent]]:
        events: list[ClientEvent] = []
        c = ClientSocket(keys, server_key or self.server_keys.public, endpoint or self.endpoint,
                         heartbeat=kw.pop("heartbeat", FAST_HB), backoff=fast_backoff(),
                         on_event=events.append, **kw)
        c.start()
        self.clients.append(c)
        return c, events

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await self.server.close()


async def wait_until(pred: Any, timeout: float = 5.0, step: float = 0.02) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


@contextlib.asynccontextmanager
async def connected_agent(
    heartbeat: HeartbeatConfig = FAST_HB,
) -> AsyncIterator[tuple[Harness, ClientSocket, list[ClientEvent], CurveKeyPair]]:
    """A harness with one enrolled agent whose connection both sides have seen;
    closed on the way out."""
    agent = CurveKeyPair.generate()
    h = Harness(allowed=[agent.public], heartbeat=heartbeat)
    h.start()
    client, events = h.client(agent, heartbeat=heartbeat)
    try:
        await client.wait_connected(5)
        await wait_until(lambda: h.server.peers())
        yield h, client, events, agent
    finally:
        await h.close()


def test_enrolled_client_exchanges_wire_messages_both_ways() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        h.start()
        client, events = h.client(agent)
        try:
            await client.wait_connected(5)
            w = np.arange(1000, dtype=np.float32)
            await client.send(encode(Blob("up", w), sender="h1", job="j", round=1), timeout=5)
            msg = await h.server.recv(timeout=5)
            assert msg.peer.public_key == agent.public and msg.peer.address == "127.0.0.1"
            env = decode(msg.frames, max_bytes=1 << 20)
            assert env.header.sender == "h1" and env.body.name == "up"
            np.testing.assert_array_equal(env.body.data, w)
            assert h.server.peer_for_key(agent.public) == msg.peer
            await h.server.send(agent.public, encode(Blob("down", w * 2), sender="coordinator"))
            back = decode(await client.recv(timeout=5), max_bytes=1 << 20)
            np.testing.assert_array_equal(back.body.data, w * 2)
            assert [e.kind for e in events] == ["connected"]
            assert h.refusals == []
        finally:
            await h.close()

    run(main())


def test_unknown_key_is_refused_and_reported_with_key_and_address() -> None:
    async def main() -> None:
        h = Harness(allowed=[CurveKeyPair.generate().public])
        h.start()
        stranger = CurveKeyPair.generate()
        client, events = h.client(stranger)
        try:
            with pytest.raises(HandshakeFailed) as err:
                await client.wait_connected(5)
            assert err.value.kind == "refused" and "not enrolled" in err.value.reason
            assert any(e.kind == "handshake_failed" for e in events)
            await wait_until(lambda: h.refusals)
            r = h.refusals[0]
            assert (r.public_key, r.address) == (stranger.public, "127.0.0.1")
            assert "unknown key" in r.reason
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.3)
        finally:
            await h.close()

    run(main())


def test_agent_facing_an_impostor_coordinator_refuses_and_says_so() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        impostor = Harness(allowed=[agent.public])  # even one that would admit the agent
        impostor.start()
        real_coordinator_key = CurveKeyPair.generate().public
        client, events = impostor.client(agent, server_key=real_coordinator_key)
        try:
            with pytest.raises(HandshakeFailed) as err:
                await client.wait_connected(5)
            assert err.value.kind == "impostor"
            assert "refusing to talk" in err.value.reason
            assert real_coordinator_key[:8] in err.value.reason
            assert client.state != "connected"
            kinds = [e.kind for e in events]
            assert "handshake_failed" in kinds and "connected" not in kinds
            # Nothing the agent queued reaches the impostor.
            with pytest.raises(TimeoutError):
                await client.send(encode(Blob("secret", np.ones(3, np.float32)), sender="a"),
                                  timeout=0.3)
            with pytest.raises(TimeoutError):
                await impostor.server.recv(timeout=0.3)
            await wait_until(lambda: impostor.refusals)
            assert impostor.refusals[0].public_key is None
            assert "handshake failed" in impostor.refusals[0].reason
        finally:
            await impostor.close()

    run(main())


def test_enrolment_takes_effect_without_restart() -> None:
    async def main() -> None:
        h = Harness(allowed=[])
        h.start()
        agent = CurveKeyPair.generate()
        client, events = h.client(agent)
        try:
            with pytest.raises(HandshakeFailed):
                await client.wait_connected(5)
            h.server.set_allowed([agent.public])
            await client.wait_connected(5)  # the back-off loop retried by itself
            assert "reconnecting" in [e.kind for e in events]
            await client.send(encode(Blob("hi", np.ones(2, np.float32)), sender="a"), timeout=5)
            assert (await h.server.recv(timeout=5)).peer.public_key == agent.public
        finally:
            await h.close()

    run(main())


def test_revoked_key_is_dropped_at_once_and_cannot_reconnect() -> None:
    async def main() -> None:
        keep, revoke = CurveKeyPair.generate(), CurveKeyPair.generate()
        h = Harness(allowed=[keep.public, revoke.public])
        h.start()
        good, _ = h.client(keep)
        bad, bad_events = h.client(revoke)
        try:
            await good.wait_connected(5)
            await bad.wait_connected(5)
            await wait_until(lambda: len(h.server.peers()) == 2)
            dropped = h.server.set_allowed([keep.public])
            assert [p.public_key for p in dropped] == [revoke.public]
            assert [p.public_key for p in h.server.peers()] == [keep.public]
            await wait_until(lambda: any(e.kind == "handshake_failed" for e in bad_events))
            assert bad.last_failure is not None and bad.last_failure.kind == "refused"
            reasons = [r.reason for r in h.refusals if r.public_key == revoke.public]
            assert reasons and all("revoked" in r for r in reasons)
            with pytest.raises(TimeoutError):
                await bad.send(encode(Blob("x", np.ones(1, np.float32)), sender="b"), timeout=0.3)
            # The other appliance is untouched.
            await good.send(encode(Blob("ok", np.ones(1, np.float32)), sender="g"), timeout=5)
            assert (await h.server.recv(timeout=5)).peer.public_key == keep.public
        finally:
            await h.close()

    run(main())


def test_messages_queued_from_a_key_are_not_delivered_after_it_is_revoked() -> None:
    """Messages a revoked appliance sent before its revocation, still waiting
    for the caller's recv, are dropped with it; other appliances' are kept."""

    async def main() -> None:
        keep, revoke = CurveKeyPair.generate(), CurveKeyPair.generate()
        h = Harness(allowed=[keep.public, revoke.public])
        h.start()
        good, _ = h.client(keep)
        bad, _ = h.client(revoke)
        try:
            await good.wait_connected(5)
            await bad.wait_connected(5)
            for i in range(5):
                await bad.send(encode(Blob(f"bad{i}", np.ones(1, np.float32)), sender="b"),
                               timeout=5)
            await good.send(encode(Blob("ok", np.ones(1, np.float32)), sender="g"), timeout=5)
            # All six read off the socket and waiting in the server's queue.
            await wait_until(lambda: h.server._queue.qsize() == 6)
            h.server.set_allowed([keep.public])
            got = []
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(await h.server.recv(timeout=0.5))
            assert [m.peer.public_key for m in got] == [keep.public]
            assert decode(got[0].frames, max_bytes=1 << 20).body.name == "ok"
        finally:
            await h.close()

    run(main())


def test_disconnect_drops_one_connection_and_the_client_comes_back() -> None:
    async def main() -> None:
        async with connected_agent() as (h, client, events, _):
            first = h.server.peers()[0]
            assert h.server.disconnect(first) is True
            assert h.server.disconnect(first) is False  # already gone
            await wait_until(lambda: any(e.kind == "disconnected" for e in events))
            await wait_until(lambda: client.state == "connected" and h.server.peers())
            assert h.server.peers()[0].routing_id != first.routing_id

    run(main())


def test_server_reports_a_peer_lost_after_heartbeat_timeout() -> None:
    async def main() -> None:
        async with connected_agent() as (h, client, _, agent):
            await asyncio.sleep(1.0)  # > timeout: heartbeats keep it alive
            assert h.lost == [] and len(h.server.peers()) == 1
            await client.close()
            await wait_until(lambda: h.lost, timeout=5)
            assert h.lost[0].public_key == agent.public and h.server.peers() == []
            with pytest.raises(NotConnected):
                await h.server.send(agent.public, [b"x", b"y"])

    run(main())


def test_client_detects_a_silent_coordinator_and_reconnects_to_its_restart() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        endpoint = h.start()
        client, events = h.client(agent)
        try:
            await client.wait_connected(5)
            await h.server.close()
            await wait_until(lambda: client.state != "connected", timeout=5)
            kinds = [e.kind for e in events]
            assert "disconnected" in kinds or "heartbeat_timeout" in kinds
            restarted = ServerSocket(h.server_keys, allowed=[agent.public], heartbeat=FAST_HB)
            assert restarted.bind(endpoint) == endpoint
            try:
                await client.wait_connected(10)
                await client.send(encode(Blob("back", np.ones(1, np.float32)), sender="a"),
                                  timeout=5)
                assert (await restarted.recv(timeout=5)).peer.public_key == agent.public
            finally:
                await restarted.close()
        finally:
            await h.close()

    run(main())


def test_max_message_bytes_disconnects_an_oversize_sender() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public], max_message_bytes=10_000)
        h.start()
        client, events = h.client(agent)
        try:
            await client.wait_connected(5)
            big = encode(Blob("big", np.ones(10_000, np.float32)), sender="a")
            await client.send(big, timeout=5)
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.5)
            await wait_until(lambda: any(e.kind == "disconnected" for e in events))
            await client.wait_connected(5)
            await client.send(encode(Blob("ok", np.ones(10, np.float32)), sender="a"), timeout=5)
            got = decode((await h.server.recv(timeout=5)).frames, max_bytes=10_000)
            assert got.body.name == "ok"
        finally:
            await h.close()

    run(main())


def test_a_message_whose_frames_add_up_past_the_limit_is_refused_and_its_sender_dropped(
) -> None:
    """ZMQ_MAXMSGSIZE bounds each frame; the server bounds the whole message:
    64 frames each under the limit are not handed to recv, the sender is
    reported refused (for the audit log) and lost, and comes back."""

    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public], max_message_bytes=10_000)
        h.start()
        client, events = h.client(agent)
        try:
            await client.wait_connected(5)
            await wait_until(lambda: h.server.peers())
            fits = encode(Blob("fits", np.ones(2000, np.float32)), sender="a", chunk_bytes=3000)
            assert len(fits) == 5  # several frames, 8 000+ bytes together: delivered
            await client.send(fits, timeout=5)
            assert decode((await h.server.recv(timeout=5)).frames,
                          max_bytes=10_000).body.name == "fits"
            await client.send([b"h"] + [b"y" * 9_000] * 64, timeout=5)
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.5)
            await wait_until(lambda: h.refusals and h.lost)
            r = h.refusals[0]
            assert (r.public_key, r.address) == (agent.public, "127.0.0.1")
            assert r.reason.startswith("oversize: a message of 576001 bytes in 65 frames")
            assert "max_message_bytes=10000" in r.reason
            assert [p.public_key for p in h.lost] == [agent.public]
            await wait_until(lambda: any(e.kind == "disconnected" for e in events))
            await client.wait_connected(5)
            await client.send(encode(Blob("ok", np.ones(10, np.float32)), sender="a"), timeout=5)
            got = decode((await h.server.recv(timeout=5)).frames, max_bytes=10_000)
            assert got.body.name == "ok"
        finally:
            await h.close()

    run(main())


def test_a_message_of_too_many_frames_is_refused_without_a_byte_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedge.transport.server as server_module

    monkeypatch.setattr(server_module, "MAX_FRAMES_PER_MESSAGE", 16)

    async def main() -> None:
        async with connected_agent() as (h, client, _, agent):
            await client.send([b""] * 17, timeout=5)
            await wait_until(lambda: h.refusals)
            assert h.refusals[0].public_key == agent.public
            assert "17 frames, more than 16 frames" in h.refusals[0].reason
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.3)

    run(main())


def test_the_server_queue_is_bounded_in_bytes_and_keeps_peers_alive_while_full() -> None:
    """Messages the caller has not taken yet are held up to ``queue_bytes``;
    past that the reader waits (libzmq holds up to RCVHWM per peer, then TCP
    pushes back) and peers' unread silence is not held against them."""
    from fedge.transport._sockopts import RCVHWM

    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public], queue_bytes=50_000)
        h.start()
        client, events = h.client(agent)
        try:
            await client.wait_connected(5)
            assert h.server._sock is not None and h.server._sock.rcvhwm == RCVHWM
            for i in range(6):  # 20 000-byte tensors: two fit in 50 000 bytes
                await client.send(encode(Blob(f"m{i}", np.full(5000, i, np.float32)),
                                         sender="a"), timeout=5)
            await wait_until(lambda: h.server._reader_waiting)
            assert h.server._queue.qsize() == 2
            await asyncio.sleep(1.0)  # > the heartbeat timeout, reader waiting
            assert h.lost == [] and len(h.server.peers()) == 1
            names = [decode((await h.server.recv(timeout=5)).frames,
                            max_bytes=1 << 20).body.name for _ in range(6)]
            assert names == [f"m{i}" for i in range(6)]
            # One message larger than the whole bound still gets in, alone.
            await client.send(encode(Blob("big", np.ones(20_000, np.float32)), sender="a"),
                              timeout=5)
            got = decode((await h.server.recv(timeout=5)).frames, max_bytes=1 << 20)
            assert got.body.name == "big"
            assert h.server._queued_bytes == 0
            assert [e.kind for e in events] == ["connected"]
            with pytest.raises(ValueError, match="queue_bytes 0"):
                ServerSocket(h.server_keys, queue_bytes=0)
        finally:
            await h.close()

    run(main())


def test_bad_construction_and_use_is_refused() -> None:
    async def main() -> None:
        kp = CurveKeyPair.generate()
        with pytest.raises(ValueError, match="max_message_bytes 0"):
            ServerSocket(kp, max_message_bytes=0)
        s = ServerSocket(kp)
        with pytest.raises(NotConnected, match="not bound"):
            await s.recv(timeout=0.1)
        s.bind("tcp://127.0.0.1:0")
        try:
            with pytest.raises(TransportError, match="already bound"):
                s.bind("tcp://127.0.0.1:0")
            other = ServerSocket(kp)
            with pytest.raises(TransportError, match="cannot bind"):
                other.bind(s.endpoint or "")
        finally:
            await s.close()
        with pytest.raises(Exception, match="secret"):
            ClientSocket(CurveKeyPair(kp.public), kp.public, "tcp://127.0.0.1:1")

    run(main())


def test_close_wakes_waiting_receivers_with_not_connected() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        h.start()
        client, _ = h.client(agent)
        await client.wait_connected(5)
        server_wait = asyncio.ensure_future(h.server.recv(timeout=10))
        client_wait = asyncio.ensure_future(client.recv(timeout=10))
        await asyncio.sleep(0.1)
        await client.close()
        await h.server.close()
        for waiting in (server_wait, client_wait):
            with pytest.raises(NotConnected, match="closed"):
                await waiting
        with pytest.raises(NotConnected):
            await h.server.recv(timeout=1)
        with pytest.raises(NotConnected):
            await client.send([b"a", b"b"], timeout=1)

    run(main())


def test_many_clients_are_told_apart_by_key() -> None:
    async def main() -> None:
        agents = [CurveKeyPair.generate() for _ in range(8)]
        h = Harness(allowed=[a.public for a in agents])
        h.start()
        clients = [h.client(a)[0] for a in agents]
        try:
            await asyncio.gather(*(c.wait_connected(10) for c in clients))
            for i, c in enumerate(clients):
                await c.send(encode(Blob(f"site-{i}", np.full(4, i, np.float32)), sender=f"s{i}"),
                             timeout=5)
            got = {}
            for _ in clients:
                msg = await h.server.recv(timeout=5)
                got[msg.peer.public_key] = decode(msg.frames, max_bytes=1 << 20).body.name
            assert got == {a.public: f"site-{i}" for i, a in enumerate(agents)}
            # Replies addressed by key reach the right appliance only.
            for i, a in enumerate(agents):
                await h.server.send(a.public, encode(Blob(f"to-{i}", np.zeros(1, np.float32)),
                                                     sender="coordinator"))
            for i, c in enumerate(clients):
                assert decode(await c.recv(timeout=5), max_bytes=1 << 20).body.name == f"to-{i}"
        finally:
            await h.close()

    run(main())


def test_max_message_bytes_set_for_a_job_applies_to_all_connections() -> None:
    async def main() -> None:
        early, late = CurveKeyPair.generate(), CurveKeyPair.generate()
        h = Harness(allowed=[early.public, late.public])
        h.start()
        first, first_events = h.client(early)
        try:
            await first.wait_connected(5)
            h.server.set_max_message_bytes(10_000)  # the job's model is small
            assert h.server.max_message_bytes == 10_000
            # The re-bind closed the early connection; it came back by itself.
            await wait_until(lambda: any(e.kind == "disconnected" for e in first_events))
            await first.wait_connected(5)
            second, _ = h.client(late)
            await second.wait_connected(5)
            big = Blob("big", np.ones(10_000, np.float32))
            drops = sum(e.kind == "disconnected" for e in first_events)
            for client in (first, second):
                await client.send(encode(big, sender="x"), timeout=5)
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.5)
            # libzmq dropped the oversize sender; it reconnects by itself.
            await wait_until(lambda: sum(e.kind == "disconnected" for e in first_events) > drops)
            await first.wait_connected(5)
            await first.send(encode(Blob("small", np.ones(8, np.float32)), sender="x"),
                             timeout=5)
            msg = await h.server.recv(timeout=5)
            assert msg.peer.public_key == early.public
            with pytest.raises(ValueError, match="max_message_bytes -1"):
                h.server.set_max_message_bytes(-1)
        finally:
            await h.close()

    run(main())


def test_client_replaces_its_socket_when_a_live_server_goes_silent() -> None:
    """A server that completes the handshake (and answers ZMTP pings) but never
    sends fedge heartbeats: the client's own heartbeat monitor gives up on it
    after server_timeout (by default the ZMTP timeout, >= 30 s; short here),
    reports heartbeat_timeout and makes a fresh socket."""

    async def main() -> None:
        import zmq
        import zmq.asyncio

        server_keys, agent = CurveKeyPair.generate(), CurveKeyPair.generate()
        ctx = zmq.asyncio.Context()
        silent = ctx.socket(zmq.ROUTER)
        silent.curve_server = True
        silent.curve_secretkey = (server_keys.secret or "").encode()
        silent.curve_publickey = server_keys.public.encode()
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        events: list[ClientEvent] = []
        client = ClientSocket(agent, server_keys.public, f"tcp://127.0.0.1:{port}",
                              heartbeat=HeartbeatConfig(interval=0.1, timeout=0.4,
                                                        server_timeout=0.4),
                              backoff=fast_backoff(), on_event=events.append)
        client.start()
        try:
            await client.wait_connected(5)
            await wait_until(lambda: any(e.kind == "heartbeat_timeout" for e in events), 5)
            await wait_until(lambda: [e.kind for e in events].count("connected") >= 2, 5)
            kinds = [e.kind for e in events]
            assert kinds.index("heartbeat_timeout") < kinds.index("reconnecting")
            assert client.connections >= 2
        finally:
            await client.close()
            silent.close(linger=0)
            ctx.term()

    run(main())


def test_a_key_connecting_again_supersedes_its_older_connection() -> None:
    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        h.start()
        old, old_events = h.client(agent)
        try:
            await old.wait_connected(5)
            await wait_until(lambda: h.server.peers())
            first = h.server.peers()[0]
            new, _ = h.client(agent)  # the same appliance with a fresh socket
            await new.wait_connected(5)
            await wait_until(lambda: any(e.kind == "disconnected" for e in old_events))
            await wait_until(lambda: h.superseded)
            old_peer, new_peer = h.superseded[0]  # reported: who was shut, who took over
            assert old_peer.routing_id == first.routing_id != new_peer.routing_id
            assert old_peer.public_key == new_peer.public_key == agent.public
            assert old_peer.address == new_peer.address == "127.0.0.1"
            await old.close()
            await wait_until(lambda: [p.routing_id for p in h.server.peers()] not in
                             ([], [first.routing_id]))
            assert len(h.server.peers()) == 1
            await h.server.send(agent.public, encode(Blob("x", np.ones(1, np.float32)),
                                                     sender="coordinator"))
            assert decode(await new.recv(timeout=5), max_bytes=1 << 20).body.name == "x"
        finally:
            await h.close()

    run(main())


def test_heartbeats_queued_behind_a_large_message_do_not_time_out_either_side() -> None:
    """Heartbeats share the connection with a 96 MB model each way; the transfer
    outlasts the heartbeat timeout, yet neither side gives up: steady TCP
    progress counts as liveness.  (4 MiB chunks: libzmq's IO thread decrypts a
    chunk at a time and must not stall longer than the timeout.)  A run fast
    enough to finish within the timeout (0.37 s was seen) proves nothing, so it
    goes again with a 256 MB model on the same connection."""

    async def main() -> None:
        hb = HeartbeatConfig(interval=0.1, timeout=0.4)
        async with connected_agent(hb) as (h, client, events, _):
            loop = asyncio.get_running_loop()
            for words in (24 << 20, 64 << 20):
                w = np.ones(words, np.float32)
                t0 = loop.time()
                await client.send(encode(Blob("up", w), sender="a", chunk_bytes=4 << 20),
                                  timeout=60)
                msg = await h.server.recv(timeout=60)
                env = decode(msg.frames, max_bytes=1 << 30, release_frames=True)
                assert env.body.data.shape == w.shape
                peer = msg.peer
                del env, msg
                await h.server.send(peer, encode(Blob("down", w), sender="coordinator",
                                                 chunk_bytes=4 << 20))
                down = decode(await client.recv(timeout=60), max_bytes=1 << 30,
                              release_frames=True)
                elapsed = loop.time() - t0
                assert down.body.name == "down"
                del down, w
                if elapsed > hb.timeout:
                    break
            assert elapsed > hb.timeout  # the test means something only if so
            assert [e.kind for e in events] == ["connected"]
            assert h.lost == []

    run(main())


def test_server_drops_a_peer_as_soon_as_its_connection_closes() -> None:
    async def main() -> None:
        slow = HeartbeatConfig(interval=1.0, timeout=30.0)  # expiry would take 30 s
        async with connected_agent(slow) as (h, client, _, agent):
            await client.close()
            await wait_until(lambda: h.lost, timeout=5)
            assert h.lost[0].public_key == agent.public and h.server.peers() == []

    run(main())


def test_a_key_revoked_before_its_first_message_is_shut_when_it_speaks() -> None:
    """A bare DEALER (no greeting heartbeat) completes its handshake, is revoked
    before it ever speaks, then speaks: the message is dropped and the
    connection shut."""

    async def main() -> None:
        import zmq
        import zmq.asyncio
        from zmq.utils.monitor import parse_monitor_message

        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        endpoint = h.start()
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.curve_secretkey = (agent.secret or "").encode()
        raw.curve_publickey = agent.public.encode()
        raw.curve_serverkey = h.server_keys.public.encode()
        monitor = raw.get_monitor_socket()
        raw.connect(endpoint)
        try:
            seen: list[int] = []

            async def until(event: int) -> None:
                while event not in seen:
                    seen.append(parse_monitor_message(await monitor.recv_multipart())["event"])

            await asyncio.wait_for(until(zmq.EVENT_HANDSHAKE_SUCCEEDED), 5)
            assert h.server.peers() == []  # it has not spoken
            h.server.set_allowed([])
            await raw.send_multipart(encode(Blob("late", np.ones(1, np.float32)), sender="a"))
            await asyncio.wait_for(until(zmq.EVENT_DISCONNECTED), 5)
            with pytest.raises(TimeoutError):
                await h.server.recv(timeout=0.3)
        finally:
            raw.disable_monitor()  # before its PAIR closes, or closing can hang
            monitor.close(linger=0)
            raw.close(linger=0)
            ctx.term()
            await h.close()

    run(main())


def test_garbage_from_an_enrolled_peer_reaches_the_decoder_not_a_crash() -> None:
    """The socket only moves frames: junk from an enrolled appliance is handed
    up as-is, the decoder refuses it with a named WireError, and the next good
    message still arrives."""

    async def main() -> None:
        from fedge.wire import WireError

        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        h.start()
        client, _ = h.client(agent)
        try:
            await client.wait_connected(5)
            junk = [[b"\xc1"], [b"", b""], [b"\x00fedge-heartbeat", b"x"], [b"\xff" * 9000] * 3]
            for frames in junk:
                await client.send(frames, timeout=5)
            await client.send(encode(Blob("good", np.ones(2, np.float32)), sender="a"), timeout=5)
            refused = 0
            for _ in junk:
                msg = await h.server.recv(timeout=5)
                with pytest.raises(WireError):
                    decode(msg.frames, max_bytes=1 << 20)
                refused += 1
            good = await h.server.recv(timeout=5)
            assert refused == len(junk)
            assert decode(good.frames, max_bytes=1 << 20).body.name == "good"
        finally:
            await h.close()

    run(main())


_CLOSE_RACE = '''
import asyncio, socket, time
import zmq, zmq.asyncio
from fedge.transport import CurveKeyPair, ServerSocket

peers = []
make_monitor = zmq.asyncio.Socket.get_monitor_socket

def monitor_whose_close_is_followed_by_a_disconnect(self, *a, **k):
    mon = make_monitor(self, *a, **k)
    close = mon.close
    def close_then_peer_leaves(linger=None):
        close(linger=linger)
        time.sleep(0.3)  # libzmq's reaper has closed the PAIR
        for s in peers:
            s.close()  # libzmq's IO thread now raises a monitor event
        time.sleep(0.5)
    mon.close = close_then_peer_leaves
    return mon

zmq.asyncio.Socket.get_monitor_socket = monitor_whose_close_is_followed_by_a_disconnect

async def main():
    server = ServerSocket(CurveKeyPair.generate())
    host, port = server.bind("tcp://127.0.0.1:0").rsplit("/", 1)[1].rsplit(":", 1)
    peers.append(socket.create_connection((host, int(port))))
    await asyncio.sleep(0.3)
    await server.close()
    print("closed")

asyncio.run(main())
'''


def test_server_close_does_not_hang_on_a_monitor_event_raised_while_closing() -> None:
    """libzmq sends a monitor event with a blocking send, under the lock that
    disable_monitor takes: if the monitor's PAIR socket closed first, a peer
    leaving at that moment blocks the IO thread and close() for ever (a CI run
    hung so). Run in a child process, since a hang in C cannot be interrupted;
    the peer is made to leave just after the PAIR closes."""
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _CLOSE_RACE], capture_output=True,
                             text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("ServerSocket.close() hung (disable_monitor after the PAIR closed)")
    assert out.returncode == 0 and out.stdout.strip() == "closed", out.stderr[-2000:]


@pytest.mark.parametrize("stall_s", [1.5])
def test_a_stalled_event_loop_does_not_count_as_the_peer_going_silent(stall_s: float) -> None:
    """Our own event loop blocked for longer than the heartbeat timeout (a long
    synchronous step, a GC pause, a loaded machine): the peer's heartbeats sit
    unread, so on waking neither side may call the other silent and drop a
    connection whose messages are waiting to be read."""

    async def main() -> None:
        async with connected_agent() as (h, client, events, agent):
            await asyncio.sleep(0.3)  # heartbeats flowing both ways
            await h.server.send(agent.public, encode(Blob("queued", np.ones(4, np.float32)),
                                                     sender="coordinator"))
            time.sleep(stall_s)  # the whole loop (both sides) blocked
            got = decode(await client.recv(timeout=5), max_bytes=1 << 20)
            assert got.body.name == "queued"
            await asyncio.sleep(0.5)
            assert [e.kind for e in events] == ["connected"], events
            assert h.lost == [] and len(h.server.peers()) == 1

    run(main())


class ThreadedClient:
    """A ClientSocket on its own event loop in a thread, so that the server's
    loop (the test's) can stall while the client keeps running."""

    def __init__(self, keys: CurveKeyPair, server_key: str, endpoint: str,
                 heartbeat: HeartbeatConfig) -> None:
        import threading

        self.events: list[ClientEvent] = []
        self.loop = asyncio.new_event_loop()
        self.client = ClientSocket(keys, server_key, endpoint, heartbeat=heartbeat,
                                   backoff=fast_backoff(), on_event=self.events.append)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        self.client.start()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the client's loop, blocking this thread (bounded)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    async def acall(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the client's loop without blocking the caller's loop."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(fut), 15)

    def kinds(self) -> list[str]:
        return [e.kind for e in list(self.events)]

    def close(self) -> None:
        try:
            self.call(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def test_a_coordinator_stalled_past_the_heartbeat_timeout_keeps_its_sites() -> None:
    """The coordinator's event loop is blocked (a commit, a checkpoint, unmasking)
    for longer than the heartbeat timeout while the agent runs on: the agent
    hears nothing, but libzmq still answers its ZMTP pings, so it keeps its
    connection (no reconnect, nothing queued lost) and the coordinator, on
    waking, reports no site lost; both directions still work on the same
    connection."""

    async def main() -> None:
        hb = HeartbeatConfig(interval=0.2, timeout=1.0)
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public], heartbeat=hb)
        h.start()
        tc = ThreadedClient(agent, h.server_keys.public, h.endpoint, hb)
        try:
            await tc.acall(tc.client.wait_connected(5))
            await wait_until(lambda: h.server.peers())
            first = h.server.peers()[0]
            await asyncio.sleep(0.5)  # heartbeats flowing both ways
            time.sleep(2.5)  # our (the coordinator's) loop blocked: > 2x the timeout
            await asyncio.sleep(2.0)  # > the timeout after waking: any loss would show
            assert tc.kinds() == ["connected"], tc.events
            assert tc.client.connections == 1 and tc.client.state == "connected"
            assert h.lost == [] and h.server.peers() == [first]
            await tc.acall(tc.client.send(encode(Blob("up", np.ones(2, np.float32)),
                                                 sender="a"), timeout=5))
            assert (await h.server.recv(timeout=5)).peer == first
            await h.server.send(first, encode(Blob("down", np.ones(2, np.float32)),
                                              sender="coordinator"))
            got = await tc.acall(tc.client.recv(timeout=5))
            assert decode(got, max_bytes=1 << 20).body.name == "down"
        finally:
            tc.close()
            await h.close()

    run(main())


def test_a_site_that_reconnects_while_the_coordinator_is_stalled_is_not_counted_lost() -> None:
    """An agent that does give up on a stalled coordinator (here a short
    server_timeout) and reconnects: on waking the coordinator sees the old
    connection closed and the same key back on a new one, and reports no loss."""

    async def main() -> None:
        hb = HeartbeatConfig(interval=0.2, timeout=1.0)
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public], heartbeat=hb)
        h.start()
        impatient = HeartbeatConfig(interval=0.2, timeout=1.0, server_timeout=0.6)
        tc = ThreadedClient(agent, h.server_keys.public, h.endpoint, impatient)
        try:
            await tc.acall(tc.client.wait_connected(5))
            await wait_until(lambda: h.server.peers())
            first = h.server.peers()[0]
            await asyncio.sleep(0.5)
            time.sleep(2.5)  # the agent gives up on us after 0.6 s and reconnects
            await wait_until(lambda: tc.kinds().count("connected") >= 2, timeout=5)
            await wait_until(lambda: h.server.peers() not in ([], [first]), timeout=5)
            assert "heartbeat_timeout" in tc.kinds()
            await asyncio.sleep(2.0)  # > the timeout after waking
            assert h.lost == []
            assert [p.public_key for p in h.server.peers()] == [agent.public]
        finally:
            tc.close()
            await h.close()

    run(main())


def test_a_cut_network_is_found_by_zmtp_heartbeats_and_the_agent_reconnects() -> None:
    """A dead coordinator is still detected in bounded time without the
    application-level check: through a TCP relay that stops forwarding on its
    open connections (a cut cable, packets dropped), the agent's ZMTP pings go
    unanswered, libzmq closes the connection and reconnects."""

    async def main() -> None:
        agent = CurveKeyPair.generate()
        h = Harness(allowed=[agent.public])
        endpoint = h.start()
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        cut: list[asyncio.StreamWriter] = []  # connections that stop forwarding
        live: list[asyncio.StreamWriter] = []
        pumps: list[asyncio.Task[None]] = []

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if w in cut:
                        continue  # dropped on the floor, the TCP connection stays up
                    w.write(data)
                    await w.drain()

        async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            ur, uw = await asyncio.open_connection(host, int(port))
            live.extend([w, uw])
            pumps.extend([asyncio.ensure_future(pump(r, uw)),
                          asyncio.ensure_future(pump(ur, w))])

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        proxy_port = proxy.sockets[0].getsockname()[1]
        # No application-level give-up: only ZMTP (1 s) can find the cut.
        hb = HeartbeatConfig(interval=0.1, timeout=0.6, zmtp_timeout=1.0, server_timeout=60.0)
        client, events = h.client(agent, endpoint=f"tcp://127.0.0.1:{proxy_port}", heartbeat=hb)
        try:
            await client.wait_connected(5)
            await wait_until(lambda: h.server.peers())
            cut.extend(live)
            t0 = time.monotonic()
            await wait_until(lambda: "disconnected" in [e.kind for e in events], timeout=10)
            assert time.monotonic() - t0 < 5
            await wait_until(lambda: client.connections >= 2, timeout=10)
            assert "heartbeat_timeout" not in [e.kind for e in events]
            await client.send(encode(Blob("back", np.ones(1, np.float32)), sender="a"),
                              timeout=5)
            assert (await h.server.recv(timeout=5)).peer.public_key == agent.public
        finally:
            await h.close()
            proxy.close()
            for w in live:
                w.close()
            for t in pumps:
                t.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    run(main())
