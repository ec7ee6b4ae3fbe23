"""The coordinator's socket: ROUTER, CURVE server, live ZAP allow-list.

Theory of operation
-------------------
One ``ServerSocket`` owns a ROUTER socket bound with the coordinator's CURVE key
pair and a ZAP handler (pyzmq's ``AsyncioAuthenticator``) in its own
``zmq.asyncio.Context``.  The ZAP handler asks :meth:`ServerSocket._zap_allows`
about each connecting key, so :meth:`set_allowed` takes effect for the next
connection without a restart; a key removed from the allow-list also has its
open connections shut at once (its TCP socket is shut down, the peer's next
reconnect is refused by ZAP) and messages still queued from it are dropped.

Every refusal (unknown or revoked key, failed handshake) is reported to
``on_refused(Refusal(...))`` for the audit log; the log gets the first of each
kind and peer, and a summary of the rest (:class:`RefusalLog`).  Each peer is known by the
libzmq routing id of its connection and, through ZAP's User-Id, by its CURVE
public key; :meth:`send` takes either.  One key has one connection: when a
key's new connection speaks, its older one is shut.  Heartbeats: a one-frame
``HEARTBEAT_FRAME`` to each peer every ``interval``, any message from a peer
counts as its heartbeat, and peers silent for ``timeout`` are dropped and
reported to ``on_peer_lost(peer)``, as are peers whose connection libzmq
closes (ZMTP heartbeats run underneath and close dead TCP connections).  A
peer's heartbeat can queue behind a large message it is sending, so steady
growth of the connection's TCP byte count also counts as hearing from it.
While our event loop is stalled, and for ``timeout`` after it wakes, a closed
connection is not reported lost at once: its client may have given up on us
meanwhile and be reconnecting; it is reported only if its key has not spoken
on a new connection by then.

The socket only moves frames: decoding, message semantics and what to do about
a refusal belong to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket as pysocket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from fedge.transport._sockopts import (
    apply_common,
    check_max_message_bytes,
    parse_event,
    plain_endpoint,
    send_nowait,
    set_ipv6,
    set_max_message_bytes,
)
from fedge.transport._tcp import PROGRESS_BYTES, bytes_received, peername_of, plain_ip
from fedge.transport.errors import KeyFileError, NotConnected, TransportError
from fedge.transport.heartbeat import HEARTBEAT_FRAME, HeartbeatConfig, HeartbeatMonitor
from fedge.transport.keys import CurveKeyPair, check_public_key

__all__ = ["MAX_FRAMES_PER_MESSAGE", "Incoming", "Peer", "Refusal", "RefusalLog", "ServerSocket"]

log = logging.getLogger("fedge.transport.server")

#: More frames than this in one message is refused like an oversize message:
#: each frame costs a libzmq message and a Python object whatever its size
#: (a wire message is a header, a body and one frame per tensor chunk).
MAX_FRAMES_PER_MESSAGE = 1 << 16


def _nbytes(incoming: Incoming) -> int:
    return sum(len(f) for f in incoming.frames)


def _who(key: str | None, address: str | None) -> str:
    """A refused peer as the log names it: what is known of it, and what is not."""
    if key is None and address is None:
        # libzmq's handshake-failure event carries an error code, not the peer
        return ("a client whose CURVE handshake failed (no key presented; ZeroMQ does "
                "not report its address)")
    where = f"at {address}" if address else "(address not reported)"
    return f"a client {where} with CURVE key {key}" if key else f"a client {where}"


class RefusalLog:
    """Which refusals get a log line of their own, and the summary of the rest.

    Anyone who can reach the port, with no key at all, makes a refusal per
    attempt (hundreds a second): a WARNING for each would flood the journal,
    and journald's rate limit would then drop the coordinator's real lines.
    So the first refusal of each (kind, who) is logged in full, at most
    ``full_per_interval`` of them per ``interval`` seconds (a flood of random
    keys is all "first"), and again after ``remind_s``; the others are
    counted, and :meth:`summary` gives one line per ``interval`` at most.
    Memory is bounded: at most ``max_tracked`` (kind, who) pairs are kept, the
    oldest forgotten first (a forgotten one is logged in full again).  Pure:
    the caller passes the time.
    """

    def __init__(self, *, interval: float = 60.0, full_per_interval: int = 5,
                 remind_s: float = 3600.0, max_tracked: int = 1024) -> None:
        if not interval > 0 or full_per_interval < 1 or max_tracked < 1:
            raise ValueError(f"RefusalLog(interval={interval!r}, full_per_interval="
                             f"{full_per_interval!r}, max_tracked={max_tracked!r}): "
                             "each must be positive")
        self.interval = interval
        self.full_per_interval = full_per_interval
        self.remind_s = remind_s
        self.max_tracked = max_tracked
        self._logged: dict[tuple[str, str], float] = {}  # (kind, who) -> logged at
        self._window_start: float | None = None
        self._full = 0  # full lines in this window
        self._counted: dict[str, int] = {}  # kind -> refusals not logged in this window
        self._who: dict[str, None] = {}  # distinct peers among them (bounded)

    def refused(self, kind: str, who: str, now: float) -> bool:
        """A refusal happened: whether it gets its own line (else it is counted)."""
        if self._window_start is None:
            self._window_start = now
        pair = (kind, who)
        at = self._logged.get(pair)
        if (at is None or now - at >= self.remind_s) and self._full < self.full_per_interval:
            self._full += 1
            self._logged.pop(pair, None)
            self._logged[pair] = now
            while len(self._logged) > self.max_tracked:
                del self._logged[next(iter(self._logged))]
            return True
        self._counted[kind] = self._counted.get(kind, 0) + 1
        if len(self._who) < self.max_tracked:
            self._who[who] = None
        return False

    def summary(self, now: float) -> str | None:
        """Once ``interval`` has passed since the window began: the line for the
        refusals counted in it (None if there were none), and a new window."""
        if self._window_start is None or now - self._window_start < self.interval:
            return None
        elapsed = now - self._window_start
        counted, who = self._counted, len(self._who)
        self._window_start = None
        self._full = 0
        self._counted = {}
        self._who = {}
        if not counted:
            return None
        total = sum(counted.values())
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(counted.items()))
        peers = f"{who}+" if who >= self.max_tracked else str(who)
        return (f"{total} more refused connection(s) in the last {elapsed:.0f} s, not "
                f"logged one by one ({kinds}; from {peers} distinct key(s) or address(es))")


@dataclass(frozen=True)
class Peer:
    """A connected client: its connection's routing id, CURVE public key (Z85) and IP."""

    routing_id: bytes
    public_key: str
    address: str


