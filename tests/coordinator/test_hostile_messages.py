"""One site's (or one operator's) message, however odd, must not end the coordinator:
the message is refused with a short reason and every other site is served on.

In-process: the real Coordinator, the real codec and, for the serve loop, real
CurveZMQ sockets on 127.0.0.1. The same attacks against a coordinator process are in
tests/e2e/test_hostile_peers.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np

from fedge import __version__
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.rounds import Phase
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_service import PLAN as SERVICE_PLAN

# test_service's plan, two rounds, failing a job after two failed attempts
PLAN = SERVICE_PLAN.replace("rounds = 3", "rounds = 2").replace(
    "min_clients = 2\n", "min_clients = 2\nmax_failed_attempts = 2\n")


def heartbeat(name, **over):
    fields = dict(site=name, version=__version__, health_json="{}", eligible=True, reason="",
                  datasets=["synthetic"], current_task="")
    fields.update(over)
    return m.Heartbeat(**fields)


def replies(coord, site):
    out = [o.body for o in coord.outbox if o.site == site]
    coord.outbox.clear()
    return out


def test_a_heartbeat_naming_a_300_kb_site_or_version_is_answered_with_a_short_rejection(
        federation):
    """The Rejected quoted the name with !r: 300 000 NULs became 1.2 MB, past Rejected's
    1 MiB limit, and encoding it ended the coordinator's loop."""
    fed = federation(["a"])
    for over in ({"site": "\x00" * 300_000}, {"version": "\x00" * 300_000},
                 {"version": "1.0.0-" + "\x00" * 300_000}):
        fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(heartbeat("a", **over),
                                                                      sender="a")])
        [rejected] = [b for b in replies(fed.coord, "a") if not isinstance(b, m.RosterUpdate)]
        assert isinstance(rejected, m.Rejected) and len(rejected.reason) < 400, over.keys()
        codec.encode(rejected, sender="coordinator")


def test_a_body_nested_a_thousand_deep_is_refused_as_malformed_and_the_site_served_on(
        federation):
    fed = federation(["a"])
    header = bytes(codec.encode(heartbeat("a"), sender="a")[0])
    fed.coord.handle_frames("a", [header, b"\x91" * 1000 + b"\xc0"])
    [rejected] = [b for b in replies(fed.coord, "a") if isinstance(b, m.Rejected)]
    assert rejected.reason.startswith("BadField: body: [[[...]]] must be a map")
    assert fed.coord.store.audit_log(action="malformed_message")
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(heartbeat("a"), sender="a")])
    assert isinstance(replies(fed.coord, "a")[0], m.HeartbeatAck)


def test_an_exception_from_the_decoder_that_is_not_a_wire_error_is_refused_not_raised(
        federation, monkeypatch):
    fed = federation(["a"])

    def broken(frames, **kw):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(codec, "decode", broken)
    fed.coord.handle_frames("a", [b"x", b"y"])
    [rejected] = replies(fed.coord, "a")
    assert rejected.reason == ("MalformedFrame: the message could not be decoded "
                               "(RecursionError)")


def test_a_commit_that_raises_other_than_a_write_failure_fails_the_attempt_which_runs_again(
        federation, caplog):
    """Store.commit_round raised OverflowError (an example count past SQLite's INTEGER):
    _commit caught only OSError and sqlite3.Error, so tick raised on every call and the
    coordinator process ended. Now that attempt fails, naming the error, and the
    round is trained again."""
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="test")
    store = fed.coord.store
    real = store.commit_round
    calls = []

    def commit_once_overflowing(*args, **kw):
        calls.append(args[1])
        if len(calls) == 1:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(*args, **kw)

    store.commit_round = commit_once_overflowing

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: store.job(job).status in ("completed", "failed"),
                       advance=1.0)

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        asyncio.run(go())
    assert store.job(job).status == "completed"
    assert [(r.round, r.attempt, r.status) for r in store.rounds(job)] == [
        (1, 1, "failed"), (1, 2, "committed"), (2, 1, "committed")]
    failed = store.rounds(job)[0]
    assert "round 1 could not be committed: OverflowError" in failed.reason
    assert f"job {job} round 1 cannot be committed" in caplog.text


# -- the serve loop, over real CurveZMQ sockets on 127.0.0.1 ---------------------------------


