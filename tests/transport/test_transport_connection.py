"""The client connection state machine (sans-I/O): every transition in the table,
ignored events, back-off, and heartbeat timing — with plain numbers for time."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.transport import Backoff, HeartbeatConfig
from fedge.transport.connection import (
    TRANSITIONS,
    ClientConnection,
    ReplaceSocket,
    Report,
    SendHeartbeat,
)

HB = HeartbeatConfig(interval=1.0, timeout=3.0, server_timeout=3.0)


def conn(state: str = "connecting") -> ClientConnection:
    c = ClientConnection(HB, Backoff(initial=0.5, maximum=4.0, jitter=0.0),
                         endpoint="tcp://127.0.0.1:5555", server_key="K" * 40)
    if state == "connected":
        c.event("handshake_succeeded", 0.0)
    elif state == "backoff":
        c.event("handshake_failed_auth", 0.0, 400)
    elif state == "closed":
        c.event("close", 0.0)
    assert c.state == state
    return c


def kinds(actions: list[object]) -> list[str]:
    out = []
    for a in actions:
        if isinstance(a, Report):
            out.append(a.event.kind)
        elif isinstance(a, ReplaceSocket):
            out.append(f"replace({a.delay})")
        elif isinstance(a, SendHeartbeat):
            out.append("heartbeat")
    return out


@pytest.mark.parametrize(("state", "event"), sorted(TRANSITIONS))
def test_every_transition_in_the_table_is_taken(state: str, event: str) -> None:
    c = conn(state)
    c.event(event, 1.0, 400)
    assert c.state == TRANSITIONS[(state, event)]


EXPECTED_ACTIONS = {
    ("connecting", "handshake_succeeded"): ["connected", "heartbeat"],
    ("connecting", "handshake_failed_auth"): ["handshake_failed", "replace(0.5)", "reconnecting"],
    ("connected", "disconnected"): ["disconnected"],
    ("connected", "heartbeat_timeout"): ["heartbeat_timeout", "replace(0.5)", "reconnecting"],
    ("backoff", "backoff_elapsed"): [],
    ("connected", "close"): ["closed"],
}


@pytest.mark.parametrize(("key", "expected"), sorted(EXPECTED_ACTIONS.items()))
def test_actions_on_entering_a_state(key: tuple[str, str], expected: list[str]) -> None:
    c = conn(key[0])
    # a back-off entered through a failure already used attempt 0
    if key[0] == "backoff":
        assert c.backoff.attempt == 1
    assert kinds(c.event(key[1], 1.0, 400)) == expected


@pytest.mark.parametrize(
    ("state", "event"),
    [
        ("connecting", "disconnected"),  # libzmq retrying the TCP connect
        ("backoff", "handshake_succeeded"),  # a late event from the replaced socket
        ("backoff", "disconnected"),
        ("connected", "handshake_succeeded"),
        ("closed", "handshake_succeeded"),
        ("closed", "backoff_elapsed"),
        ("connecting", "heartbeat_timeout"),
    ],
)
def test_events_without_a_transition_are_ignored(state: str, event: str) -> None:
    c = conn(state)
    assert c.event(event, 1.0) == [] and c.state == state


def test_agent_facing_an_impostor_records_why_and_backs_off_exponentially() -> None:
    c = conn()
    delays = []
    for _ in range(4):
        actions = c.event("handshake_failed_no_detail", 0.0, 32)
        delays += [a.delay for a in actions if isinstance(a, ReplaceSocket)]
        c.event("backoff_elapsed", 0.0)
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert c.failures == 4 and c.last_failure is not None
    assert c.last_failure.kind == "impostor" and "KKKKKKKK" in c.last_failure.reason
    assert "refusing to talk" in c.last_failure.reason


def test_refused_key_failure_and_success_resets_the_backoff() -> None:
    c = conn()
    c.event("handshake_failed_auth", 0.0, 400)
    assert c.last_failure is not None and c.last_failure.kind == "refused"
    assert "ZAP status 400" in c.last_failure.reason
    c.event("backoff_elapsed", 0.0)
    c.event("handshake_succeeded", 0.0)
    assert c.backoff.attempt == 0 and c.connections == 1


def test_heartbeats_are_sent_every_interval_while_connected() -> None:
    c = conn("connected")  # connected at t=0, first heartbeat sent then
    assert c.tick(0.5) == []
    assert kinds(c.tick(1.0)) == ["heartbeat"]
    assert c.tick(1.5) == []
    assert kinds(c.tick(2.0)) == ["heartbeat"]


def test_a_silent_server_times_out_but_any_message_keeps_it_alive() -> None:
    c = conn("connected")
    c.message_received(2.5)
    c.tick(2.5)
    assert "heartbeat_timeout" not in kinds(c.tick(5.4))
    assert kinds(c.tick(5.6)) == ["heartbeat_timeout", "replace(0.5)", "reconnecting"]
    assert c.state == "backoff" and c.tick(100.0) == []


def test_our_own_stalled_loop_restarts_the_servers_timeout_instead_of_ending_it() -> None:
    c = conn("connected")
    c.loop_stalled(10.0)  # woke 10 s after the connection: silence proves nothing
    assert "heartbeat_timeout" not in kinds(c.tick(10.0))
    assert "heartbeat_timeout" not in kinds(c.tick(12.9))
    assert kinds(c.tick(13.1))[0] == "heartbeat_timeout"  # still silent a timeout later
    c.loop_stalled(20.0)  # not connected any more: nothing to refresh
    assert c.state == "backoff" and c.tick(20.0) == []


def test_messages_before_connecting_do_not_count_as_liveness() -> None:
    c = conn()
    c.message_received(0.0)
    assert c.tick(10.0) == [] and c.state == "connecting"


def test_a_large_message_streaming_in_counts_as_hearing_from_the_server() -> None:
    c = conn("connected")
    c.transport_progress(0.5, 1_000)
    for t, rx in [(1.0, 500_000), (2.0, 900_000), (3.0, 1_400_000), (3.9, 2_000_000)]:
        c.transport_progress(t, rx)
        assert "heartbeat_timeout" not in kinds(c.tick(t))
    assert c.state == "connected"


def test_zmtp_pings_alone_do_not_keep_a_stuck_server_alive() -> None:
    c = conn("connected")
    rx = 10_000
    timed_out = False
    for step in range(1, 10):
        rx += 60  # a ZMTP PING/PONG per interval
        c.transport_progress(step * 0.5, rx)
        timed_out |= "heartbeat_timeout" in kinds(c.tick(step * 0.5))
    assert timed_out and c.state == "backoff"


def test_unknown_byte_counts_prove_nothing() -> None:
    c = conn("connected")
    c.transport_progress(1.0, None)
    c.transport_progress(2.0, 10**9)
    c.transport_progress(2.5, None)
    assert "heartbeat_timeout" in kinds(c.tick(3.1))


EVENTS = sorted({e for _, e in TRANSITIONS} | {"disconnected", "connected", "closed"})


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(st.sampled_from([*EVENTS, "tick", "message", "progress"]),
                          st.floats(0, 0.7)), max_size=40))
def test_any_event_sequence_keeps_the_machine_consistent(steps: list[tuple[str, float]]) -> None:
    c = conn()
    now = 0.0
    states = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
    for name, dt in steps:
        now += dt
        before = c.state
        if name == "tick":
            actions = c.tick(now)
        elif name == "message":
            c.message_received(now)
            actions = []
        elif name == "progress":
            c.transport_progress(now, int(now * 1e6))
            actions = []
        else:
            actions = c.event(name, now, 400)
        assert c.state in states
        replaced = [a for a in actions if isinstance(a, ReplaceSocket)]
        # a new socket is asked for exactly when a connection is given up
        assert bool(replaced) == (c.state == "backoff" and before != "backoff")
        if replaced:
            assert 0 < replaced[0].delay <= c.backoff.maximum
        if c.state == "closed":
            assert c.event("handshake_succeeded", now) == [] and c.tick(now) == []
    assert c.connections >= 0 and c.failures <= len(steps)


def test_the_docs_diagram_is_generated_from_the_table() -> None:
    from fedge.transport.connection import diagram

    text = diagram()
    assert text.startswith("stateDiagram-v2\n    [*] --> connecting\n")
    for (a, event), b in TRANSITIONS.items():
        assert f"    {a} --> {b}: {event}\n" in text
    assert text.count("-->") == len(TRANSITIONS) + 1
