"""What the coordinator's journal says at INFO, over the in-memory federation: a
job's life (queued, started, completed, cancelled), each site connecting and going
away (bounded for a site whose link flaps), who a cohort left out and why, and a
site's answer that arrives after its attempt ended (a race, not a fault: INFO, not
WARNING, and not answered with a Rejected)."""

from __future__ import annotations

import asyncio
import logging

from fedge import __version__
from fedge.coordinator.rounds import Phase
from fedge.coordinator.service import LINK_LOG_BURST, LINK_LOG_WINDOW_S
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import run
from tests.coordinator.test_service import PLAN

LOGGER = "fedge.coordinator"
TWO_ROUNDS = PLAN.replace("rounds = 3", "rounds = 2")
# a site's reason as a heartbeat carries it, with a line break and terminal codes
FULL_DISK = ("state dir /var/lib/fedge cannot be written: [Errno 28] No space left on "
             "device\n2026-11-30 INFO FORGED \x1b[31mRED")


def lines(caplog, *words: str, level: int | None = None) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and all(w in r.getMessage() for w in words)
            and (level is None or r.levelno == level)]


def send(fed, site: str, body, *, job: str = "", round: int = 0) -> None:
    fed.coord.handle_frames(site, [bytes(f) for f in codec.encode(
        body, sender=site, job=job, round=round)])


def heartbeat(site: str, *, eligible: bool = True, reason: str = "") -> m.Heartbeat:
    return m.Heartbeat(site=site, version=__version__, health_json="{}", eligible=eligible,
                       reason=reason, datasets=["synthetic"], current_task="")