def _served(tmp_path, *, sites=("a",), job_plan=None):
    from fedge.coordinator.config import CoordinatorConfig
    from fedge.coordinator.service import Coordinator
    from fedge.secagg.keys import Identity
    from fedge.transport import CurveKeyPair

    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8, np.float32),
                        heartbeat_timeout_s=30.0)
    site_keys = {}
    for s in sites:
        site_keys[s] = CurveKeyPair.generate()
        coord.enrol(s, site_keys[s].public, Identity.generate().public_bytes(), actor="test")
    job = None
    if job_plan is not None:
        job = coord.submit_job(job_plan, actor="test")
        ck.save_checkpoint(ck.round_path(coord.state_dir, job, 0),
                           ck.Checkpoint(weights=np.zeros(8, np.float32), round=0,
                                         plan=job_plan))
    keys = CurveKeyPair.generate()
    cfg = CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                            b"", b"", tick_s=0.02)
    return coord, cfg, keys, site_keys, job


async def _wait(pred, timeout=20.0):
    for _ in range(int(timeout / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return False


def test_serve_skips_a_message_it_cannot_encode_and_sends_the_next(tmp_path, caplog):
    """process._drain called codec.encode unguarded: one Rejected past its 1 MiB limit
    raised OversizeMessage out of serve(), dropping every queued message and the round."""
    from fedge.coordinator.process import serve
    from fedge.transport import ClientSocket, HeartbeatConfig

    coord, cfg, keys, site_keys, _ = _served(tmp_path)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        assert await _wait(lambda: (coord.state_dir / "endpoint").exists())
        endpoint = (coord.state_dir / "endpoint").read_text().strip()
        got = []
        async with ClientSocket(site_keys["a"], keys.public, endpoint,
                                heartbeat=HeartbeatConfig(0.3, 3.0)) as c:
            await c.wait_connected(20)
            await c.send(codec.encode(heartbeat("a"), sender="a"))
            assert await _wait(lambda: "a" in coord.conns)
            from fedge.coordinator.service import Outgoing

            coord.outbox += [Outgoing("a", m.Rejected("\x00" * (2 << 20))),
                             Outgoing("a", m.Rejected("after the unsendable one"))]
            for _ in range(6):
                try:
                    frames = await c.recv(timeout=3)
                except TimeoutError:
                    break
                body = codec.decode([f.bytes for f in frames], max_bytes=1 << 30).body
                got.append(body)
                if getattr(body, "reason", "") == "after the unsendable one":
                    break
        alive = not served.done()
        stop.set()
        return alive, await served, got

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        alive, code, got = asyncio.run(go())
    assert alive and code == 0
    assert [b.reason for b in got if isinstance(b, m.Rejected)] == ["after the unsendable one"]
    assert "Rejected for a cannot be encoded, not sent: OversizeMessage" in caplog.text


def test_a_tick_that_raises_fails_the_round_in_flight_once_and_the_loop_goes_on(
        tmp_path, caplog):
    """serve() caught only OSError/OperationalError from tick: anything else ended the
    coordinator. Now each round attempt meeting the error fails naming it (the job
    fails after max_failed_attempts) and the loop keeps serving."""
    from fedge.coordinator.process import serve

    coord, cfg, _, _, job = _served(tmp_path, job_plan=PLAN)
    real_tick = coord.tick
    raised = []

    def tick():
        real_tick()
        if coord.runner is not None and coord.runner.round is not None \
                and coord.runner.round.phase is Phase.WAITING_COHORT:
            raised.append(1)
            raise RuntimeError("a bug met while the round runs")

    coord.tick = tick

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        ended = await _wait(lambda: coord.store.job(job).status == "failed" or served.done())
        await asyncio.sleep(0.3)  # some 15 more ticks: nothing more is failed or logged
        alive = not served.done()
        stop.set()
        return ended, alive, await served

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        ended, alive, code = asyncio.run(go())
    assert ended and alive and code == 0
    from fedge.coordinator.store import Store

    store = Store(coord.state_dir)  # serve closed the coordinator's
    try:
        assert [(r.round, r.attempt, r.status) for r in store.rounds(job)] == [
            (1, 1, "failed"), (1, 2, "failed")]
        assert all("RuntimeError: a bug met while the round runs" in r.reason
                   for r in store.rounds(job))
        assert store.job(job).status == "failed"
    finally:
        store.close()
    logged = [r for r in caplog.records if "coordinator tick failed" in r.getMessage()]
    assert 2 <= len(logged) <= 3  # one per failed attempt (and one for the job's end)


def test_a_failed_admin_channel_is_logged_and_started_again(tmp_path, caplog, monkeypatch):
    """The admin task's exception was suppressed until shutdown: the channel was gone,
    silently, for the rest of the coordinator's life."""
    from fedge.coordinator import process

    coord, cfg, _, _, _ = _served(tmp_path)
    started = []

    def start_admin(cfg, coord):
        started.append(1)

        async def channel():
            if len(started) == 1:
                raise RuntimeError("admin channel broke")
            await asyncio.Event().wait()  # serves until cancelled

        return asyncio.ensure_future(channel())

    monkeypatch.setattr(process, "_start_admin", start_admin)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(cfg, stop=stop, coordinator=coord))
        await _wait(lambda: len(started) >= 2 or served.done(), timeout=10)
        await asyncio.sleep(0.2)
        stop.set()
        return await served

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        assert asyncio.run(go()) == 0
    assert len(started) == 2
    assert "the admin channel stopped (RuntimeError: admin channel broke); starting it " \
           "again" in caplog.text


def test_an_unknown_op_of_any_length_is_quoted_short(tmp_path):
    """The error quoted the op with !r: 68 MiB of NULs became 272 MiB, past AdminReply's
    limit, and encoding it ended the admin channel."""
    from fedge.console.protocol import AdminRequest
    from fedge.coordinator.admin import AdminService, Operator
    from fedge.coordinator.service import Coordinator

    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8))
    try:
        service = AdminService(coord, {"key": Operator("v", "viewer")})
        reply = service.handle("key", AdminRequest("\x00" * 100_000, "{}", {}))
        assert not reply.ok and len(reply.error) < 400 and "unknown op" in reply.error
        assert json.loads(reply.result_json) is None
    finally:
        coord.close()


