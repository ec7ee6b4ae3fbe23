"""The coordinator on a failing disk: a round it cannot write is kept and committed
once there is room, never trained again and never the end of the process.

The faults are real: a directory where the checkpoint goes (its atomic rename fails
with an OSError even as root), and SQLite itself out of room (``PRAGMA
max_page_count`` at the database's size, then its free space filled: SQLITE_FULL,
what a full disk gives).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3

import numpy as np

from fedge import __version__
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.rounds import Phase
from fedge.wire import codec
from fedge.wire import messages as m

PLAN = """
[job]
dataset = "synthetic"
rounds = 3
min_clients = 2
[model]
name = "linear"
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = false
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 5
eval_s = 5
"""


def rounds_started(coord, job):
    return [json.loads(a["detail"])["round"] for a in coord.store.audit_log(
        action="round_started") if json.loads(a["detail"])["job"] == job]


def committed(coord, job):
    return [(r.round, r.attempt, r.status) for r in coord.store.rounds(job)]


def fill_database(store):
    """SQLite may not grow (max_page_count = its size) and its pages are filled, as on
    a full disk; returns the function that gives it room again."""
    conn = store._conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    for size in (4000, 400, 40, 0):
        try:
            while True:
                store.audit("test", "filler", "x" * size)
        except sqlite3.OperationalError as exc:
            assert exc.sqlite_errorname == "SQLITE_FULL"
    return lambda: conn.execute("PRAGMA max_page_count = 1000000")


def test_a_round_whose_checkpoint_cannot_be_written_is_kept_and_committed_once_later(
        federation, caplog):
    """Round 2's checkpoint cannot be written: the coordinator neither raises nor
    trains round 2 again; it logs and audits the failure, retries every FINISH_RETRY_S,
    and commits round 2 exactly once (attempt 1, the weights it had) when it can."""
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="test")
    blocker = ck.round_path(fed.coord.state_dir, job, 2)
    blocker.mkdir(parents=True)
    (blocker / "blocker").write_text("")

    def failures():
        return [json.loads(a["detail"]) for a in fed.coord.store.audit_log(
            action="round_commit_failed")]

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: len(failures()) >= 3, advance=1.0)

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        asyncio.run(go())
    j = fed.coord.store.job(job)
    assert (j.status, j.committed_round) == ("running", 1)
    assert rounds_started(fed.coord, job) == [1, 2]
    rnd = fed.coord.runner.round
    assert rnd.round == 2 and rnd.phase is Phase.DONE
    done_weights = rnd.new_weights.copy()
    assert [f["round"] for f in failures()] == [2, 2, 2]
    assert "IsADirectoryError" in failures()[0]["error"] and str(blocker) in failures()[0][
        "error"]
    status = fed.coord.job_status(job)
    assert status["commit_error"].startswith(f"cannot write {blocker}: IsADirectoryError")
    assert f"job {job} round 2 not committed (retried in 10 s): cannot write {blocker}" \
        in caplog.text

    shutil.rmtree(blocker)  # room again

    async def again():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed",
                       advance=1.0)
    asyncio.run(again())
    assert committed(fed.coord, job) == [(1, 1, "committed"), (2, 1, "committed"),
                                         (3, 1, "committed")]
    assert rounds_started(fed.coord, job) == [1, 2, 3]
    # round 2's checkpoint is gone once round 3 is committed (checkpoint.prune_rounds);
    # its row names the weights it committed
    assert fed.coord.store.rounds(job)[1].model_digest == ck.model_digest(done_weights)
    assert "commit_error" not in fed.coord.job_status(job)


def test_a_full_database_at_a_round_commit_neither_raises_nor_loses_the_round(
        federation, caplog):
    """SQLite is full while round 2 runs: its commit, the heartbeats' records and the
    audit rows all fail with SQLITE_FULL. handle_frames and tick raise nothing, round 2
    is kept, and once SQLite has room it is committed once and the job completes."""
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="test")

    def in_round_2():
        r = fed.coord.runner
        return r is not None and r.round is not None and r.round.round == 2 \
            and r.round.phase is Phase.TRAINING

    async def go():
        await fed.heartbeats()
        await fed.pump(until=in_round_2)

    asyncio.run(go())
    give_room = fill_database(fed.coord.store)

    async def full():
        await fed.pump(until=lambda: fed.coord.runner.commit_error != "", advance=1.0)
        t = fed.clock.t
        await fed.pump(until=lambda: fed.clock.t > t + 25, advance=1.0)

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        asyncio.run(full())
        # a heartbeat with news to record (its health grew): SQLITE_FULL, answered anyway
        fed.clock.t += 11  # past the last "not written" line, which comes once per 10 s
        fed.coord.outbox.clear()
        hb = m.Heartbeat(site="a", version=__version__, eligible=True, reason="",
                         health_json=json.dumps({"note": "x" * 20000}),
                         datasets=["synthetic"], current_task="")
        fed.coord.handle_frames("a", [bytes(f) for f in codec.encode(hb, sender="a")])
    assert type(fed.coord.outbox[0].body) is m.HeartbeatAck
    assert fed.coord.store.job(job).committed_round == 1
    assert fed.coord.runner.round.round == 2 and fed.coord.runner.round.phase is Phase.DONE
    assert "database or disk is full" in fed.coord.runner.commit_error
    assert str(fed.coord.store.path) in fed.coord.runner.commit_error
    assert caplog.text.count(f"job {job} round 2 not committed") >= 2  # retried
    assert "heartbeat of a not written to the database" in caplog.text  # logged, not
    assert "internal error" not in caplog.text                           # a traceback

    give_room()

    async def again():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status == "completed",
                       advance=1.0)
    asyncio.run(again())
    assert committed(fed.coord, job) == [(1, 1, "committed"), (2, 1, "committed"),
                                         (3, 1, "committed")]
    assert rounds_started(fed.coord, job) == [1, 2, 3]


def test_the_coordinator_process_survives_ticks_that_cannot_write(tmp_path, caplog):
    """The real serve loop, its database full as a queued job is due to start: every
    tick's write fails with SQLITE_FULL, one line says so (not one per tick), the
    loop goes on, and the job starts once SQLite has room."""
    from fedge.coordinator.config import CoordinatorConfig
    from fedge.coordinator.process import serve
    from fedge.coordinator.service import Coordinator
    from fedge.transport import CurveKeyPair

    coord = Coordinator(tmp_path / "coord", initial_weights=lambda plan: np.zeros(8, np.float32))
    job = coord.submit_job(PLAN, actor="test")
    ck.save_checkpoint(ck.round_path(coord.state_dir, job, 0),
                       ck.Checkpoint(weights=np.zeros(8, np.float32), round=0, plan=PLAN))
    give_room = fill_database(coord.store)
    keys = CurveKeyPair.generate()
    cfg = CoordinatorConfig(coord.state_dir, "tcp://127.0.0.1:0", keys.public, keys.secret,
                            b"", b"", tick_s=0.02)

    async def go():
        stop = asyncio.Event()
        served = asyncio.create_task(serve(cfg, stop=stop, coordinator=coord))
        await asyncio.sleep(1.5)  # some 75 ticks, each failing
        assert not served.done()
        status_while_full = coord.store.job(job).status
        give_room()
        for _ in range(250):
            if coord.store.job(job).status == "running" or served.done():
                break
            await asyncio.sleep(0.02)
        status_after = coord.store.job(job).status
        stop.set()
        return await served, status_while_full, status_after

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        code, while_full, after = asyncio.run(go())
    assert (code, while_full, after) == (0, "queued", "running")
    failed = [r.getMessage() for r in caplog.records if "tick failed" in r.getMessage()]
    assert len(failed) == 1 and "database or disk is full" in failed[0]


def restarted(fed):
    """A new coordinator process on the same state directory (the old one is gone)."""
    from fedge.coordinator.service import Coordinator

    old = fed.coord
    fed.coord = Coordinator(old.state_dir, roster=old.roster,
                            roster_public_key=old.roster_public_key, heartbeat_timeout_s=30.0,
                            initial_weights=old.initial_weights, clock=fed.clock)
    old.close()
    return fed.coord


def test_a_checkpoint_unreadable_at_restart_keeps_the_job_and_resumes_once_restored(
        federation, caplog):
    """The last committed round's checkpoint is truncated when the coordinator
    restarts: the job is not failed for good. The error is logged naming the file and
    audited, once; the job stays running at its round, is retried, and resumes (no
    round lost, none trained twice) once the file is restored."""
    fed = federation(["a", "b"])
    job = fed.coord.submit_job(PLAN, actor="test")

    async def go():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).committed_round == 2)
    asyncio.run(go())
    path = ck.round_path(fed.coord.state_dir, job, 2)
    good = path.read_bytes()
    path.write_bytes(good[:500])
    coord = restarted(fed)
    t0 = fed.clock.t

    async def broken():
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.clock.t > t0 + 35, advance=1.0)  # 3 retries

    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        asyncio.run(broken())
    j = coord.store.job(job)
    assert (j.status, j.committed_round, j.error) == ("running", 2, "")
    assert coord.runner is None and rounds_started(coord, job) == [1, 2]
    logged = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert len(logged) == 1 and str(path) in logged[0] and "from round 2" in logged[0]
    [audited] = coord.store.audit_log(action="job_resume_failed")
    assert str(path) in json.loads(audited["detail"])["error"]
    assert str(path) in coord.job_status(job)["resume_error"]
    assert coord.store.audit_log(action="job_failed") == []

    path.write_bytes(good)  # restored from a backup

    async def again():
        await fed.heartbeats()
        await fed.pump(until=lambda: coord.store.job(job).status == "completed", advance=1.0)
    asyncio.run(again())
    assert committed(coord, job) == [(1, 1, "committed"), (2, 1, "committed"),
                                     (3, 1, "committed")]
    assert rounds_started(coord, job) == [1, 2, 3]
    assert "resume_error" not in coord.job_status(job)
