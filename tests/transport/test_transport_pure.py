"""Backoff and HeartbeatMonitor: pure logic, plain numbers for time."""

from __future__ import annotations

import random

import pytest

from fedge.transport import Backoff, HeartbeatConfig, HeartbeatMonitor, message_limit_for_model


def test_backoff_grows_exponentially_to_the_cap_with_jitter_below_base() -> None:
    b = Backoff(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5, rng=random.Random(1))
    bases = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    delays = [b.next_delay() for _ in bases]
    for d, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= d <= base
    assert b.attempt == len(bases)
    b.reset()
    assert b.attempt == 0 and b.next_delay() <= 0.1


def test_backoff_jitter_spreads_agents_cut_off_together() -> None:
    delays = {Backoff(jitter=0.5, rng=random.Random(seed)).next_delay() for seed in range(50)}
    assert len(delays) == 50 and max(delays) - min(delays) > 0.02


def test_backoff_without_jitter_is_deterministic_and_huge_attempts_are_capped() -> None:
    b = Backoff(initial=1.0, maximum=30.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 16, 30]
    assert b.base(10**6) == 30.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial": 0}, "initial 0 must be > 0"),
        ({"initial": 2, "maximum": 1}, "maximum 1 must be >= initial 2"),
        ({"factor": 0.5}, "factor 0.5 must be >= 1"),
        ({"jitter": 1.5}, r"jitter 1.5 must be in \[0, 1\]"),
    ],
)
def test_backoff_rejects_bad_parameters(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)


def test_heartbeat_monitor_expiry_and_forget() -> None:
    m = HeartbeatMonitor(HeartbeatConfig(interval=1.0, timeout=3.0))
    m.seen("a", 10.0)
    m.seen("b", 11.0)
    assert m.expired(13.0) == [] and m.alive("a", 13.0)
    assert m.expired(13.5) == ["a"] and not m.alive("a", 13.5) and m.alive("b", 13.5)
    m.seen("a", 13.6)  # any message revives it
    assert m.expired(14.5) == ["b"]
    assert m.pop_expired(14.5) == ["b"] and "b" not in m and m.peers() == ["a"]
    m.forget("a")
    assert m.last_seen("a") is None and m.expired(100.0) == []


def test_heartbeat_send_schedule() -> None:
    m = HeartbeatMonitor(HeartbeatConfig(interval=1.0, timeout=3.0))
    assert m.send_due(0.0)
    m.sent(0.0)
    assert not m.send_due(0.99) and m.send_due(1.0)


@pytest.mark.parametrize(
    ("interval", "timeout", "match"),
    [(0, 1, "interval 0 must be > 0"), (2, 2, "timeout 2 must be > interval 2")],
)
def test_heartbeat_config_validation(interval: float, timeout: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HeartbeatConfig(interval=interval, timeout=timeout)


def test_message_limit_for_model() -> None:
    assert message_limit_for_model(1000, 4, headroom=100) == 4100
    with pytest.raises(ValueError, match="n_params -1"):
        message_limit_for_model(-1)


def test_zmtp_timeout_has_a_floor_that_outlasts_one_large_frame() -> None:
    assert HeartbeatConfig(1.0, 5.0).effective_zmtp_timeout == 30.0
    assert HeartbeatConfig(1.0, 45.0).effective_zmtp_timeout == 45.0
    assert HeartbeatConfig(0.1, 0.4, zmtp_timeout=2.0).effective_zmtp_timeout == 2.0
    with pytest.raises(ValueError, match=r"zmtp_timeout 0\.05 must be > interval 0\.1"):
        HeartbeatConfig(0.1, 0.4, zmtp_timeout=0.05)


def test_a_client_waits_for_its_server_much_longer_than_the_server_waits_for_it() -> None:
    """A coordinator busy for longer than ``timeout`` is not given up on: the
    client's own limit defaults to the ZMTP timeout (which finds a dead one)."""
    assert HeartbeatConfig(1.0, 5.0).effective_server_timeout == 30.0
    assert HeartbeatConfig(1.0, 45.0).effective_server_timeout == 45.0
    assert HeartbeatConfig(0.1, 0.4, zmtp_timeout=2.0).effective_server_timeout == 2.0
    assert HeartbeatConfig(0.1, 0.4, server_timeout=0.5).effective_server_timeout == 0.5
    with pytest.raises(ValueError, match=r"server_timeout 0\.1 must be > interval 0\.1"):
        HeartbeatConfig(0.1, 0.4, server_timeout=0.1)


@pytest.mark.parametrize(
    ("endpoint", "rule"),
    [
        ("127.0.0.1:5555", "tcp://HOST:PORT or ipc://PATH"),
        ("tcp://127.0.0.1", "PORT in 1..65535"),
        ("tcp://127.0.0.1:0", "PORT in 1..65535"),
        ("tcp://127.0.0.1:70000", "PORT in 1..65535"),
        ("tcp://:5555", "PORT in 1..65535"),
        (5555, "must be a str"),
    ],
)
def test_client_refuses_a_bad_endpoint_before_connecting(endpoint: object, rule: str) -> None:
    from fedge.transport import ClientSocket, CurveKeyPair

    kp = CurveKeyPair.generate()
    with pytest.raises(ValueError) as err:
        ClientSocket(kp, kp.public, endpoint)  # type: ignore[arg-type]
    assert rule in str(err.value) and repr(endpoint) in str(err.value)
