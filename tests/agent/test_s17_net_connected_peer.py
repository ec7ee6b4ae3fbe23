"""The agent's "connected" line says which address a coordinator name reached (s17
endpoints L2): "connected tcp://NAME:PORT" never said which of the name's addresses
(split DNS, a failover name) the agent was talking to. An IP endpoint says nothing
more. Real ZeroMQ + CURVE on loopback.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from fedge.agent.process import run_agent
from fedge.transport import CurveKeyPair, ServerSocket
from tests.agent.test_s15_logs_link import records, site

pytestmark = pytest.mark.timeout(120)


def connected_line(caplog: pytest.LogCaptureFixture, host: str) -> tuple[str, str]:
    coordinator = CurveKeyPair.generate()

    async def main() -> str:
        server = ServerSocket(coordinator, allowed=[])
        bound = server.bind("tcp://127.0.0.1:0")
        endpoint = f"tcp://{host}:{bound.rpartition(':')[2]}"
        agent, enrolled, keys = site(endpoint, coordinator.public)
        server.set_allowed([keys.public])
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=0.05,
                                              timeout_s=0.5, stop=stop))
        try:
            for _ in range(1000):  # at most 10 s
                if any(": connected " in line for line in records(caplog)):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)
            await server.close()
        return endpoint

    caplog.set_level(logging.INFO, logger="fedge")
    endpoint = asyncio.run(asyncio.wait_for(main(), 60))
    (line,) = [x for x in records(caplog) if ": connected " in x]
    return endpoint, line


def test_a_name_endpoint_says_the_address_reached(caplog) -> None:
    endpoint, line = connected_line(caplog, "localhost")
    assert line == f"INFO fedge.agent site-a: connected {endpoint} (127.0.0.1)"


def test_an_address_endpoint_is_said_as_it_is(caplog) -> None:
    endpoint, line = connected_line(caplog, "127.0.0.1")
    assert line == f"INFO fedge.agent site-a: connected {endpoint}"
