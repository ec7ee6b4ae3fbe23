"""An agent whose coordinator's name does not resolve says so (s17 endpoints M3).

It said nothing for five minutes, then the same line as for a coordinator that is
down. Now the name is looked up off the event loop while the agent is not connected:
once at WARNING "the coordinator's name X does not resolve (...); still trying", once
at INFO when it does again, and the outage's WARNING names the cause.
`coordinator_endpoint_warnings` is what `fedge agent check` says of it. Real ZeroMQ and
the real resolver: ``.invalid`` names resolve nowhere (RFC 6761).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from fedge.agent import process
from fedge.agent.process import run_agent
from fedge.transport import CurveKeyPair
from tests.agent.test_s15_logs_link import free_port, records, site

pytestmark = pytest.mark.timeout(120)

NAME = "fl-coordinator.invalid"


def test_a_name_that_does_not_resolve_is_warned_of_once_and_named_in_the_outage(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "NAME_CHECK_S", 0.1, raising=False)
    monkeypatch.setattr(process, "OUTAGE_WARN_S", 1.0)
    caplog.set_level(logging.INFO, logger="fedge")
    agent, enrolled, _ = site(f"tcp://{NAME}:{free_port()}", CurveKeyPair.generate().public)

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=0.05,
                                              timeout_s=0.2, stop=stop))
        try:
            for _ in range(500):  # at most 5 s
                if any("no connection to the coordinator" in x for x in records(caplog)):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await asyncio.wait_for(run, 20)

    asyncio.run(asyncio.wait_for(main(), 60))
    warnings = [x for x in records(caplog, logging.WARNING) if "fedge.agent " in x]
    assert len(warnings) == 2, warnings  # many lookups, one line; then the outage
    assert warnings[0].startswith(f"WARNING fedge.agent site-a: the coordinator's name {NAME} "
                                  "does not resolve ("), warnings[0]
    assert warnings[0].endswith("); still trying")
    assert f"(its name {NAME} does not resolve: " in warnings[1], warnings[1]


def test_a_name_that_resolves_is_not_warned_of(caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "NAME_CHECK_S", 0.1, raising=False)
    caplog.set_level(logging.INFO, logger="fedge")
    agent, enrolled, _ = site(f"tcp://localhost:{free_port()}", CurveKeyPair.generate().public)

    async def main() -> None:
        stop = asyncio.Event()
        run = asyncio.ensure_future(run_agent(agent, enrolled, interval_s=0.05,
                                              timeout_s=0.2, stop=stop))
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(run, 20)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not [x for x in records(caplog, logging.WARNING) if "resolve" in x]


def test_the_name_log_says_each_change_once() -> None:
    from fedge.agent.process import NameLog

    names = NameLog("site-a", NAME)
    assert names.looked_up([], "Name or service not known") == [(
        logging.WARNING, f"site-a: the coordinator's name {NAME} does not resolve (Name or "
        "service not known); still trying")]
    assert names.looked_up([], "Name or service not known") == []
    assert names.looked_up(["192.0.2.7", "192.0.2.8"], None) == [(
        logging.INFO, f"site-a: the coordinator's name {NAME} resolves again, to "
        "192.0.2.7, 192.0.2.8")]
    assert names.looked_up(["192.0.2.7"], None) == []
    names.looked_up([], "Temporary failure in name resolution")
    assert names.connected() == [
        (logging.INFO, f"site-a: the coordinator's name {NAME} resolves again")]
    assert names.connected() == []


def test_only_a_host_name_is_looked_up() -> None:
    from fedge.agent.process import coordinator_name

    assert coordinator_name(f"tcp://{NAME}:7700") == (NAME, 7700)
    assert coordinator_name("tcp://localhost:7700") == ("localhost", 7700)
    for endpoint in ("tcp://127.0.0.1:7700", "tcp://[::1]:7700", "ipc:///run/x"):
        assert coordinator_name(endpoint) is None


def test_agent_check_warns_of_a_name_that_does_not_resolve() -> None:
    from fedge.agent.process import coordinator_endpoint_warnings, resolve_name

    (line,) = coordinator_endpoint_warnings(f"tcp://{NAME}:7700")
    assert line.startswith(f"the coordinator's name {NAME} (from tcp://{NAME}:7700, the "
                           "enrolled coordinator endpoint) does not resolve here ("), line
    assert coordinator_endpoint_warnings("tcp://192.0.2.7:7700") == []  # nothing to resolve
    addresses, error = resolve_name("localhost", 7700)
    assert error is None and "127.0.0.1" in addresses
