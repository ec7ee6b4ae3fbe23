"""Heartbeats without I/O: who was heard from when, who is overdue, when to ping.

The sockets feed ``seen(peer, now)`` on every message (any message proves
liveness) and ask ``expired(now)`` / ``send_due(now)``; the monitor never
reads a clock, so timeouts are unit-tested with plain numbers.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["HEARTBEAT_FRAME", "ZMTP_TIMEOUT_FLOOR", "HeartbeatConfig", "HeartbeatMonitor"]

#: Default lower bound of the ZMTP heartbeat timeout (seconds).  libzmq restarts
#: its timeout and TTL timers only when a whole frame has arrived, so one frame
#: (a tensor chunk, ``fedge.wire.DEFAULT_CHUNK_BYTES`` = 1 MiB) must get through
#: in that time: links down to ~35 KB/s.
ZMTP_TIMEOUT_FLOOR = 30.0

#: The one-frame transport heartbeat.  Wire messages always have >= 2 frames,
#: so a single frame equal to this is never an application message.
HEARTBEAT_FRAME = b"\x00fedge-heartbeat"


@dataclass(frozen=True)
class HeartbeatConfig:
    """Interval between heartbeats and the silence after which a peer is lost (seconds).

    ZMTP heartbeats (ZMQ_HEARTBEAT_IVL/TIMEOUT/TTL) run too, inside libzmq, and
    close dead TCP connections.  A ZMTP PONG waits behind the frame being
    written, and libzmq counts nothing short of a whole frame as hearing from
    the peer, so its timeout must outlast one frame (a 1 MiB tensor chunk) on
    the slowest link: ``zmtp_timeout`` defaults to ``max(timeout,
    ZMTP_TIMEOUT_FLOOR)``.  A frame sent with ``chunk_bytes`` larger than the
    default needs a correspondingly faster link.  The application-level check (``timeout``) also
    counts a connection's steady TCP progress, so it stays tight.

    ``timeout`` is how long the coordinator waits for a site.  A client waits
    ``server_timeout`` for its coordinator, by default ``max(timeout,
    effective_zmtp_timeout)``: a coordinator whose event loop is busy for a
    few seconds (a commit, a checkpoint, unmasking a large model) sends
    nothing meanwhile, while its libzmq IO thread still answers ZMTP pings;
    replacing the connection then would lose what is queued on it and get the
    site counted lost.  A dead coordinator or a cut network is found by the
    ZMTP heartbeats (or the TCP connection closing) first.

    Raises:
        ValueError: interval not > 0, timeout, zmtp_timeout or server_timeout
            not > interval.
    """

    interval: float = 1.0
    timeout: float = 5.0
    zmtp_timeout: float | None = None
    server_timeout: float | None = None

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"heartbeat interval {self.interval!r} must be > 0 seconds")
        if not self.timeout > self.interval:
            raise ValueError(
                f"heartbeat timeout {self.timeout!r} must be > interval {self.interval!r}"
            )
        if self.zmtp_timeout is not None and not self.zmtp_timeout > self.interval:
            raise ValueError(
                f"heartbeat zmtp_timeout {self.zmtp_timeout!r} must be > interval "
                f"{self.interval!r}"
            )
        if self.server_timeout is not None and not self.server_timeout > self.interval:
            raise ValueError(
                f"heartbeat server_timeout {self.server_timeout!r} must be > interval "
                f"{self.interval!r}"
            )

    @property
    def effective_zmtp_timeout(self) -> float:
        """The ZMTP heartbeat timeout applied to sockets (seconds)."""
        if self.zmtp_timeout is not None:
            return self.zmtp_timeout
        return max(self.timeout, ZMTP_TIMEOUT_FLOOR)

    @property
    def effective_server_timeout(self) -> float:
        """How long a client waits for any message from a connected server (seconds)."""
        if self.server_timeout is not None:
            return self.server_timeout
        return max(self.timeout, self.effective_zmtp_timeout)


class HeartbeatMonitor:
    """Last-seen times per peer and the time of our own last heartbeat."""

    def __init__(self, config: HeartbeatConfig, timeout: float | None = None) -> None:
        self.config = config
        #: The silence after which a peer is expired (``config.timeout`` unless given).
        self.timeout = config.timeout if timeout is None else timeout
        self._last_seen: dict[Hashable, float] = {}
        self._last_sent: float | None = None

    def seen(self, peer: Hashable, now: float) -> None:
        """Record that ``peer`` was heard from at ``now``."""
        self._last_seen[peer] = now

    def forget(self, peer: Hashable) -> None:
        """Stop tracking ``peer`` (disconnected on purpose)."""
        self._last_seen.pop(peer, None)

    def last_seen(self, peer: Hashable) -> float | None:
        return self._last_seen.get(peer)

    def __contains__(self, peer: Hashable) -> bool:
        return peer in self._last_seen

    def peers(self) -> list[Hashable]:
        return list(self._last_seen)

    def alive(self, peer: Hashable, now: float) -> bool:
        """Heard from within the timeout."""
        t = self._last_seen.get(peer)
        return t is not None and now - t <= self.timeout

    def expired(self, now: float) -> list[Hashable]:
        """Peers silent for longer than the timeout (still tracked until forgotten)."""
        limit = now - self.timeout
        return [p for p, t in self._last_seen.items() if t < limit]

    def pop_expired(self, now: float) -> list[Hashable]:
        """``expired(now)``, and forget them."""
        gone = self.expired(now)
        for p in gone:
            del self._last_seen[p]
        return gone

    def send_due(self, now: float) -> bool:
        """True when our next heartbeat is due (never sent, or ``interval`` elapsed)."""
        return self._last_sent is None or now - self._last_sent >= self.config.interval

    def sent(self, now: float) -> None:
        """Record that we sent a heartbeat at ``now``."""
        self._last_sent = now
