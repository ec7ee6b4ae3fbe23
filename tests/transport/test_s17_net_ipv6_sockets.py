"""IPv6 endpoints work (s17 endpoints H1).

Every check took ``tcp://[::1]:P``, but no socket set ZMQ_IPV6 and libzmq's default
is off: binding ``tcp://[::1]:P`` failed "No such device", ``tcp://*:P`` listened on
IPv4 alone, and a client dialling an IPv6 address never connected and said nothing.
Now a socket for an IPv6 address in brackets, and a listening one for ``*``, has it
on (test_s17_v6_socket_family: not for names or IPv4): a wildcard bind takes IPv6
and IPv4, and an IPv4 bind is still reported (endpoint, peer addresses) as IPv4.
Real ZeroMQ + CURVE on loopback.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from fedge.transport import ClientSocket, CurveKeyPair, HeartbeatConfig, ServerSocket


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="this host has no ::1")


async def exchange(bind: str, dial_hosts: list[str]) -> tuple[str, list[str]]:
    """Bind a server at ``bind``; from each host in ``dial_hosts`` a client connects and
    sends one message. Returns the bound endpoint and the peer address of each message."""
    server_keys, agent = CurveKeyPair.generate(), CurveKeyPair.generate()
    server = ServerSocket(server_keys, allowed=[agent.public])
    endpoint = server.bind(bind)
    port = endpoint.rpartition(":")[2]
    addresses = []
    try:
        for host in dial_hosts:
            client = ClientSocket(agent, server_keys.public, f"tcp://{host}:{port}",
                                  heartbeat=HeartbeatConfig(0.2, 2.0))
            client.start()
            try:
                await client.wait_connected(10)
                await client.send([b"hello"], timeout=10)
                incoming = await server.recv(timeout=10)
                addresses.append(incoming.peer.address)
            finally:
                await client.close()
    finally:
        await server.close()
    return endpoint, addresses


@needs_ipv6
def test_a_wildcard_bind_takes_clients_over_ipv6_and_ipv4() -> None:
    endpoint, peers = asyncio.run(asyncio.wait_for(
        exchange("tcp://*:0", ["[::1]", "127.0.0.1"]), 60))
    assert endpoint.startswith("tcp://[::]:"), endpoint
    # an IPv4 client is named as IPv4, not as ::ffff:127.0.0.1
    assert peers == ["::1", "127.0.0.1"]


@needs_ipv6
def test_an_ipv6_loopback_bind_takes_a_client_dialling_it() -> None:
    endpoint, peers = asyncio.run(asyncio.wait_for(exchange("tcp://[::1]:0", ["[::1]"]), 60))
    assert endpoint.startswith("tcp://[::1]:"), endpoint
    assert peers == ["::1"]


def test_an_ipv4_bind_is_reported_as_bound() -> None:
    endpoint, peers = asyncio.run(asyncio.wait_for(
        exchange("tcp://127.0.0.1:0", ["127.0.0.1", "localhost"]), 60))
    assert endpoint.startswith("tcp://127.0.0.1:"), endpoint  # not [::ffff:127.0.0.1]
    assert peers == ["127.0.0.1", "127.0.0.1"]
