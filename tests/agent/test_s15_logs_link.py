"""What the agent logs of its link to the coordinator, as site IT reads it.

A wrong coordinator key or an unenrolled appliance is said once at ERROR, not three
times per attempt, and then reminded of with a count; a coordinator down for long
is said at WARNING after a while, rarely repeated, and the link's return says how
long it was gone (logs review, session 15, L3 and L4). Real ZeroMQ + CURVE on
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from fedge.agent import process
from fedge.agent.process import Enrolled, LinkLog, run_agent
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.transport import CurveKeyPair, Refusal, ServerSocket
from tests.agent.test_runtime import PLAIN_OK

pytestmark = pytest.mark.timeout(120)

INTERVAL_S, TIMEOUT_S = 0.05, 0.2  # the agent retries every 0.1, 0.2, ... 2 s at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site(endpoint: str, coordinator_key: str) -> tuple[Agent, Enrolled, CurveKeyPair]:
    keys = CurveKeyPair.generate()
    enrolled = Enrolled("site-a", keys.public, keys.secret or "", endpoint, coordinator_key,
                        None, None)
    return Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK), enrolled, keys


def records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [f"{r.levelname} {r.name} {r.getMessage()}" for r in caplog.records
            if r.levelno >= level and r.name.startswith("fedge")]


def test_an_unenrolled_appliance_says_so_once_however_often_it_retries(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedge")
    refusals: list[Refusal] = []

    async def main() -> None:
        coordinator = CurveKeyPair.generate()
        server = ServerSocket(coordinator, allowed=[], on_refused=refusals.append)
        endpoint = server.bind("tcp://127.0.0.1:0")
        agent, enrolled, _ = site(endpoint, coordinator.public)
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=INTERVAL_S,
                                              timeout_s=TIMEOUT_S, stop=stop))
        try:
            for _ in range(600):  # at most 6 s
                if len(refusals) >= 4:
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert len(refusals) >= 4  # four attempts refused...
    agent_lines = [line for line in records(caplog) if " fedge.agent " in line]
    errors = [line for line in agent_lines if line.startswith("ERROR")]
    assert len(errors) == 1, agent_lines  # ...said once
    assert "not enrolled or was revoked" in errors[0]
    # the transport's own account of each attempt is DEBUG detail
    assert not [line for line in records(caplog) if "fedge.transport.client" in line]


def test_a_lasting_handshake_failure_is_reminded_of_with_a_count(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "LINK_REMIND_S", 0.5)
    caplog.set_level(logging.INFO, logger="fedge")

    async def main() -> None:
        impostor = ServerSocket(CurveKeyPair.generate(), allowed=[])
        endpoint = impostor.bind("tcp://127.0.0.1:0")
        # the coordinator key in our config is not the one the server there holds
        agent, enrolled, _ = site(endpoint, CurveKeyPair.generate().public)
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=INTERVAL_S,
                                              timeout_s=TIMEOUT_S, stop=stop))
        try:
            for _ in range(800):  # at most 8 s
                if any("more failed attempt" in line for line in records(caplog)):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
            await impostor.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    errors = [line for line in records(caplog) if line.startswith("ERROR fedge.agent")]
    assert "wrong coordinator key in our config" in errors[0]
    assert len(errors) == 2, errors
    assert "(still so: " in errors[1] and "more failed attempt(s) in the last" in errors[1]
    assert "retrying every 2 s" in errors[1]


def test_a_coordinator_down_for_long_is_warned_of_rarely_and_its_return_timed(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "OUTAGE_WARN_S", 0.5)
    monkeypatch.setattr(process, "OUTAGE_REPEAT_S", 1.5)
    caplog.set_level(logging.INFO, logger="fedge")
    coordinator = CurveKeyPair.generate()
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody listens: the coordinator is down
    agent, enrolled, keys = site(endpoint, coordinator.public)

    def warnings() -> list[str]:
        return [line for line in records(caplog, logging.WARNING) if "fedge.agent" in line]

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=INTERVAL_S,
                                              timeout_s=TIMEOUT_S, stop=stop))
        server = None
        try:
            await asyncio.sleep(2.3)  # down for 2.3 s: warned at 0.5 s and at 2 s
            assert len(warnings()) == 2, warnings()
            server = ServerSocket(coordinator, allowed=[keys.public])
            server.bind(endpoint)
            for _ in range(800):  # at most 8 s (the agent retries every 2 s at most)
                if any("connected" in line for line in records(caplog)):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
            if server is not None:
                await server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    first = warnings()[0]
    assert first.startswith(f"WARNING fedge.agent site-a: no connection to the coordinator "
                            f"at {endpoint} for ")
    assert first.endswith("; still retrying every 2 s at most")
    (back,) = [line for line in records(caplog) if "connected" in line]
    assert back.startswith(f"INFO fedge.agent site-a: connected {endpoint} after ")
    assert back.endswith(" s without a connection")


def test_link_log_says_a_failure_once_then_reminds_and_warns_of_an_outage() -> None:
    lines = LinkLog("site-a", "tcp://c:1", 30.0, 0.0, remind_s=300.0, warn_s=300.0,
                    repeat_s=3600.0)
    refused = "the coordinator refused our CURVE key: not enrolled"
    assert lines.event("handshake_failed", refused, 1.0) == [
        (logging.ERROR, f"site-a: {refused}")]
    assert [lines.event("handshake_failed", refused, t) for t in (31.0, 61.0)] == [[], []]
    assert lines.tick(400.0) == []  # the failure has its own lines, not the outage's
    (reminder,) = lines.event("handshake_failed", refused, 301.0)
    assert reminder == (logging.ERROR, f"site-a: {refused} (still so: 3 more failed "
                                       "attempt(s) in the last 5 min; retrying every 30 s)")
    # a new cause is said at once
    assert lines.event("handshake_failed", "impostor", 302.0) == [
        (logging.ERROR, "site-a: impostor")]
    assert lines.event("connected", "tcp://c:1", 303.0) == [
        (logging.INFO, "site-a: connected tcp://c:1")]  # the first connection: no outage
    assert lines.event("disconnected", "tcp://c:1", 1000.0) == [
        (logging.INFO, "site-a: disconnected tcp://c:1")]
    assert lines.tick(1299.0) == []
    assert lines.tick(1300.0) == [(logging.WARNING, "site-a: no connection to the "
                                   "coordinator at tcp://c:1 for 5 min; still retrying "
                                   "every 30 s at most")]
    assert lines.tick(4899.0) == []
    assert lines.tick(4900.0)[0][1].endswith("for 1 h 5 min; still retrying every 30 s "
                                             "at most")
    assert lines.event("connected", "tcp://c:1", 5000.0) == [
        (logging.INFO, "site-a: connected tcp://c:1 after 1 h 6 min without a connection")]
    assert lines.tick(99999.0) == []


def test_an_agent_that_never_connects_is_warned_of_too() -> None:
    lines = LinkLog("site-a", "tcp://c:1", 30.0, 0.0, warn_s=300.0)
    assert lines.tick(299.0) == []
    assert lines.tick(300.0)[0][0] == logging.WARNING
    assert lines.event("connected", "tcp://c:1", 301.0) == [
        (logging.INFO, "site-a: connected tcp://c:1 after 5 min without a connection")]