@dataclass(frozen=True)
class Refusal:
    """A refused connection or dropped peer, for the audit log.

    ``public_key`` is ``None`` when the handshake failed before the key was
    known (e.g. the client pinned another server key); ``address`` is the
    peer's IP when known.
    """

    public_key: str | None
    address: str | None
    reason: str


@dataclass(frozen=True)
class Incoming:
    """One message from a peer: the frames after the routing id (``zmq.Frame`` s)."""

    peer: Peer
    frames: list[zmq.Frame]


class _Authenticator(AsyncioAuthenticator):
    """pyzmq's authenticator, remembering the address of the request in flight."""

    current_address: str | None = None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.current_address = (
            plain_ip(msg[3].decode("utf-8", "replace")) if len(msg) > 3 else None
        )
        try:
            await super().handle_zap_message(msg)
        finally:
            self.current_address = None


@dataclass
class _PeerState:
    peer: Peer
    fd: int | None
    peername: Any
    rx_bytes: int | None = None  # TCP bytes received at the last sample


class ServerSocket:
    """ROUTER + CURVE server + ZAP allow-list + heartbeats.  Use inside a running loop.

    ``allowed``: enrolled client public keys (Z85).  ``on_refused(Refusal)`` and
    ``on_peer_lost(Peer)`` are called from the event loop; keep them quick.
    ``on_superseded(old, new)``: a key connected again while its older connection
    was still open (the older one is shut). An agent replacing its socket does
    this now and then; two machines holding one appliance's keys (a copied
    enrolment) do it over and over, from two addresses.
    ``max_message_bytes`` (see :func:`message_limit_for_model`) bounds a
    whole message, all frames together (as ``fedge.wire.decode`` does): a peer
    sending a larger frame is disconnected by libzmq (ZMQ_MAXMSGSIZE); one
    whose frames add up to more, or who sends more than
    :data:`MAX_FRAMES_PER_MESSAGE` frames, has the message drained unkept,
    is disconnected, reported to ``on_refused`` (reason "oversize: ...") and
    to ``on_peer_lost``.  Messages wait for ``recv`` in a queue bounded by
    ``queue_size`` messages and ``queue_bytes`` bytes (a larger message is
    let in when the queue is empty); while it is full the reader waits and
    libzmq holds up to ``RCVHWM`` messages per peer before TCP pushes back.
    ``refusal_log`` decides which refusals are logged one by one (default
    :class:`RefusalLog`'s: a summary line a minute for the rest).
    ``on_failure(exc)``, when given, is called (from the event loop) if one of the
    socket's own tasks (the reader, the heartbeats, the connection monitor) ends on
    an error: the socket no longer does its work, and its owner should stop (a
    daemon, so that systemd restarts it); this module then logs it at DEBUG only,
    else at ERROR. Either way :attr:`failure` holds it, and :meth:`recv` raises
    :class:`TransportError` naming it (a ``recv`` waiting is woken): a dead reader
    had left the owner waiting on an empty queue for ever, deaf but alive.

    Raises (constructor):
        KeyFileError: ``keypair`` has no secret key or an allowed key is not Z85.
        ValueError: bad ``max_message_bytes``.
    """

    def __init__(
        self,
        keypair: CurveKeyPair,
        *,
        allowed: Iterable[str | bytes] = (),
        on_refused: Callable[[Refusal], None] | None = None,
        on_peer_lost: Callable[[Peer], None] | None = None,
        on_superseded: Callable[[Peer, Peer], None] | None = None,
        heartbeat: HeartbeatConfig | None = None,
        max_message_bytes: int | None = None,
        zap_domain: str = "fedge",
        queue_size: int = 4096,
        queue_bytes: int = 256 << 20,
        refusal_log: RefusalLog | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        if keypair.secret is None:
            raise KeyFileError("ServerSocket needs the server's secret key")
        if not isinstance(queue_bytes, int) or isinstance(queue_bytes, bool) or queue_bytes <= 0:
            raise ValueError(f"queue_bytes {queue_bytes!r} must be a positive int")
        self.keypair = keypair
        self._allowed = frozenset(check_public_key(k, what="allowed key") for k in allowed)
        self._revoked: set[str] = set()
        self.on_refused = on_refused
        self.on_peer_lost = on_peer_lost
        self.on_superseded = on_superseded
        self.on_failure = on_failure
        self.failure: BaseException | None = None  # what ended one of its tasks
        self._failed_task = ""  # which one
        self.heartbeat = heartbeat or HeartbeatConfig()
        self._max_message_bytes = check_max_message_bytes(max_message_bytes)
        self.zap_domain = zap_domain
        self._monitor = HeartbeatMonitor(self.heartbeat)
        self._refusal_log = refusal_log or RefusalLog()
        self._peers: dict[bytes, _PeerState] = {}
        self._by_key: dict[str, bytes] = {}
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._auth: _Authenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Incoming | None] = asyncio.Queue(queue_size)
        self._queue_bytes = queue_bytes
        self._queued_bytes = 0  # frame bytes of the messages in _queue
        self._room = asyncio.Event()  # set when recv or a purge takes from _queue
        self._reader_waiting = False  # for room in _queue: peers' messages sit unread
        self._last_tick = time.monotonic()  # the heartbeat task's last run
        self._woke_at: float | None = None  # when it last found the loop had stalled
        self._pending_lost: dict[str, tuple[Peer, float]] = {}  # key -> (peer, report at)
        # Routing ids of connections we shut or saw close (libzmq never reuses
        # one): their last messages, still queued, must not bring them back.
        self._gone: dict[bytes, None] = {}
        self._closed = False
        self.endpoint: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def bind(self, endpoint: str = "tcp://127.0.0.1:0") -> str:
        """Bind and start the ZAP handler and background tasks; returns the bound endpoint.

        A port of 0 picks a free port.  Call from within a running event loop.

        Raises:
            TransportError: already bound, or the endpoint cannot be bound.
            RuntimeError: no running event loop.
        """
        if self._sock is not None:
            raise TransportError(f"ServerSocket already bound to {self.endpoint}")
        asyncio.get_running_loop()
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            endpoint = endpoint[:-2] + ":*"
        self._ctx = zmq.asyncio.Context()
        self._auth = _Authenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback(self.zap_domain, self)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret.encode("ascii")  # type: ignore[union-attr]
        sock.curve_publickey = self.keypair.public.encode("ascii")
        sock.zap_domain = self.zap_domain.encode()
        sock.router_mandatory = 1
        apply_common(sock, self.heartbeat, self._max_message_bytes)
        set_ipv6(sock, endpoint, bind=True)  # tcp://* dual-stack, tcp://[ADDRESS]:P
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED
        )
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            self._auth.stop()
            self._ctx.term()
            self._ctx = None
            raise TransportError(f"cannot bind {endpoint}: {exc}") from None
        self._sock = sock
        # an IPv4-mapped address bound in brackets is written as IPv4 (tcp://127.0.0.1:P)
        self.endpoint = plain_endpoint(sock.last_endpoint.decode())
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(monitor), name="connection monitor"),
            loop.create_task(self._heartbeats(), name="heartbeats"),
            loop.create_task(self._read(sock), name="reader"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        return self.endpoint

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """One of the socket's tasks ended: on an error (not a close), keep it as
        :attr:`failure`, wake ``recv``, say it and tell ``on_failure``."""
        if task.cancelled() or self._closed or (exc := task.exception()) is None:
            return
        if self.failure is None:
            self.failure, self._failed_task = exc, task.get_name()
        owned = self.on_failure is not None
        log.log(logging.DEBUG if owned else logging.ERROR,
                "transport server on %s: its %s stopped on an error: %s: %s", self.endpoint,
                task.get_name(), type(exc).__name__, exc, exc_info=exc)
        with contextlib.suppress(asyncio.QueueFull):  # full: no recv waits
            self._queue.put_nowait(None)
        if self.on_failure is not None:
            try:
                self.on_failure(exc)
            except Exception:
                log.exception("on_failure callback failed")

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise TransportError(
                f"the server socket on {self.endpoint} no longer works: its "
                f"{self._failed_task} stopped on an error: {type(self.failure).__name__}: "
                f"{self.failure}")

    async def close(self) -> None:
        """Stop tasks, close the socket and the context (pending sends are dropped).

        A ``recv`` waiting now, or called later, raises :class:`NotConnected`.
        """
        self._closed = True
        if self._sock is not None:
            # First, while the monitor's PAIR socket is still open: libzmq sends a
            # monitor event (a client's DISCONNECTED, say) with a blocking send under
            # the lock disable_monitor takes, so an event raised after _watch closed
            # that PAIR would block libzmq's IO thread and this call for ever.
            self._sock.disable_monitor()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        while not self._queue.empty():  # undelivered messages are dropped
            self._queue.get_nowait()
        self._queued_bytes = 0
        self._pending_lost.clear()
        self._queue.put_nowait(None)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    async def __aenter__(self) -> ServerSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ allow-list

    @property
    def allowed(self) -> frozenset[str]:
        return self._allowed

    def set_allowed(self, keys: Iterable[str | bytes]) -> list[Peer]:
        """Replace the allow-list; new connections see it at once.

        Connected peers whose key left the list are disconnected now and
        reported as refused (reason "revoked"); returns them.

        Raises:
            KeyFileError: a key is not a Z85 CURVE key (the list is unchanged).
        """
        new = frozenset(check_public_key(k, what="allowed key") for k in keys)
        removed = self._allowed - new
        self._allowed = new
        self._revoked = (self._revoked | removed) - new
        dropped = [st.peer for st in list(self._peers.values())
                   if st.peer.public_key not in new]
        for peer in dropped:
            self.disconnect(peer)
            # the operator's doing, not a peer's: always logged
            self._refuse(peer.public_key, peer.address,
                         "revoked: key removed from the allow-list", kind="revoked key",
                         throttle=False)
        if removed:
            self._purge_queue()
        return dropped

    def _purge_queue(self) -> None:
        """Drop queued messages whose sender's key is no longer allowed."""
        kept = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None or item.peer.public_key in self._allowed:
                kept.append(item)
        for item in kept:
            self._queue.put_nowait(item)
        self._queued_bytes = sum(_nbytes(i) for i in kept if i is not None)
        self._room.set()

    def callback(self, domain: str, key: bytes) -> bool:
        """The ZAP credentials callback (pyzmq API): is this Z85 key enrolled?"""
        z85_key = key.decode("ascii", "replace")
        if z85_key in self._allowed:
            return True
        address = self._auth.current_address if self._auth else None
        revoked = z85_key in self._revoked
        reason = ("revoked: key removed from the allow-list" if revoked
                  else "unknown key: not in the allow-list of enrolled appliances")
        self._refuse(z85_key, address, reason, kind="revoked key" if revoked else "unknown key")
        return False

    def _refuse(self, key: str | None, address: str | None, reason: str, *, kind: str,
                throttle: bool = True) -> None:
        """Report a refusal to ``on_refused`` (every one) and to the log (throttled
        by :class:`RefusalLog`: a peer without a key must not flood the journal)."""
        now = time.monotonic()
        if not throttle or self._refusal_log.refused(kind, key or address or "", now):
            log.warning("refused %s: %s", _who(key, address), reason)
        self._log_refusal_summary(now)
        if self.on_refused is not None:
            try:
                self.on_refused(Refusal(key, address, reason))
            except Exception:  # an audit-log failure must not kill the ZAP handler
                log.exception("on_refused callback failed")

    def _log_refusal_summary(self, now: float) -> None:
        line = self._refusal_log.summary(now)
        if line is not None:
            log.warning("%s", line)

    # ------------------------------------------------------------------ peers

    def peers(self) -> list[Peer]:
        """Peers heard from and not lost, disconnected or revoked."""
        return [st.peer for st in self._peers.values()]

    def peer_for_key(self, public_key: str) -> Peer | None:
        """The latest connection of the client with this key, if connected."""
        rid = self._by_key.get(public_key)
        return self._peers[rid].peer if rid is not None else None

    def disconnect(self, peer: Peer | str) -> bool:
        """Drop a peer now: shut its TCP connection and forget it.

        Returns True when a live connection was shut down.  The client's next
        reconnect goes through ZAP again (refused if its key was revoked).
        """
        rid = self._resolve(peer)
        st = self._peers.pop(rid, None) if rid is not None else None
        if st is None:
            return False
        if rid is not None:
            self._forget_connection(rid)
        self._monitor.forget(rid)
        if self._by_key.get(st.peer.public_key) == rid:
            del self._by_key[st.peer.public_key]
        if st.fd is None:
            return False
        try:
            s = pysocket.socket(fileno=os.dup(st.fd))
        except OSError:
            return False
        try:
            # The fd may have been closed and reused by another connection:
            # only shut it if it still joins the same two endpoints.
            if s.getpeername() != st.peername:
                return False
            s.shutdown(pysocket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def _resolve(self, peer: Peer | str | bytes) -> bytes | None:
        if isinstance(peer, Peer):
            return peer.routing_id
        if isinstance(peer, str):
            return self._by_key.get(peer)
        return peer

    def _forget_connection(self, rid: bytes) -> None:
        self._gone[rid] = None
        while len(self._gone) > 4096:
            del self._gone[next(iter(self._gone))]

    def _track(self, rid: bytes, first: zmq.Frame) -> Peer | None:
        st = self._peers.get(rid)
        if st is None and rid in self._gone:
            # Read after its connection was shut or closed (e.g. a backlog
            # after our loop stalled): that connection is over; were it
            # tracked again, it would supersede its key's newer connection.
            return None
        if st is None:
            try:
                key = first.get("User-Id")
                address = plain_ip(first.get("Peer-Address"))
            except zmq.ZMQError:
                return None
            fd: int | None
            try:
                fd = first.get(zmq.SRCFD)
            except zmq.ZMQError:
                fd = None
            peername = peername_of(fd)
            if peername is None:
                fd = None
            st = _PeerState(Peer(rid, key, address), fd, peername)
            if key not in self._allowed:
                # Revoked after its handshake, before we heard from it: shut it.
                self._peers[rid] = st
                self.disconnect(st.peer)
                return None
            if self._pending_lost.pop(key, None) is not None:
                log.info("key %s... is back on a new connection after our loop stalled; "
                         "its closed one is not reported lost", key[:8])
            old = self._by_key.get(key)
            if old is not None and old != rid and old in self._peers:
                # One appliance, one connection: the newest wins (an agent that
                # made a fresh socket); an older one still open is shut.
                previous = self._peers[old].peer
                log.warning("key %s... connected again from %s; closing its older "
                            "connection from %s", key[:8], address, previous.address)
                self.disconnect(previous)
                if self.on_superseded is not None:
                    try:
                        self.on_superseded(previous, st.peer)
                    except Exception:  # a hook's failure must not drop the connection
                        log.exception("on_superseded hook failed")
            self._peers[rid] = st
            self._by_key[key] = rid
        elif st.peer.public_key not in self._allowed:
            self.disconnect(st.peer)
            return None
        self._monitor.seen(rid, time.monotonic())
        return st.peer

    # ------------------------------------------------------------------ I/O

    @property
    def max_message_bytes(self) -> int | None:
        return self._max_message_bytes

    def set_max_message_bytes(self, value: int | None) -> None:
        """Change ZMQ_MAXMSGSIZE (e.g. for a job's model size) for every connection.

        libzmq copies socket options into the listener when it binds, so the
        socket is re-bound to the same endpoint.  That closes the connections
        the old listener accepted; clients reconnect by themselves within their
        reconnect interval, under the new limit.  Messages in flight at that
        moment may be lost: change it between rounds (e.g. when a job starts).

        Raises:
            ValueError: not None or a positive int.
            TransportError: the endpoint could not be bound again.
        """
        value = check_max_message_bytes(value)
        if value == self._max_message_bytes:
            return
        self._max_message_bytes = value
        if self._sock is not None and self.endpoint is not None:
            set_max_message_bytes(self._sock, value)
            self._sock.unbind(self.endpoint)
            # The IO thread closes the old listener asynchronously: retry
            # briefly (milliseconds in practice) until the port is free.
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    self._sock.bind(self.endpoint)
                    return
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                        raise TransportError(
                            f"cannot re-bind {self.endpoint} to apply "
                            f"max_message_bytes={value}: {exc}"
                        ) from None
                    time.sleep(0.005)

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None or self._closed:
            raise NotConnected("ServerSocket is not bound (call bind()) or was closed")
        return self._sock

    async def recv(self, timeout: float | None = None) -> Incoming:
        """The next application message (heartbeats are consumed by the socket).

        Frames are ``zmq.Frame`` s received with ``copy=False``; pass them to
        ``fedge.wire.decode``.  A background reader receives continuously, so
        peers stay tracked and alive while the caller is busy.

        Raises:
            TimeoutError: nothing arrived within ``timeout`` seconds.
            NotConnected: the socket is not bound or was closed.
            TransportError: one of the socket's tasks failed (:attr:`failure`).
        """
        self._socket()
        self._raise_failure()
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is None:  # close() or a failed task woke us
            self._queue.put_nowait(None)  # and any other waiter
            self._raise_failure()
            raise NotConnected("ServerSocket was closed")
        self._queued_bytes -= _nbytes(item)
        self._room.set()
        return item

    def _oversize(self, nbytes: int, nframes: int) -> bool:
        limit = self._max_message_bytes
        return (limit is not None and nbytes > limit) or nframes > MAX_FRAMES_PER_MESSAGE

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            # libzmq hands out a multipart message only once all of it has
            # arrived (its frames are already in memory), and ZMQ_MAXMSGSIZE
            # bounds each frame only: the whole message is checked here and an
            # oversize one let go at once.
            frames = await sock.recv_multipart(copy=False)
            rid = frames[0].bytes
            nframes = len(frames) - 1
            nbytes = sum(len(f) for f in frames[1:])
            if self._oversize(nbytes, nframes):
                del frames[2:]  # the first frame stays: it says who sent it
            frames = frames[1:]
            if not frames:
                continue
            peer = self._track(rid, frames[0])
            if peer is None:
                continue
            if self._oversize(nbytes, nframes):
                del frames
                rule = (f"more than {MAX_FRAMES_PER_MESSAGE} frames"
                        if nframes > MAX_FRAMES_PER_MESSAGE
                        else f"more than max_message_bytes={self._max_message_bytes}")
                self._refuse(
                    peer.public_key, peer.address,
                    f"oversize: a message of {nbytes} bytes in {nframes} frames, {rule}; "
                    "dropped and disconnected", kind="oversize message",
                )
                self.disconnect(peer)
                self._report_lost(peer)
                continue
            if (nframes == 1 and nbytes == len(HEARTBEAT_FRAME)
                    and frames[0].bytes == HEARTBEAT_FRAME):
                continue
            incoming = Incoming(peer, frames)
            # Drop our references while waiting: the receiver of a chunked
            # tensor frees each chunk as it decodes (release_frames).
            del frames
            while self._queue.full() or (
                    self._queued_bytes and self._queued_bytes + nbytes > self._queue_bytes):
                self._room.clear()
                self._reader_waiting = True
                try:
                    await self._room.wait()
                finally:
                    self._reader_waiting = False
            if peer.public_key in self._allowed:  # not revoked while we waited
                self._queue.put_nowait(incoming)
                self._queued_bytes += nbytes
            del incoming

    async def send(self, peer: Peer | str, frames: Sequence[Any]) -> None:
        """Send ``frames`` (from ``fedge.wire.encode``) to a peer or a public key, zero-copy.

        Raises:
            NotConnected: the peer is not connected (or the socket is closed).
        """
        sock = self._socket()
        rid = self._resolve(peer)
        if rid is None:
            raise NotConnected(f"no connected peer with public key {str(peer)[:8]}...")
        try:
            await sock.send_multipart([rid, *frames], copy=False)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                st = self._peers.get(rid)
                if st is not None:
                    self._drop_lost(rid)
                raise NotConnected(f"peer {peer!r} is not connected") from None
            raise

    def _drop_lost(self, rid: bytes) -> None:
        st = self._peers.pop(rid, None)
        self._monitor.forget(rid)
        if st is None:
            return
        if self._by_key.get(st.peer.public_key) == rid:
            del self._by_key[st.peer.public_key]
        until = self._stall_grace_until(time.monotonic())
        if until is None:
            self._report_lost(st.peer)
        else:
            self._pending_lost[st.peer.public_key] = (st.peer, until)

    def _stall_grace_until(self, now: float) -> float | None:
        """While the loop is stalled or within ``timeout`` of waking: until when a
        closed connection's loss waits for its key to come back; else None."""
        if now - self._last_tick > 1.5 * self.heartbeat.interval:  # not run for that long
            return now + self.heartbeat.timeout
        if self._woke_at is not None and now - self._woke_at < self.heartbeat.timeout:
            return self._woke_at + self.heartbeat.timeout
        return None

    def _report_lost(self, peer: Peer) -> None:
        if self.on_peer_lost is not None:
            try:
                self.on_peer_lost(peer)
            except Exception:
                log.exception("on_peer_lost callback failed")

    async def _heartbeats(self) -> None:
        tick = self.heartbeat.interval / 2
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            stalled = now - self._last_tick > tick + self.heartbeat.interval
            if stalled:
                log.warning("transport server: event loop stalled for %.1f s; peers' "
                            "silence meanwhile is not held against them", now - self._last_tick)
                self._woke_at = now
            self._last_tick = now
            self._log_refusal_summary(now)
            for key, (peer, until) in list(self._pending_lost.items()):
                if now >= until:
                    del self._pending_lost[key]
                    self._report_lost(peer)
            if self._reader_waiting or stalled:
                # The reader waits for the caller, or this event loop did not run
                # for a while (a long synchronous step, a loaded machine): peers'
                # messages sit unread, so silence proves nothing now.
                for rid in list(self._peers):
                    self._monitor.seen(rid, now)
            for rid, st in list(self._peers.items()):
                # A peer streaming a large message cannot get its heartbeat
                # through (it queues behind): steady TCP progress counts.
                # Only peers quiet for an interval are sampled (syscalls).
                last = self._monitor.last_seen(rid)
                if last is not None and now - last < self.heartbeat.interval:
                    st.rx_bytes = None
                    continue
                rx = bytes_received(st.fd, st.peername)
                if rx is not None and st.rx_bytes is not None and rx - st.rx_bytes >= (
                        PROGRESS_BYTES):
                    self._monitor.seen(rid, now)
                st.rx_bytes = rx
            for rid in self._monitor.expired(now):
                self._drop_lost(rid)
            if not self._monitor.send_due(now) or self._sock is None:
                continue
            self._monitor.sent(now)
            for rid in list(self._peers):
                # zmq.Again (queue full: the peer is busy receiving) proves nothing.
                exc = send_nowait(self._sock, [rid, HEARTBEAT_FRAME])
                if isinstance(exc, zmq.ZMQError) and exc.errno == zmq.EHOSTUNREACH:
                    self._drop_lost(rid)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                name, value = parse_event(await monitor.recv_multipart())
                if name == "DISCONNECTED":
                    # value is the closed connection's fd; a peer on it is gone
                    # (its fd is closed, or already reused by another peer).
                    for rid, st in list(self._peers.items()):
                        if st.fd == value and peername_of(st.fd) != st.peername:
                            self._forget_connection(rid)
                            self._drop_lost(rid)
                elif name in ("HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL"):
                    self._refuse(
                        None, None,
                        f"CURVE handshake failed ({name.lower()}, code {value}): the client "
                        "does not hold a key pair for our public key or speaks another protocol",
                        kind="failed handshake",
                    )
        except (zmq.ZMQError, asyncio.CancelledError):
            pass
        finally:
            monitor.close(linger=0)
