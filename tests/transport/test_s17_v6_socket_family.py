"""Which fedge sockets get ZMQ_IPV6 (s17 diff review H2, after 64749ed).

64749ed turned it on for every socket. With it on, libzmq resolves a name for IPv6
and dials or binds only the first address: an agent or console dialling a name with
AAAA and A records (``localhost`` with Debian's ``::1 localhost``) reached ::1 alone,
and a coordinator bound as packaged, ``tcp://0.0.0.0:7700``, was never reached. Now a
client gets it only for an IPv6 address in brackets, a listening socket also for
``*`` (dual-stack); names, IPv4 addresses and 0.0.0.0 resolve for IPv4 as before.
The option is read back from the real sockets. The dual-stack ``localhost`` scenario
itself is tests/coordinator/test_s17_v6_dual_stack_localhost.py.
"""

from __future__ import annotations

import asyncio

import pytest
import zmq

from fedge.transport import ClientSocket, CurveKeyPair, HeartbeatConfig, ServerSocket
from tests.transport.test_s17_net_ipv6_sockets import needs_ipv6


@pytest.mark.parametrize(("endpoint", "bind", "ipv6"), [
    ("tcp://[::1]:7700", False, True),
    ("tcp://[2001:db8::1]:7700", False, True),
    ("tcp://[fe80::1%eth0]:7700", False, True),
    ("tcp://127.0.0.1:7700", False, False),
    ("tcp://localhost:7700", False, False),
    ("tcp://fl-coordinator.hospital.example:7700", False, False),
    ("ipc:///run/fedge/coordinator", False, False),
    ("tcp://*:7700", True, True),  # dual-stack
    ("tcp://*:*", True, True),
    ("tcp://[::]:7700", True, True),
    ("tcp://[::1]:0", True, True),
    ("tcp://0.0.0.0:7700", True, False),
    ("tcp://10.0.5.2:7700", True, False),
    ("tcp://localhost:7700", True, False),
    ("tcp://fl-coordinator.hospital.example:7700", True, False),
])
def test_ipv6_only_for_an_ipv6_address_in_brackets_or_a_wildcard_bind(endpoint, bind, ipv6):
    from fedge.transport._sockopts import ipv6_for

    assert ipv6_for(endpoint, bind=bind) is ipv6


async def _server_option(bind: str) -> tuple[str, int]:
    server = ServerSocket(CurveKeyPair.generate(), allowed=[])
    try:
        endpoint = server.bind(bind)
        assert server._sock is not None
        return endpoint, server._sock.getsockopt(zmq.IPV6)
    finally:
        await server.close()


@pytest.mark.parametrize(("bind", "ipv6"), [
    ("tcp://0.0.0.0:0", 0), ("tcp://127.0.0.1:0", 0), ("tcp://localhost:0", 0),
    pytest.param("tcp://*:0", 1, marks=needs_ipv6),
    pytest.param("tcp://[::1]:0", 1, marks=needs_ipv6),
])
def test_a_listening_socket_has_ipv6_for_a_wildcard_or_an_ipv6_address(bind, ipv6):
    endpoint, option = asyncio.run(_server_option(bind))
    assert option == ipv6, (bind, endpoint)
    if bind in ("tcp://0.0.0.0:0", "tcp://127.0.0.1:0"):
        assert endpoint.startswith(bind[:-1]), endpoint  # as bound, in IPv4


async def _client_option(endpoint: str) -> int:
    client = ClientSocket(CurveKeyPair.generate(), CurveKeyPair.generate().public, endpoint,
                          heartbeat=HeartbeatConfig(0.2, 2.0))
    client.start()
    try:
        for _ in range(200):  # its supervisor makes the socket at once
            if client._sock is not None:
                return client._sock.getsockopt(zmq.IPV6)
            await asyncio.sleep(0.01)
        raise AssertionError(f"no socket for {endpoint} in 2 s")
    finally:
        await client.close()


@pytest.mark.parametrize(("endpoint", "ipv6"), [
    ("tcp://localhost:7", 0), ("tcp://fl-coordinator.invalid:7", 0),
    ("tcp://127.0.0.1:7", 0), ("tcp://[::1]:7", 1),
])
def test_a_client_socket_has_ipv6_only_for_an_ipv6_address(endpoint, ipv6):
    assert asyncio.run(_client_option(endpoint)) == ipv6
