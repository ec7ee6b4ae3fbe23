"""fedge.transport — ZeroMQ sockets, CURVE keys, ZAP allow-list, heartbeats.

Public API::

    from fedge.transport import (
        CurveKeyPair, save_keypair, load_keypair, load_public_key,
        ServerSocket, ClientSocket, Peer, Refusal, Incoming, ClientEvent,
        HeartbeatConfig, HeartbeatMonitor, Backoff, message_limit_for_model,
        TransportError, KeyFileError, HandshakeFailed, NotConnected,
    )

Keys
    ``CurveKeyPair.generate()``; ``CurveKeyPair(public_z85, secret_z85)``
    validates both and that they match.  ``save_keypair(dir, name, kp)`` writes
    ``name.key`` (0644) and ``name.key_secret`` (0600) in ZeroMQ certificate
    format; ``load_keypair(path)`` refuses group/other-readable files, bad
    format, bad Z85 or a mismatched pair with a ``KeyFileError`` saying which.

Coordinator (ROUTER, CURVE server, ZAP allow-list)::

    server = ServerSocket(keypair, allowed=enrolled_keys,
                          on_refused=audit,          # Refusal(public_key, address, reason)
                          on_peer_lost=mark_offline, # Peer: silent too long, or closed
                          heartbeat=HeartbeatConfig(interval=1.0, timeout=5.0),
                          max_message_bytes=message_limit_for_model(d))
    endpoint = server.bind("tcp://127.0.0.1:0")      # inside a running loop
    msg = await server.recv(timeout=5.0)              # Incoming(peer, frames)
    env = fedge.wire.decode(msg.frames, max_bytes=limit, release_frames=True)
    await server.send(msg.peer, fedge.wire.encode(reply, sender="coordinator"))
    await server.send(public_key_z85, frames)         # or address by appliance key
    server.set_allowed(new_keys)   # next connections; revoked peers dropped now
    server.disconnect(peer)        # shut one connection now
    server.peers(); server.peer_for_key(key)
    server.set_max_message_bytes(n)  # re-binds: every connection reconnects under n
    await server.close()

Appliance (DEALER, CURVE client pinned to the coordinator key)::

    client = ClientSocket(keypair, coordinator_key, endpoint,
                          heartbeat=HeartbeatConfig(), backoff=Backoff(0.1, 30.0),
                          on_event=log_event)        # ClientEvent(kind, detail, ...)
    client.start()
    await client.wait_connected(timeout=10)  # HandshakeFailed(kind="refused"|"impostor")
    await client.send(frames, timeout=30); frames = await client.recv(timeout=5)
    client.state  # idle, connecting, connected, backoff, closed
    await client.close()

One key has one connection: a key's newer connection shuts its older one.
Errors: ``TransportError`` (bind failures), ``KeyFileError`` (keys),
``HandshakeFailed`` (``.kind``, ``.reason``), ``NotConnected`` (closed socket,
peer not connected, connection replaced during a send), ``TimeoutError``.

The client's decisions (when it is connected, when to give up on a silent
server, when and after how long to make a new socket) are the sans-I/O
``ClientConnection`` in :mod:`fedge.transport.connection`, whose
``TRANSITIONS`` table is the single definition of its states.

Heartbeats are one-frame ``HEARTBEAT_FRAME`` messages consumed by the sockets;
any message counts, and so does steady TCP progress (a heartbeat queued behind
a large model cannot arrive, the model's bytes can).  A side whose own event
loop stalled for more than an interval restarts its peers' timeouts on waking
(their heartbeats may sit unread), so a stall delays the detection of a dead
peer by one timeout and never drops a live one.  ZMTP heartbeats run
underneath with a timeout of at least ``ZMTP_TIMEOUT_FLOOR``; libzmq hears
nothing from a peer until a whole frame has arrived (a PONG waits behind the
frame being written), which is why ``fedge.wire`` sends tensors in 1 MiB frames.
The server also drops a peer as soon as libzmq closes its connection.
``HeartbeatMonitor`` is the sans-I/O bookkeeping (``seen``, ``expired(now)``,
``send_due(now)``).  ``Backoff`` gives jittered
exponential delays (``next_delay()``, ``reset()``).  Frames are sent and
received with ``copy=False``: with ``fedge.wire`` a tensor goes from the
sender's array to the receiver without a Python-level copy, but for the one
copy that joins a chunked tensor's frames.
"""

from fedge.transport._sockopts import CURVE_FRAME_OVERHEAD, message_limit_for_model
from fedge.transport.backoff import Backoff
from fedge.transport.client import ClientSocket
from fedge.transport.connection import TRANSITIONS, ClientConnection, ClientEvent
from fedge.transport.errors import HandshakeFailed, KeyFileError, NotConnected, TransportError
from fedge.transport.heartbeat import (
    HEARTBEAT_FRAME,
    ZMTP_TIMEOUT_FLOOR,
    HeartbeatConfig,
    HeartbeatMonitor,
)
from fedge.transport.keys import (
    CurveKeyPair,
    check_public_key,
    load_keypair,
    load_public_key,
    save_keypair,
)
from fedge.transport.server import Incoming, Peer, Refusal, ServerSocket

__all__ = [
    "CURVE_FRAME_OVERHEAD",
    "HEARTBEAT_FRAME",
    "TRANSITIONS",
    "ZMTP_TIMEOUT_FLOOR",
    "Backoff",
    "ClientConnection",
    "ClientEvent",
    "ClientSocket",
    "CurveKeyPair",
    "HandshakeFailed",
    "HeartbeatConfig",
    "HeartbeatMonitor",
    "Incoming",
    "KeyFileError",
    "NotConnected",
    "Peer",
    "Refusal",
    "ServerSocket",
    "TransportError",
    "check_public_key",
    "load_keypair",
    "load_public_key",
    "message_limit_for_model",
    "save_keypair",
]