def test_a_job_is_logged_when_queued_started_and_completed_and_another_when_cancelled(
        federation, caplog):
    fed = federation(["a", "b", "c"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        job = run(fed, TWO_ROUNDS)
        queued = fed.coord.submit_job(PLAN, actor="alice\x1b[2J")
        fed.coord.cancel_job(queued, actor="bob")
    assert fed.coord.store.job(job).status == "completed"
    assert lines(caplog, job, "queued by test") == [
        f"job {job} queued by test: data set 'synthetic', 2 round(s)"]
    assert lines(caplog, job, "started") == [
        f"job {job} started: data set 'synthetic', 2 round(s), min_clients 2"]
    [completed] = lines(caplog, job, "completed", level=logging.INFO)
    digest = fed.coord.store.job(job).final_digest
    assert completed == f"job {job} completed: 2 round(s) committed; final model {digest[:12]}"
    # the operator's name is the admin channel's word: escaped
    assert lines(caplog, queued, "queued") == [
        f"job {queued} queued by alice\\x1b[2J: data set 'synthetic', 3 round(s)"]
    [cancelled] = lines(caplog, queued, "cancelled")
    assert cancelled.startswith(f"job {queued} cancelled by bob at ")
    assert cancelled.endswith("(no model kept: no round committed)")
    assert all(r.levelno == logging.INFO for r in caplog.records
               if r.name == LOGGER and job in r.getMessage())


def test_a_site_connecting_and_going_away_is_logged_once_each(federation, caplog):
    fed = federation(["a", "b"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(
            heartbeat("a"), sender="a")], "10.0.0.7")
        for _ in range(5):  # heartbeats of a site connected say nothing
            send(fed, "a", heartbeat("a"))
            send(fed, "b", heartbeat("b"))
            fed.clock.t += 1
            fed.coord.tick()
        fed.coord.peer_lost("a", "10.0.0.7")
        fed.coord.peer_lost("a", "10.0.0.7")  # the transport may say it twice
        # b falls silent past the heartbeat timeout, the transport saying nothing
        fed.clock.t += fed.coord.heartbeat_timeout_s + 1
        fed.coord.tick()
        fed.coord.tick()
        send(fed, "b", heartbeat("b"))
    assert lines(caplog, "site a") == [
        "site a connected from 10.0.0.7",
        "site a disconnected: its connection closed or went silent (10.0.0.7)"]
    assert lines(caplog, "site b") == [
        "site b connected",
        "site b not heard from for over 30 s ([heartbeat] timeout_s = 30): counted as "
        "disconnected",
        "site b heard from again after 32 s of silence"]


def test_a_site_whose_link_flaps_logs_a_few_lines_a_minute_then_one_summing_up(
        federation, caplog):
    """200 disconnections and returns in 100 s of the coordinator's clock: the first
    LINK_LOG_BURST changes are logged, the rest counted, and each window's end says
    where the site stands with the count; nothing is lost, and b, steady, is not held
    back by a's flapping."""
    fed = federation(["a", "b"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(200):
            send(fed, "a", heartbeat("a"))
            fed.coord.peer_lost("a")
            fed.clock.t += 0.5
            fed.coord.tick()
        for _ in range(int(LINK_LOG_WINDOW_S) // 10 + 1):  # a stays this time
            send(fed, "a", heartbeat("a"))
            send(fed, "b", heartbeat("b"))
            fed.clock.t += 10
            fed.coord.tick()
    said = lines(caplog, "site a")
    changes = 2 * 200 + 1
    windows = 2  # the 100 s of flapping opened two windows; the end closes the second
    assert len(said) <= windows * LINK_LOG_BURST + 1, said
    assert said[:LINK_LOG_BURST] == ["site a connected", "site a disconnected: its "
                                     "connection closed or went silent"] * 2
    summaries = [s for s in said if "not logged one by one" in s]
    assert summaries and all(s.startswith(("site a connected (its connection changed ",
                                           "site a disconnected: its connection closed "
                                           "or went silent (its connection changed "))
                             for s in summaries)
    assert said[-1].startswith("site a connected (its connection changed "), said
    counted = sum(int(s.split("changed ")[1].split(" ")[0]) for s in summaries)
    # every change is in a line of its own or counted in a summary; the last summary,
    # at the window's end after the flapping stopped, is no change of its own
    assert counted + len(said) - 1 == changes
    assert lines(caplog, "site b") == ["site b connected"]


def test_a_round_names_the_sites_it_left_out_and_why_once_escaped(federation, caplog):
    """c reports its state dir full (ineligible): each round's cohort is a and b, and
    one INFO line per round names c with its reason, escaped."""
    fed = federation(["a", "b", "c"])

    async def go():
        await fed.heartbeats(["a", "b"])
        send(fed, "c", heartbeat("c", eligible=False, reason=FULL_DISK))
        job = fed.coord.submit_job(TWO_ROUNDS, actor="test")
        await fed.pump(until=lambda: fed.coord.store.job(job).status != "running"
                       and fed.coord.store.job(job).status != "queued")
        return job

    with caplog.at_level(logging.INFO, logger=LOGGER):
        job = asyncio.run(go())
    assert fed.coord.store.job(job).status == "completed"
    left = lines(caplog, job, "left out")
    escaped = FULL_DISK.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert left == [f"job {job} round {r}: cohort of 2 formed; left out: c (not eligible: "
                    f"{escaped})" for r in (1, 2)], left
    assert "\x1b" not in caplog.text


def test_a_refusal_after_its_attempt_failed_is_logged_at_info_and_not_answered(
        federation, caplog):
    """s6 of the logs review: a site's task_refused arrived just after its round's
    attempt had failed, and the coordinator logged a WARNING and answered with a
    Rejected (which the agent logged at WARNING too). Now: one INFO line per site and
    round, no answer. A message for a round that never was is still rejected."""
    fed = federation(["a", "b"])
    for s in ("a", "b"):
        send(fed, s, heartbeat(s))
    job = fed.coord.submit_job(PLAN, actor="test")
    for _ in range(3):
        fed.coord.tick()
    runner = fed.coord.runner
    assert runner is not None and runner.round is not None
    assert runner.round.phase is not Phase.WAITING_COHORT
    assert fed.coord.fail_round_in_flight("the test fails it")
    fed.coord.outbox.clear()
    caplog.clear()
    refusal = m.TaskRefused("t1", m.TASK_TRAIN, "state dir full\x1b[31m")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):
            send(fed, "a", refusal, job=job, round=1)
        send(fed, "b", m.TrainDone("t1", 5), job=job, round=1)
        send(fed, "a", refusal, job=job, round=7)  # never open
    late = [r for r in caplog.records if "late" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in late] == [
        (logging.INFO, f"late task_refused from a for job {job} round 1, whose attempt "
                       "had ended: ignored: state dir full\\x1b[31m"),
        (logging.INFO, f"late train_done from b for job {job} round 1, whose attempt "
                       "had ended: ignored")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "round 7" in warnings[0], warnings
    rejected = [o for o in fed.coord.outbox if isinstance(o.body, m.Rejected)]
    assert [o.site for o in rejected] == ["a"] and "round 7" in rejected[0].body.reason


def test_over_loopback_a_site_connecting_and_closing_its_socket_is_logged_with_its_address(
        tmp_path, caplog):
    """The serve loop over real CurveZMQ sockets on 127.0.0.1 (test_hostile_messages'
    set-up): the line says where the site connected from, and the transport's report
    of its closed connection is the disconnection's line."""
    from fedge.coordinator.process import serve
    from fedge.transport import ClientSocket, HeartbeatConfig
    from tests.coordinator.test_hostile_messages import _served, _wait

    coord, cfg, keys, site_keys, _ = _served(tmp_path)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        assert await _wait(lambda: (coord.state_dir / "endpoint").exists())
        endpoint = (coord.state_dir / "endpoint").read_text().strip()
        async with ClientSocket(site_keys["a"], keys.public, endpoint,
                                heartbeat=HeartbeatConfig(0.3, 3.0)) as c:
            await c.wait_connected(20)
            for _ in range(3):
                await c.send(codec.encode(heartbeat("a"), sender="a"))
            assert await _wait(lambda: lines(caplog, "site a connected"))
        assert await _wait(lambda: lines(caplog, "site a disconnected"), timeout=30)
        stop.set()
        return await served

    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert asyncio.run(go()) == 0
    [connected] = lines(caplog, "site a connected")
    [gone] = lines(caplog, "site a disconnected")
    assert connected.startswith("site a connected from 127.0.0.1"), connected
    assert gone.startswith("site a disconnected: its connection closed or went silent "
                           "(127.0.0.1"), gone
