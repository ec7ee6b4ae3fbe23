"""The agent's socket: DEALER, CURVE client pinned to the coordinator's key.

A supervisor task owns the DEALER socket and carries out what the sans-I/O
:class:`~fedge.transport.connection.ClientConnection` decides (see its
transition table): the socket monitor's handshake events go in
(``HANDSHAKE_SUCCEEDED``; ``HANDSHAKE_FAILED_AUTH`` — the coordinator refused
our key; ``HANDSHAKE_FAILED_NO_DETAIL``/``_PROTOCOL`` — the server does not
hold the pinned key's secret, an impostor), and so do received-message times
and clock ticks; out come heartbeats, socket replacement after a jittered
exponential back-off, and :class:`ClientEvent` reports to ``on_event``.
libzmq's own TCP reconnects (ZMQ_RECONNECT_IVL/_MAX) cover plain connection
loss.  ZMQ_IMMEDIATE is set, so nothing is queued for a connection whose
handshake has not succeeded: :meth:`ClientSocket.send` waits until connected,
and CURVE guarantees nothing reaches an impostor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.asyncio

from fedge.transport._sockopts import (
    apply_common,
    check_endpoint,
    check_max_message_bytes,
    parse_event,
    send_nowait,
    set_ipv6,
)
from fedge.transport._tcp import PROGRESS_BYTES, bytes_received, peername_of, plain_ip
from fedge.transport.backoff import Backoff
from fedge.transport.connection import (
    ClientConnection,
    ClientEvent,
    ReplaceSocket,
    Report,
    SendHeartbeat,
)
from fedge.transport.errors import HandshakeFailed, KeyFileError, NotConnected
from fedge.transport.heartbeat import HEARTBEAT_FRAME, HeartbeatConfig
from fedge.transport.keys import CurveKeyPair, check_public_key

__all__ = ["ClientEvent", "ClientSocket"]

log = logging.getLogger("fedge.transport.client")

class ClientSocket:
    """DEALER + CURVE client + heartbeats + reconnect.  Use inside a running loop.

    ``server_key``: the coordinator's public key (Z85), pinned.
    ``on_event(ClientEvent)`` is called from the event loop.
    ``on_failure(exc)``, when given, is called (from the event loop) if no socket can
    be made any more (the supervisor task died: libzmq refused an option or the
    endpoint, or the process is out of file descriptors); its owner says so, and
    this module logs it at DEBUG only. Without it, the failure is logged at ERROR.

    Raises (constructor):
        KeyFileError: ``keypair`` without secret, or ``server_key`` not a Z85 key.
        ValueError: bad ``max_message_bytes``, or ``endpoint`` not
            ``tcp://HOST:PORT`` (or ``ipc://PATH``).
    """

    def __init__(
        self,
        keypair: CurveKeyPair,
        server_key: str | bytes,
        endpoint: str,
        *,
        heartbeat: HeartbeatConfig | None = None,
        backoff: Backoff | None = None,
        on_event: Callable[[ClientEvent], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        max_message_bytes: int | None = None,
        queue_size: int = 256,
    ) -> None:
        if keypair.secret is None:
            raise KeyFileError("ClientSocket needs our secret key")
        self.keypair = keypair
        self.server_key = check_public_key(server_key, what="coordinator public key")
        self.endpoint = check_endpoint(endpoint)
        self.heartbeat = heartbeat or HeartbeatConfig()
        self.backoff = backoff or Backoff()
        self.on_event = on_event
        self.on_failure = on_failure
        self._peer: str | None = None  # the coordinator's IP on the current connection
        self._max_message_bytes = check_max_message_bytes(max_message_bytes)
        self._queue: asyncio.Queue[list[zmq.Frame] | None] = asyncio.Queue(queue_size)
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._conn = ClientConnection(self.heartbeat, self.backoff, endpoint=endpoint,
                                      server_key=self.server_key, progress_bytes=PROGRESS_BYTES)
        self._started = False
        # why the supervisor task ended, if it failed: it makes every socket, so nothing
        # connects after it (a heartbeat option libzmq refused once went unseen)
        self._failure: BaseException | None = None

    @property
    def state(self) -> str:
        """``idle`` before start, then ``connecting``, ``connected``, ``backoff``, ``closed``."""
        return self._conn.state if self._started else "idle"

    @property
    def last_failure(self) -> HandshakeFailed | None:
        return self._conn.last_failure

    @property
    def peer_address(self) -> str | None:
        """The IP address the current (or last) TCP connection reached, IPv4-mapped
        written as IPv4; None before one. What a name in the endpoint resolved to."""
        return self._peer

    @property
    def failure(self) -> BaseException | None:
        """Why no socket can be made any more (the supervisor task died), if so."""
        return self._failure

    @property
    def failures(self) -> int:
        """Handshake failures so far."""
        return self._conn.failures

    @property
    def connections(self) -> int:
        """Successful handshakes so far."""
        return self._conn.connections

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the socket and start connecting (returns at once).

        Raises:
            RuntimeError: no running event loop, or already started.
        """
        if self._supervisor is not None:
            raise RuntimeError("ClientSocket already started")
        self._ctx = zmq.asyncio.Context()
        self._started = True
        self._supervisor = asyncio.ensure_future(self._supervise())
        self._supervisor.add_done_callback(self._supervisor_done)

    def _supervisor_done(self, task: asyncio.Future[None]) -> None:
        """Log a failed supervisor, and wake whoever waits to connect or send."""
        if task.cancelled() or task.exception() is None:
            return
        self._failure = task.exception()
        owned = self.on_failure is not None
        log.log(logging.DEBUG if owned else logging.ERROR,
                "transport client: no more connections to %s: %s: %s", self.endpoint,
                type(self._failure).__name__, self._failure, exc_info=self._failure)
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_failure is not None:
            try:
                self.on_failure(self._failure)
            except Exception:
                log.exception("on_failure callback failed")

    async def close(self) -> None:
        """Stop reconnecting and close the socket; pending sends are dropped."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        self._started = True
        self._apply(self._conn.event("close", time.monotonic()), None)

    async def __aenter__(self) -> ClientSocket:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _apply(self, actions: list[Any], sock: zmq.asyncio.Socket | None) -> ReplaceSocket | None:
        """Carry out the state machine's actions; returns a ReplaceSocket if one came."""
        replace = None
        for action in actions:
            if isinstance(action, SendHeartbeat) and sock is not None:
                send_nowait(sock, [HEARTBEAT_FRAME])  # a failure proves nothing
            elif isinstance(action, ReplaceSocket):
                replace = action
            elif isinstance(action, Report):
                event = action.event
                # DEBUG: the owner (on_event) logs what matters once, at its level
                # (the agent's LinkLog); an INFO echo here tripled every failure
                log.debug("transport client: %s %s", event.kind, event.detail)
                if self.on_event is not None:
                    try:
                        self.on_event(event)
                    except Exception:
                        log.exception("on_event callback failed")
        if actions:
            self._changed.set()
            self._changed = asyncio.Event()
        return replace

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the handshake succeeds.

        Raises:
            HandshakeFailed: a handshake failed while waiting (refused or impostor).
            TimeoutError: not connected within ``timeout`` seconds.
            NotConnected: the socket was closed, or no socket could be made (names why).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        failures = self.failures
        while True:
            if self.state == "connected":
                return
            self._raise_if_failed()
            if self.failures != failures and self.last_failure is not None:
                raise self.last_failure
            if self.state == "closed":
                raise NotConnected("ClientSocket was closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"no CURVE connection to {self.endpoint} within {timeout} s "
                    f"(state {self.state})"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _raise_if_failed(self) -> None:
        """Raises: NotConnected: the supervisor failed (names its exception)."""
        if self._failure is not None:
            raise NotConnected(
                f"no connection to {self.endpoint} can be made: "
                f"{type(self._failure).__name__}: {self._failure}"
            ) from self._failure

    # ------------------------------------------------------------------ I/O

    async def send(self, frames: Sequence[Any], timeout: float | None = None) -> None:
        """Send ``frames`` (from ``fedge.wire.encode``) zero-copy; waits while not connected.

        Raises:
            TimeoutError: not sent within ``timeout`` seconds.
            NotConnected: the socket is closed or was replaced while sending
                (the message may not have been delivered), or no socket could be made.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            self._raise_if_failed()
            sock = self._sock
            if self.state == "closed":
                raise NotConnected("ClientSocket is closed")
            if sock is None or self.state != "connected":
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"not connected to {self.endpoint} within {timeout} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
                continue
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(sock.send_multipart(frames, copy=False), remaining)
                return
            except zmq.ZMQError as exc:
                raise NotConnected(f"send to {self.endpoint} failed: {exc}") from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller is being cancelled
                # the supervisor closed this socket under us (reconnect or close)
                raise NotConnected(
                    f"connection to {self.endpoint} was replaced while sending; "
                    "the message may not have been delivered"
                ) from None

    async def recv(self, timeout: float | None = None) -> list[zmq.Frame]:
        """The next application message from the server (heartbeats consumed).

        Raises:
            TimeoutError: nothing within ``timeout`` seconds.
            NotConnected: the socket is closed (also wakes a waiting ``recv``).
        """
        if self.state == "closed":
            raise NotConnected("ClientSocket is closed")
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:
            self._queue.put_nowait(None)
            raise NotConnected("ClientSocket was closed")
        return item

    # ------------------------------------------------------------------ supervisor

    def _make_socket(self) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.DEALER)
        sock.curve_secretkey = self.keypair.secret.encode("ascii")  # type: ignore[union-attr]
        sock.curve_publickey = self.keypair.public.encode("ascii")
        sock.curve_serverkey = self.server_key.encode("ascii")
        sock.immediate = 1
        sock.setsockopt(zmq.RECONNECT_IVL, max(1, int(self.backoff.initial * 1000)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(1, int(self.backoff.maximum * 1000)))
        apply_common(sock, self.heartbeat, self._max_message_bytes)
        set_ipv6(sock, self.endpoint, bind=False)  # IPv6 for tcp://[ADDRESS]:P only
        monitor = sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_DISCONNECTED
        )
        sock.connect(self.endpoint)
        return sock, monitor

    async def _supervise(self) -> None:
        while True:
            sock, monitor = self._make_socket()
            self._sock = sock
            reader = asyncio.ensure_future(self._read(sock))
            try:
                replace = await self._run_connection(sock, monitor)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                self._sock = None
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
            await asyncio.sleep(replace.delay)
            self._apply(self._conn.event("backoff_elapsed", time.monotonic()), None)

    async def _run_connection(
        self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket
    ) -> ReplaceSocket:
        """Feeds the state machine until it asks for a new socket."""
        tick = self.heartbeat.interval / 2
        pending = asyncio.ensure_future(monitor.recv_multipart())
        fd: int | None = None
        peer: Any = None
        last = time.monotonic()
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=tick)
                now = time.monotonic()
                if now - last > tick + self.heartbeat.interval:
                    log.warning("transport client: event loop stalled for %.1f s; the "
                                "coordinator's silence meanwhile is not held against it",
                                now - last)
                    self._conn.loop_stalled(now)
                last = now
                if pending in done:
                    name, value = parse_event(pending.result())
                    pending = asyncio.ensure_future(monitor.recv_multipart())
                    if name == "CONNECTED":  # value: the TCP connection's fd
                        fd, peer = value, peername_of(value)
                        if isinstance(peer, tuple) and peer and isinstance(peer[0], str):
                            self._peer = plain_ip(peer[0])
                    replace = self._apply(self._conn.event(name.lower(), now, value), sock)
                    if replace is not None:
                        return replace
                self._conn.transport_progress(now, bytes_received(fd, peer))
                replace = self._apply(self._conn.tick(now), sock)
                if replace is not None:
                    return replace
        finally:
            pending.cancel()

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._conn.message_received(time.monotonic())
            if len(frames) == 1 and frames[0].bytes == HEARTBEAT_FRAME:
                continue
            await self._queue.put(frames)
            del frames  # not held while waiting: decode(release_frames) may free chunks
