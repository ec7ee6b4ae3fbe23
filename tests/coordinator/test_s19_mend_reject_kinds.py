"""A site cannot mint a new audit key per rejected message by the text it sends
(session 19, mend of review r5's first finding).

The coordinator audits the round's rejections (secure aggregation's discards among
them) the first time per site, job, round and kind of rejection, then counts them
(AuditThrottle, which takes at most 60 new keys a minute, the rest counted together).
The kind was the reason less its words holding a digit or a quote, so a spoofed
client_id of several words ('x aaa y') kept its middle words: each such message was a
new kind, 60 a minute were audited in full, and every other site's first rejection
that minute was only counted. The kind is now the round's fixed code (Round.rejected,
ServerSession's Discard.kind). Real coordinator, agents, codec and SecAgg+
(tests/coordinator/conftest.py's InProcFederation).
"""

from __future__ import annotations

import dataclasses
import itertools
import string

import numpy as np

from fedge.coordinator.rounds import REJECTION_KINDS, PlainAggregation, Refusal
from fedge.secagg.messages import MaskedInput
from fedge.secagg.server import DISCARD_KINDS
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import DIM, audited, plan, run_job

SITES = {"a": 100, "b": 100, "c": 100, "m": 100}
SPOOFS = 200
HEAD = "secure aggregation discarded MaskedInput from "


def test_spoofed_client_ids_of_many_words_are_one_kind_and_leave_room_for_others(
        federation):
    """"m" sends 200 copies of its masked input, each naming another client_id of
    three words, then its own; "a" sends its own, then one copy naming "b", which
    reaches the coordinator after m's 200. m's are audited once in full and counted
    (the count audited a minute on); a's first is audited in full."""
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)
    words = ["".join(w) for w in itertools.product(string.ascii_lowercase, repeat=3)]
    held: list[tuple[str, object, str, int]] = []  # a's spoof, until m's have gone
    flooded: list[bool] = []

    def hook(site, replace):
        async def send_frames(frames):
            env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
            bodies = replace(env.body) if isinstance(env.body, MaskedInput) else [env.body]
            for body in bodies:
                item = (site, body, env.header.job, env.header.round)
                if site == "a" and body is not bodies[0] and not flooded:
                    held.append(item)
                    continue
                _send(fed, *item)
            if site == "m" and isinstance(env.body, MaskedInput):
                flooded.append(True)
                for item in held:
                    _send(fed, *item)
        fed.agents[site].send_frames = send_frames

    hook("m", lambda b: [dataclasses.replace(b, client_id=f"x {w} y")
                         for w in words[:SPOOFS]] + [b])
    hook("a", lambda b: [b, dataclasses.replace(b, client_id="b")])
    job = run_job(fed, plan(min_clients=2))
    store = fed.coord.store
    assert store.job(job).status == "completed", store.job(job)
    assert store.rounds(job)[0].survivors == ["a", "b", "c", "m"]
    fed.clock.t += 61.0  # a minute on: the coordinator's tick audits the counts
    fed.coord.tick()
    rows = audited(fed, "rejected_message", job)
    by_m = [r for r in store.audit_log(action="rejected_message", job=job)
            if r["actor"] == "m"]
    full_m = [r for r in rows if "repeated" not in r and r["reason"].startswith(HEAD + "m")]
    assert [r["reason"] for r in full_m] == [
        f"{HEAD}m: its client_id 'x aaa y' is not the sender 'm'"], len(full_m)
    assert sum(r.get("repeated", 0) for r in rows
               if r["reason"].startswith(HEAD + "m")) == SPOOFS - 1
    assert len(by_m) == 2  # the first, and one row counting the rest
    assert [r["reason"] for r in rows if r["reason"].startswith(HEAD + "a")] == [
        f"{HEAD}a: its client_id 'b' is not the sender 'a'"]
    assert not [r for r in rows if "overflow" in r]


def _send(fed, site, body, job, round_):
    fed.inbox.append((site, [bytes(f) for f in codec.encode(
        body, sender=site, job=job, round=round_)]))


def test_every_rejection_of_a_round_has_a_fixed_kind():
    """The plain sum's refusal comes as a Refusal with its kind; the kinds are codes."""
    agg = PlainAggregation(["a", "b"], 4, 10.0)
    agg.start(0.0)
    [(site, refusal)] = agg.receive("a", m.PlainUpdate("t", np.zeros(3, np.float32)), 0.0)
    assert site == "a" and isinstance(refusal, Refusal) and refusal.kind == "wrong_shape"
    for kind in (*REJECTION_KINDS, *DISCARD_KINDS):
        assert kind.isidentifier() and kind.islower()


def _from(fed, site: str, body: object, job: str, round_: int = 1) -> None:
    fed.coord.handle_frames(site, [bytes(f) for f in codec.encode(
        body, sender=site, job=job, round=round_)])


def test_jobs_a_site_names_do_not_take_the_keys_of_other_sites(federation):
    """Outside a round, "m" sends 200 evaluation results (late_message) and 200 plain
    updates (stale_message), each naming a new job that never ran, with a colon in it
    (a stale message's kind was the reason's text up to its first colon, which quotes
    the job). Each kind of m's is audited once in full, then counted; "a"'s first
    stale message that minute is still audited in full."""
    import asyncio

    fed = federation(["a", "b", "m"], dim=8)
    asyncio.run(fed.heartbeats())
    for i in range(SPOOFS):
        _from(fed, "m", m.EvalResult(task_id="x", n_examples=1, metrics={}), f"j{i}:x")
        _from(fed, "m", m.PlainUpdate("x", np.zeros(3, np.float32)), f"j{i}:x", i + 1)
    _from(fed, "a", m.PlainUpdate("x", np.zeros(3, np.float32)), "job-a")
    rows = fed.coord.store.audit_log()
    said = [(r["actor"], r["action"]) for r in rows
            if r["action"] in ("late_message", "stale_message")]
    assert said == [("m", "late_message"), ("m", "stale_message"),
                    ("a", "stale_message")], len(said)
    [a_row] = [r for r in rows if r["actor"] == "a" and r["action"] == "stale_message"]
    assert "job 'job-a' round 1" in a_row["detail"]
    fed.clock.t += 61.0
    fed.coord.tick()
    counted = [r for r in fed.coord.store.audit_log() if r["actor"] == "m"
               and r["action"] in ("late_message", "stale_message")
               and "repeated" in r["detail"]]
    assert len(counted) == 2, counted
