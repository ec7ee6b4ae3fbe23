"""An endpoint fedge cannot dial is refused where it is first read, naming the rule
(s17 endpoints M1).

``check_endpoint`` took any ``tcp://TEXT:PORT``. libzmq refuses some of these only when
a socket connects (EINVAL: another scheme, a space, a name that is not ASCII), inside
the agent's connection task; others it takes and never resolves (a bracket left open,
a second port). Each is refused now with what to write instead. Real libzmq.
"""

from __future__ import annotations

import pytest
import zmq

from fedge.transport import ClientSocket, CurveKeyPair
from fedge.transport._sockopts import check_endpoint, set_ipv6


@pytest.mark.parametrize(("endpoint", "says"), [
    ("tcp://https://fl-coordinator.hospital.example:17760",
     "holds a '/': the endpoint is tcp://HOST:PORT alone, without another scheme"),
    ("tcp://krankenhaus-münchen.example:17760",
     "is not ASCII, and ZeroMQ takes ASCII names only: write its IDNA form, "
     "xn--krankenhaus-mnchen-y6b.example"),
    ("tcp://fl coordinator.hospital.example:17760", "is not a host name"),
    ("tcp://[::1:17760", "host '[::1' is not an IPv6 address in brackets"),
    ("tcp://fl-coordinator.hospital.example:17760:17760", "holds a ':'"),
    ("tcp://::1:17760", "the IPv6 address ::1 must be in brackets: tcp://[::1]:PORT"),
    ("tcp://*:17760", "host '*' (every address) is for binding"),
    ("tcp://999.0.0.1:17760", "is not an IPv4 address"),
    ("tcp://-coordinator.example:17760", "is not a host name"),
    ("tcp://a..example:17760", "is not a host name"),
    ("tcp://coordinator;example:17760", "is not a host name"),
])
def test_an_endpoint_libzmq_cannot_dial_is_refused_naming_the_rule(endpoint, says) -> None:
    with pytest.raises(ValueError) as err:
        check_endpoint(endpoint)
    assert str(err.value).startswith(f"endpoint {endpoint!r}: "), err.value
    assert says in str(err.value), err.value
    kp = CurveKeyPair.generate()
    with pytest.raises(ValueError, match="endpoint"):
        ClientSocket(kp, kp.public, endpoint)


@pytest.mark.parametrize("endpoint", [
    "tcp://https://fl-coordinator.hospital.example:17760",
    "tcp://krankenhaus-münchen.example:17760",
    "tcp://fl coordinator.hospital.example:17760",
])
def test_those_refused_are_what_libzmq_refuses_at_connect(endpoint) -> None:
    """Why they must be refused early: the agent's socket fails only when it connects."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    set_ipv6(sock, endpoint, bind=False)  # as ClientSocket does
    try:
        with pytest.raises(zmq.ZMQError) as err:
            sock.connect(endpoint)
        assert err.value.errno == zmq.EINVAL
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("endpoint", [
    "tcp://fl-coordinator.hospital.example:7700", "tcp://localhost:7700",
    "tcp://127.0.0.1:7700", "tcp://[::1]:7700", "tcp://[2001:db8::1]:65535",
    "tcp://[fe80::1%lo]:7700", "tcp://fl-coordinator.:7700", "tcp://fl_coord.example:7700",
    "tcp://xn--krankenhaus-mnchen-y6b.example:7700", "ipc:///run/fedge/coordinator",
])
def test_an_endpoint_libzmq_takes_is_taken(endpoint) -> None:
    assert check_endpoint(endpoint) == endpoint
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    set_ipv6(sock, endpoint, bind=False)  # as ClientSocket does
    try:
        sock.connect(endpoint)  # no EINVAL (nothing listens: it only tries)
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.parametrize("endpoint", ["tcp://*:7700", "tcp://*:0", "tcp://*:*",
                                      "tcp://[::]:0", "tcp://0.0.0.0:7700", "tcp://lo:7700"])
def test_a_bind_may_name_every_address_and_any_free_port(endpoint) -> None:
    assert check_endpoint(endpoint, bind=True) == endpoint
