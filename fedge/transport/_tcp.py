"""Bytes received on a libzmq connection's TCP socket (Linux TCP_INFO).

Application heartbeats queue behind a large message on the same connection
(head-of-line blocking): while a 1 GB model streams in, the peer's heartbeat
cannot arrive.  The kernel's per-connection byte counter shows the transfer
progressing, so the sockets count steady growth as liveness.  ZMTP PINGs are
a few dozen bytes per interval, far below :data:`PROGRESS_BYTES`, so a peer
whose application is stuck is still found out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

#: Growth between two samples that counts as the peer's application sending.
PROGRESS_BYTES = 16 * 1024

# struct tcp_info: tcpi_bytes_received is the u64 at offset 128 (Linux >= 4.1).
_BYTES_RECEIVED_OFFSET = 128
_TCP_INFO_LEN = 136


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket | None]:
    """A socket object on a duplicate of ``fd`` (libzmq keeps the original), closed
    on exit; ``None`` when ``fd`` cannot be duplicated (already closed)."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        yield None
        return
    try:
        yield s
    finally:
        s.close()


def bytes_received(fd: int | None, peername: Any = None) -> int | None:
    """Total bytes received on TCP socket ``fd``; ``None`` when unknown.

    With ``peername``, ``None`` also when ``fd`` no longer joins that peer
    (closed, or reused by another connection).  Never raises.
    """
    if fd is None or not hasattr(socket, "TCP_INFO"):
        return None
    with _borrowed(fd) as s:
        if s is None:
            return None
        try:
            if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
                return None
            if peername is not None and s.getpeername() != peername:
                return None
            info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(info) < _TCP_INFO_LEN:
            return None
        return int(struct.unpack_from("Q", info, _BYTES_RECEIVED_OFFSET)[0])


def peername_of(fd: int | None) -> Any:
    """The remote address of socket ``fd``, or ``None``.  Never raises."""
    if fd is None:
        return None
    with _borrowed(fd) as s:
        if s is None:
            return None
        try:
            return s.getpeername()
        except OSError:
            return None


def plain_ip(address: str) -> str:
    """An IP address as a person writes it: an IPv4-mapped IPv6 address (what an IPv6
    socket with IPV6_V6ONLY off reports for an IPv4 peer, ``::ffff:127.0.0.1``) as the
    IPv4 address; anything else unchanged."""
    if not address.startswith("::ffff:"):
        return address
    try:
        v4 = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return address
    return str(v4) if v4 is not None else address