def test_a_heartbeat_with_megabyte_fields_is_stored_bounded(federation):
    """A heartbeat may be 1 MiB; the appliances table, which the fleet view reads
    whole, keeps a bounded row: a long reason and task cut, an outsized health report
    replaced by a note, at most 256 data set names."""
    from fedge.coordinator.service import DATASETS_MAX, HEALTH_JSON_MAX, HEARTBEAT_TEXT_MAX

    fed = federation(["a"])
    big = heartbeat("a", health_json=json.dumps({"x": "y" * 400_000}), reason="r" * 200_000,
                    current_task="t" * 100_000, datasets=[f"d{i}" * 20 for i in range(2000)])
    fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(big, sender="a")])
    assert [b for b in replies(fed.coord, "a") if isinstance(b, m.HeartbeatAck)]
    row = fed.coord.store.appliance("a")
    assert len(row.eligibility_reason) == HEARTBEAT_TEXT_MAX
    assert len(row.current_task) == HEARTBEAT_TEXT_MAX
    assert len(row.datasets) == DATASETS_MAX
    assert "not kept" in row.health["unparsable"] and str(HEALTH_JSON_MAX) in \
        row.health["unparsable"]
    assert len(json.dumps(row.to_dict(), default=str)) < 400_000


def test_an_admin_channel_that_fails_at_every_start_is_retried_ever_more_slowly(
        tmp_path, caplog, monkeypatch):
    """A port taken by another process fails every start: restarts back off (doubling
    up to a ceiling) and only the first failure logs its traceback."""
    from fedge.coordinator import process

    monkeypatch.setattr(process, "ADMIN_RESTART_S", 0.05)
    monkeypatch.setattr(process, "ADMIN_RESTART_MAX_S", 0.4)
    coord, cfg, _, _, _ = _served(tmp_path)
    started = []

    def start_admin(cfg, coord):
        started.append(1)

        async def channel():
            raise OSError(98, "Address already in use")

        return asyncio.ensure_future(channel())

    monkeypatch.setattr(process, "_start_admin", start_admin)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(process.serve(cfg, stop=stop, coordinator=coord))
        await asyncio.sleep(2.0)
        stop.set()
        return await served

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        assert asyncio.run(go()) == 0
    # every 0.05 s would be ~40 starts; 0.05, 0.1, 0.2, 0.4, 0.4, ... is under 10
    assert 3 <= len(started) <= 10, len(started)
    restarts = [r for r in caplog.records if "admin channel stopped" in r.getMessage()]
    assert restarts[0].exc_info and not any(r.exc_info for r in restarts[1:])
    assert "times in a row" in restarts[-1].getMessage()


def test_an_admin_channel_that_served_a_while_starts_a_new_run_of_failures(tmp_path):
    """After ADMIN_HEALTHY_S of service, the next failure restarts at the first step
    again, not after the doubled wait of the failures before it."""
    from fedge.coordinator import process

    async def go():
        running = asyncio.ensure_future(asyncio.Event().wait())
        watch = process._AdminWatch(started_at=time.monotonic() - process.ADMIN_HEALTHY_S,
                                    failures=4)
        assert process._watch_admin(None, None, running, watch) is running
        running.cancel()
        return watch.failures

    assert asyncio.run(go()) == 0
