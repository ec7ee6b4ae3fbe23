"""The client connection's state machine, without I/O.

Everything that decides what the agent's socket does lives here; the asyncio
code in :mod:`fedge.transport.client` only feeds it socket-monitor events,
received-message times and clock ticks, and carries out the actions it returns
(send a heartbeat, replace the socket after a delay, report an event).

Theory of operation::

    connecting --handshake_succeeded--> connected --disconnected--> connecting
    connecting --handshake_failed_*---> backoff   (HandshakeFailed recorded)
    connected  --heartbeat_timeout----> backoff   (server silent for server_timeout)
    backoff    --backoff_elapsed------> connecting (a fresh socket)
    any        --close----------------> closed

An event with no entry for the current state is ignored: a late monitor event
from a socket already being replaced, or libzmq retrying a TCP connect while
connecting (it reconnects by itself; only a finished handshake says anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedge.transport.backoff import Backoff
from fedge.transport.errors import HandshakeFailed
from fedge.transport.heartbeat import HeartbeatConfig, HeartbeatMonitor

__all__ = [
    "TRANSITIONS",
    "ClientConnection",
    "ClientEvent",
    "ReplaceSocket",
    "Report",
    "SendHeartbeat",
    "diagram",
]

#: (state, event) -> next state.  The only place client transitions are defined.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("connecting", "handshake_succeeded"): "connected",
    ("connecting", "handshake_failed_auth"): "backoff",
    ("connecting", "handshake_failed_no_detail"): "backoff",
    ("connecting", "handshake_failed_protocol"): "backoff",
    ("connected", "disconnected"): "connecting",
    ("connected", "heartbeat_timeout"): "backoff",
    ("backoff", "backoff_elapsed"): "connecting",
    ("connecting", "close"): "closed",
    ("connected", "close"): "closed",
    ("backoff", "close"): "closed",
}



def diagram() -> str:
    """The transition table as a Mermaid state diagram, for the docs."""
    lines = ["stateDiagram-v2", "    [*] --> connecting"]
    lines += [f"    {a} --> {b}: {event}" for (a, event), b in sorted(TRANSITIONS.items())]
    return "\n".join(lines) + "\n"


#: Handshake failure events -> (HandshakeFailed.kind, message template).
FAILURES: dict[str, tuple[str, str]] = {
    "handshake_failed_auth": (
        "refused",
        "the coordinator refused our CURVE key (ZAP status {value}): this appliance is "
        "not enrolled or was revoked",
    ),
    "handshake_failed_no_detail": (
        "impostor",
        "CURVE handshake with {endpoint} failed: the server there does not hold the secret "
        "of the pinned coordinator key {key}... (impostor, or wrong coordinator key in our "
        "config); refusing to talk to it",
    ),
    "handshake_failed_protocol": (
        "impostor",
        "CURVE handshake with {endpoint} failed with a protocol error (code {value}): it is "
        "not the coordinator whose key {key}... we pinned; refusing to talk to it",
    ),
}

_SERVER = "server"


@dataclass(frozen=True)
class ClientEvent:
    """A connection state change: ``kind`` is one of ``connected``,
    ``handshake_failed`` (``failure`` set), ``heartbeat_timeout``,
    ``disconnected``, ``reconnecting`` (``delay`` set), ``closed``."""

    kind: str
    detail: str = ""
    failure: HandshakeFailed | None = None
    delay: float | None = None


@dataclass(frozen=True)
class SendHeartbeat:
    """Send one heartbeat frame now (never blocking)."""


@dataclass(frozen=True)
class ReplaceSocket:
    """Close the socket, wait ``delay`` seconds, make a new one, then feed ``backoff_elapsed``."""

    reason: str
    delay: float


@dataclass(frozen=True)
class Report:
    """Tell the owner (``on_event``) about a state change."""

    event: ClientEvent


Action = SendHeartbeat | ReplaceSocket | Report


class ClientConnection:
    """State, heartbeat bookkeeping and back-off of one client connection."""

    def __init__(self, heartbeat: HeartbeatConfig, backoff: Backoff, *, endpoint: str,
                 server_key: str, progress_bytes: int = 16 * 1024) -> None:
        self.progress_bytes = progress_bytes
        # A silent coordinator may only be busy (see HeartbeatConfig.server_timeout).
        self.heartbeat = HeartbeatMonitor(heartbeat, heartbeat.effective_server_timeout)
        self.backoff = backoff
        self.endpoint = endpoint
        self.server_key = server_key
        self.state = "connecting"
        self.last_failure: HandshakeFailed | None = None
        self.failures = 0
        self.connections = 0
        self._rx_bytes: int | None = None

    def event(self, name: str, now: float, value: int = 0) -> list[Action]:
        """Feed a socket event (monitor event names in lower case, or ``close``)."""
        new = TRANSITIONS.get((self.state, name))
        if new is None:
            return []
        old, self.state = self.state, new
        if new == "closed":
            return [Report(ClientEvent("closed"))]
        if new == "connected":
            self.connections += 1
            self.backoff.reset()
            self.heartbeat.seen(_SERVER, now)
            self.heartbeat.sent(now)
            return [Report(ClientEvent("connected", self.endpoint)), SendHeartbeat()]
        if new == "connecting":
            if old == "connected":  # libzmq reconnects this socket by itself
                self.heartbeat.forget(_SERVER)
                return [Report(ClientEvent("disconnected", self.endpoint))]
            return []  # backoff elapsed: a fresh socket is connecting
        # new == "backoff"
        self.heartbeat.forget(_SERVER)
        if name in FAILURES:
            kind, text = FAILURES[name]
            failure = HandshakeFailed(
                kind, text.format(value=value, endpoint=self.endpoint, key=self.server_key[:8])
            )
            self.last_failure = failure
            self.failures += 1
            first = Report(ClientEvent("handshake_failed", failure.reason, failure=failure))
            reason = failure.reason
        else:
            reason = f"no message from {self.endpoint} for {self.heartbeat.timeout} s"
            first = Report(ClientEvent("heartbeat_timeout", reason))
        delay = self.backoff.next_delay()
        return [first, ReplaceSocket(reason, delay),
                Report(ClientEvent("reconnecting", reason, delay=delay))]

    def message_received(self, now: float) -> None:
        """Any message (heartbeat or not) from the server proves it alive."""
        if self.state == "connected":
            self.heartbeat.seen(_SERVER, now)

    def loop_stalled(self, now: float) -> None:
        """Our event loop did not run for longer than a heartbeat interval: the
        server's messages may sit unread in the socket, so its silence proves
        nothing; its timeout counts afresh from ``now``, as after a message."""
        self.message_received(now)

    def transport_progress(self, now: float, rx_bytes: int | None) -> None:
        """Feed the connection's TCP byte count (``None``: unknown).

        A server's heartbeat queues behind a large message it is sending us;
        growth of at least ``progress_bytes`` since the previous sample shows
        that message arriving, so it counts as hearing from the server.
        """
        if self.state != "connected":
            self._rx_bytes = None
            return
        if (rx_bytes is not None and self._rx_bytes is not None
                and rx_bytes - self._rx_bytes >= self.progress_bytes):
            self.heartbeat.seen(_SERVER, now)
        self._rx_bytes = rx_bytes

    def tick(self, now: float) -> list[Action]:
        """Heartbeat timing: the server's silence and our own next heartbeat."""
        if self.state != "connected":
            return []
        if _SERVER in self.heartbeat.expired(now):
            return self.event("heartbeat_timeout", now)
        if self.heartbeat.send_due(now):
            self.heartbeat.sent(now)
            return [SendHeartbeat()]
        return []
