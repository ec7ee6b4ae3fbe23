"""The heartbeat settings a config may hold are those libzmq takes (s17 F2).

A ``[heartbeat] timeout_s`` above ZeroMQ's TTL cap used to load, and the
socket then failed inside the client's supervisor task: the agent never
connected and said nothing.  ``check_heartbeat`` refuses it at load; these
tests pin its limits to a real libzmq socket.
"""

from __future__ import annotations

import math

import pytest
import zmq

from fedge.transport._sockopts import (
    HEARTBEAT_IVL_MAX_S,
    HEARTBEAT_TTL_MAX_S,
    apply_common,
    check_heartbeat,
)
from fedge.transport.heartbeat import HeartbeatConfig


@pytest.fixture
def sock():
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    yield s
    s.close(0)
    ctx.term()


def test_the_largest_timeout_check_heartbeat_takes_is_one_libzmq_takes(sock) -> None:
    assert check_heartbeat(1, HEARTBEAT_TTL_MAX_S) == (1.0, HEARTBEAT_TTL_MAX_S)
    apply_common(sock, HeartbeatConfig(1.0, HEARTBEAT_TTL_MAX_S), None)


def test_a_timeout_just_above_the_ttl_cap_is_refused_by_both(sock) -> None:
    over = HEARTBEAT_TTL_MAX_S + 0.001
    with pytest.raises(zmq.ZMQError):
        apply_common(sock, HeartbeatConfig(1.0, over), None)
    with pytest.raises(ValueError, match=r"timeout_s = .* is above 6553\.599 s"):
        check_heartbeat(1, over)


def test_timeout_7000_names_the_section_the_key_and_the_cap() -> None:
    with pytest.raises(ValueError) as e:
        check_heartbeat(1, 7000)
    assert str(e.value) == (
        "[heartbeat] timeout_s = 7000 is above 6553.599 s, the most ZeroMQ's heartbeat TTL holds"
    )


def test_an_interval_above_a_c_int_of_milliseconds_is_refused(sock) -> None:
    with pytest.raises(OverflowError):
        sock.setsockopt(zmq.HEARTBEAT_IVL, int((HEARTBEAT_IVL_MAX_S + 0.001) * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_MAX_S * 1000))
    msg = r"\[heartbeat\] interval_s = 3000000 is above 2147483\.647 s"
    with pytest.raises(ValueError, match=msg):
        check_heartbeat(3_000_000, 4_000_000)


@pytest.mark.parametrize("value", ["30s", None, True, [1]])
def test_a_non_number_asks_for_a_number_of_seconds(value: object) -> None:
    msg = r"\[heartbeat\] interval_s = .* must be a number of seconds"
    with pytest.raises(ValueError, match=msg):
        check_heartbeat(value, 5)


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan])
def test_zero_negative_and_non_finite_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match=r"\[coordinator\.heartbeat\] timeout_s = .* > 0"):
        check_heartbeat(1, value, section="[coordinator.heartbeat]")


def test_timeout_must_exceed_interval() -> None:
    with pytest.raises(ValueError, match=r"timeout_s = 5 must exceed interval_s = 10"):
        check_heartbeat(10, 5)
    assert check_heartbeat(1, 5) == (1.0, 5.0)
