"""The TCP byte counter behind transfer-progress liveness, on a real socket pair."""

from __future__ import annotations

import os
import socket
import time

from fedge.transport._tcp import bytes_received, peername_of


def test_bytes_received_counts_what_arrived_and_checks_the_peer() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        peer = peername_of(conn.fileno())
        assert peer == client.getsockname()
        before = bytes_received(conn.fileno(), peer)
        assert before == 0
        client.sendall(b"x" * 50_000)
        deadline = time.monotonic() + 5
        while bytes_received(conn.fileno(), peer) != 50_000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # another peer on that fd number (reuse) or a closed fd: unknown
        assert bytes_received(conn.fileno(), ("127.0.0.1", 1)) is None
        dead = os.dup(conn.fileno())
        os.close(dead)
        assert bytes_received(dead) is None and peername_of(dead) is None
        assert bytes_received(None) is None
    finally:
        for s in (client, conn, srv):
            s.close()


def test_non_tcp_sockets_are_unknown() -> None:
    a, b = socket.socketpair()
    try:
        assert bytes_received(a.fileno()) is None
    finally:
        a.close()
        b.close()
