"""Refusals of connections without an enrolled key do not flood the log.

Anyone who can reach the coordinator's port, with no key at all, can make the
server refuse hundreds of connections a second. Each refusal still reaches
``on_refused`` (the audit throttles itself), but the log gets the first of each
kind and peer and then one summary line per interval: journald's rate limit
must never be what drops the coordinator's real lines.

Real ZeroMQ + CURVE on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import zmq

from fedge.transport import CurveKeyPair, Refusal, ServerSocket
from fedge.transport.server import RefusalLog

pytestmark = pytest.mark.timeout(120)

LOGGER = "fedge.transport.server"


async def knock(endpoint: str, server_key: str, refusals: list[Refusal], attempts: int,
                batch: int = 25) -> None:
    """``attempts`` connections, each with a fresh random CURVE key pair (the
    server's key given: refused by ZAP as unknown; another key: the handshake
    fails), ``batch`` at a time, each batch held until the server refused it."""
    ctx = zmq.Context()
    try:
        done = 0
        while done < attempts:
            target = len(refusals) + batch
            socks = []
            for _ in range(batch):
                public, secret = zmq.curve_keypair()
                s = ctx.socket(zmq.DEALER)
                s.curve_secretkey, s.curve_publickey = secret, public
                s.curve_serverkey = server_key.encode()
                s.linger = 0
                s.connect(endpoint)
                socks.append(s)
            for _ in range(500):  # at most 5 s
                if len(refusals) >= target:
                    break
                await asyncio.sleep(0.01)
            for s in socks:
                s.close(linger=0)
            done += batch
    finally:
        ctx.destroy(linger=0)


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def logged(lines: list[str]) -> int:
    """Refusals these lines account for: one each, or a summary's count."""
    return sum(int(line.split()[0]) if "more refused connection" in line else 1
               for line in lines)


def test_a_flood_of_unknown_keys_and_failed_handshakes_gives_a_bounded_number_of_lines(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    refusals: list[Refusal] = []

    async def main() -> None:
        keys = CurveKeyPair.generate()
        server = ServerSocket(keys, allowed=[CurveKeyPair.generate().public],
                              on_refused=refusals.append)
        endpoint = server.bind("tcp://127.0.0.1:0")
        try:
            await knock(endpoint, keys.public, refusals, 150)
            await knock(endpoint, CurveKeyPair.generate().public, refusals, 100)
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 100))
    unknown = [r for r in refusals if r.reason.startswith("unknown key")]
    failed = [r for r in refusals if "handshake failed" in r.reason]
    # the audit still hears of every one
    assert len(unknown) >= 150 and len(failed) >= 100, (len(unknown), len(failed))
    lines = refusal_lines(caplog)
    # the default: 5 lines of their own per minute, and the rest summed up later
    assert 1 <= len(lines) <= 5, lines


def test_the_refusals_not_logged_are_summed_up_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    refusals: list[Refusal] = []

    async def main() -> None:
        keys = CurveKeyPair.generate()
        server = ServerSocket(keys, allowed=[], on_refused=refusals.append,
                              refusal_log=RefusalLog(interval=0.5, full_per_interval=2))
        endpoint = server.bind("tcp://127.0.0.1:0")
        try:
            await knock(endpoint, keys.public, refusals, 100)
            for _ in range(300):  # the heartbeat task says the rest, with no more refusals
                if logged(refusal_lines(caplog)) == len(refusals):
                    break
                await asyncio.sleep(0.01)
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    lines = refusal_lines(caplog)
    summaries = [line for line in lines if "more refused connection" in line]
    assert summaries, lines
    assert "unknown key: " in summaries[0] and "distinct key(s)" in summaries[0]
    assert logged(lines) == len(refusals)  # each one is either logged or counted, once
    # one summary per interval at most, whatever the rate
    assert len(summaries) <= 1 + len(refusals) // 2, lines


def test_refusal_log_logs_each_peer_first_then_counts_and_sums_up() -> None:
    rl = RefusalLog(interval=60.0, full_per_interval=3, remind_s=600.0, max_tracked=4)
    assert rl.refused("unknown key", "K1", 0.0)
    assert not rl.refused("unknown key", "K1", 1.0)  # same peer: counted
    assert rl.refused("failed handshake", "", 2.0)  # another kind: its own line
    assert rl.refused("unknown key", "K2", 3.0)
    assert not rl.refused("unknown key", "K3", 4.0)  # a 4th line this minute: counted
    assert rl.summary(59.0) is None  # not a minute yet
    line = rl.summary(60.0)
    assert line is not None and line.startswith("2 more refused connection(s) in the last 60 s")
    assert "unknown key: 2" in line and "2 distinct" in line
    assert rl.summary(200.0) is None  # nothing counted since
    assert not rl.refused("unknown key", "K1", 300.0)  # still known
    assert rl.refused("unknown key", "K1", 700.0)  # a reminder after remind_s


def test_refusal_log_keeps_a_bounded_number_of_peers() -> None:
    rl = RefusalLog(interval=1.0, full_per_interval=1_000_000, max_tracked=16)
    for i in range(10_000):
        rl.refused("unknown key", f"K{i}", i * 1e-6)
    assert len(rl._logged) == 16
    assert rl.refused("unknown key", "K0", 0.5)  # forgotten: logged again
    with pytest.raises(ValueError, match="interval"):
        RefusalLog(interval=0)


def test_a_refusal_line_names_what_is_known_of_the_peer_and_says_what_is_not(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    refusals: list[Refusal] = []

    async def main() -> None:
        keys = CurveKeyPair.generate()
        server = ServerSocket(keys, allowed=[], on_refused=refusals.append)
        endpoint = server.bind("tcp://127.0.0.1:0")
        try:
            await knock(endpoint, keys.public, refusals, 1, batch=1)
            await knock(endpoint, CurveKeyPair.generate().public, refusals, 1, batch=1)
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    lines = refusal_lines(caplog)
    stranger = next(r.public_key for r in refusals if r.public_key is not None)
    assert any(line.startswith(f"refused a client at 127.0.0.1 with CURVE key {stranger}: "
                               "unknown key") for line in lines), lines
    failed = [line for line in lines if "handshake failed" in line]
    assert failed and all("None" not in line for line in lines), lines
    assert failed[0].startswith("refused a client whose CURVE handshake failed (no key "
                                "presented; ZeroMQ does not report its address): "), failed
