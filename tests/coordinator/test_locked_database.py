"""The coordinator while another process holds its database's write lock (an operator's
sqlite3 shell in BEGIN IMMEDIATE): a message that met the lock before it took effect is
handed back whole, to be handled again; one that needs no write is answered."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from fedge.coordinator.rounds import Phase
from fedge.coordinator.service import DatabaseLocked
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_hostile_messages import heartbeat
from tests.coordinator.test_service import PLAN as SERVICE_PLAN

PLAN = SERVICE_PLAN.replace("rounds = 3", "rounds = 1")  # round 1 stays in training


def frames(body, site, job="", rnd=0):
    return [bytes(f) for f in codec.encode(body, sender=site, job=job, round=rnd)]


@pytest.fixture
def training(federation):
    """A job's round 1 in training at a, b (the tasks not delivered), the database's
    write lock free; the coordinator's writes wait at most 0.2 s for it."""
    fed = federation(["a", "b"])
    fed.coord.store.busy_timeout_s = 0.2
    asyncio.run(fed.heartbeats())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))
    job = fed.coord.submit_job(PLAN, actor="test")
    fed.coord.tick()
    rnd = fed.coord.runner.round
    assert rnd.phase is Phase.TRAINING
    fed.coord.outbox.clear()
    return fed, job, rnd


def test_a_refusal_met_by_a_locked_database_is_handed_back_whole_and_handled_once_free(
        training):
    fed, job, rnd = training
    refusal = frames(m.TaskRefused(rnd.task_id, "train", "out of memory"), "a", job, 1)
    shell = sqlite3.connect(fed.coord.store.path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    with pytest.raises(DatabaseLocked) as locked:
        fed.coord.handle_frames("a", refusal)
    assert (locked.value.site, locked.value.kind) == ("a", "task_refused")
    assert rnd.refused == {}  # nothing happened
    # a heartbeat needs no write it cannot do without: it is answered all the same
    fed.coord.handle_frames("b", frames(heartbeat("b"), "b"))
    assert [type(o.body) for o in fed.coord.outbox] == [m.HeartbeatAck]
    shell.execute("ROLLBACK")
    fed.coord.handle_frames("a", refusal)  # the same frames: not a replay
    assert rnd.refused == {"a": "out of memory"}
    assert not [o for o in fed.coord.outbox if isinstance(o.body, m.Rejected)]
    audited = fed.coord.store.audit_log(action="task_refused")
    assert len(audited) == 1 and "out of memory" in audited[0]["detail"]


def test_a_message_that_met_the_lock_after_taking_effect_is_not_handed_back(training,
                                                                           caplog):
    """Once the round has acted on a message, handing it back would apply it twice: a
    lock met after that costs only the record, and the log names the site, the message
    type and the database file."""
    fed, job, rnd = training
    done = frames(m.TrainDone(rnd.task_id, 10, {"loss": 1.0}), "a", job, 1)
    receive = rnd.receive

    def acts_then_cannot_write(sender, body, now):
        receive(sender, body, now)
        raise sqlite3.OperationalError("database is locked")
    rnd.receive = acts_then_cannot_write
    fed.coord.handle_frames("a", done)  # no DatabaseLocked
    assert "a" in rnd.trained
    assert (f"train_done from a was handled, but a record of it was not written: database "
            f"{fed.coord.store.path} is locked") in caplog.text
    rnd.receive = receive
    fed.coord.handle_frames("a", done)  # the same frames again are a replay
    (rejected,) = [o.body for o in fed.coord.outbox if isinstance(o.body, m.Rejected)]
    assert rejected.reason.startswith("message id")


def test_a_hold_moves_the_silence_of_sites_not_heard_since_and_no_one_past_now(federation):
    """After messages were held for 20 s: a site last heard before the hold gets those
    20 s back on its heartbeat timeout; the site whose held message was just handled
    is not moved into the future (it would outlive its death by the hold's length)."""
    fed = federation(["a", "b"])
    asyncio.run(fed.heartbeats())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))
    conns = fed.coord.conns
    now = fed.coord.clock()
    conns["a"].last_seen = now - 30  # heard before the hold began
    conns["b"].last_seen = now       # its held message handled just now
    fed.coord.not_listening(20.0)
    assert conns["a"].last_seen == pytest.approx(now - 10, abs=1.0)
    assert conns["b"].last_seen <= fed.coord.clock()


def test_an_update_outcome_met_by_a_locked_database_is_handed_back_and_audited_once(
        training):
    """The admin channel records an agent's install outcome, then advances its
    roll-out: the record met the lock first, so the message is handed back whole, and
    the outcome is audited once the lock is free (it was logged and lost)."""
    from fedge.coordinator.admin import AdminService
    from fedge.update.messages import UpdateOutcome

    fed, _, _ = training
    admin = AdminService(fed.coord, {})
    fed.coord.on_update_outcome = admin.on_outcome
    outcome = frames(UpdateOutcome("r1", "model/risk/2/m.onnx", True, False, "installed"), "a")
    shell = sqlite3.connect(fed.coord.store.path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    with pytest.raises(DatabaseLocked) as locked:
        fed.coord.handle_frames("a", outcome)
    assert (locked.value.site, locked.value.kind) == ("a", "update.outcome")
    shell.execute("ROLLBACK")
    assert fed.coord.store.audit_log(action="update.outcome") == []
    fed.coord.handle_frames("a", outcome)  # the same frames: not a replay
    (row,) = fed.coord.store.audit_log(action="update.outcome")
    assert "model/risk/2/m.onnx" in str(row)
    assert not [o for o in fed.coord.outbox if isinstance(o.body, m.Rejected)]
