"""A site that refuses the aggregation because a peer's share to it was tampered with
(TamperedShare) fails the attempt: the round never goes on without the accuser, and
both accuser and accused sit out the job's later rounds (fedge.coordinator.rounds,
``Round._accusation``; fedge.coordinator.service, ``JobRunner.excluded``).

Before, in a three-site cohort, the tamperer m had the victim b dropped, summed over
{a, m}, cancelled its own input and read a's exact update from the next model.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from fedge.secagg.messages import EncryptedShares, MaskedInput, UnmaskRequest
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import (
    DIM,
    audited,
    plan,
    run_job,
    steps_per_unit,
    tamper,
)


def corrupt_share_to(victim, cancel_own_input=None):
    """m's hook: flip one byte of the share ciphertext it sends ``victim``; with
    ``cancel_own_input`` (m's input vector, float), also take its own quantised input
    off its masked input, so a sum over {a, m} is a's update alone."""
    def hook(body):
        if isinstance(body, EncryptedShares):
            ct = dict(body.ciphertexts)
            blob = bytearray(ct[victim])
            blob[-1] ^= 1
            ct[victim] = bytes(blob)
            return dataclasses.replace(body, ciphertexts=ct)
        if isinstance(body, MaskedInput) and cancel_own_input is not None:
            off = -np.round(cancel_own_input["x"] * steps_per_unit(3)).astype(np.int64)
            masked = (body.masked.astype(np.int64) + off) % (1 << 32)
            return dataclasses.replace(body, masked=masked.astype(np.uint32))
        return body
    return hook


def test_tampering_with_one_share_isolates_no_update(federation):
    fed = federation(["a", "b", "m"], dim=DIM, n_examples={"a": 70, "b": 100, "m": 100})
    mal = fed.agents["m"]
    mine = {}
    vector = mal.input_vector

    def spy(*args, **kw):
        v = vector(*args, **kw)
        mine["x"] = v.astype(np.float64)
        return v
    mal.input_vector = spy
    evals = []
    handle = mal.handle_frames

    async def watch(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        if isinstance(env.body, m.EvalTask):
            evals.append(np.array(env.body.weights))
        return await handle(frames)
    mal.handle_frames = watch
    tamper(fed, "m", corrupt_share_to("b", cancel_own_input=mine))
    job = run_job(fed, plan(attempts=2))
    st = fed.coord.store
    assert st.job(job).status == "failed"
    assert evals == []  # no model was ever made from a sum without b
    first, second = st.rounds(job)
    assert first.status == "failed" and first.survivors == []
    assert "b refused the aggregation: a share m sent it was tampered with" in first.reason
    assert first.dropped_reasons["m"] == "accused by b of sending it a tampered share"
    # the next attempt is without both: only a is left, below min_clients 2
    assert "1 candidate site(s) (a)" in second.reason, second.reason
    assert "said a share m sent it in round 1 was tampered with" in second.reason
    (accusation,) = audited(fed, "share_accusation", job)
    assert (accusation["site"], accusation["accused"], accusation["round"]) == ("b", "m", 1)


def test_accused_and_accuser_sit_out_the_job_even_across_a_restart(federation):
    fed = federation(["a", "b", "c", "d", "m"], dim=DIM)
    tamper(fed, "m", corrupt_share_to("b"))
    st = fed.coord.store

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=2, attempts=3), actor="test")
        await fed.pump_alive(until=lambda: len(st.rounds(job)) >= 1, max_steps=2000)
        return job
    job = asyncio.run(go())
    (failed,) = st.rounds(job)
    assert failed.status == "failed" and "tampered" in failed.reason
    coord = fed.restart()  # the exclusion is rebuilt from the audit log
    job_done = lambda: coord.store.job(job).status in ("completed", "failed")  # noqa: E731

    async def resume():
        await fed.heartbeats()
        await fed.pump_alive(until=job_done, max_steps=4000)
    asyncio.run(resume())
    assert coord.store.job(job).status == "completed", coord.store.job(job)
    rounds = coord.store.rounds(job)
    # the first attempt after the restart is already without b and m
    assert [(r.round, r.status) for r in rounds] == [
        (1, "failed"), (1, "committed"), (2, "committed")]
    committed = rounds[1:]
    for r in committed:
        assert r.cohort == ["a", "c", "d"]
        for site in ("b", "m"):
            assert "said a share m sent it in round 1 was tampered with" in r.left_out[site]


def test_a_pinned_round_stays_pinned_when_its_survivors_accuse_each_other(federation):
    """Round 1's unmasking was asked over S = {a, b, m} by an earlier attempt: the
    accusation fails the attempt, and no later attempt sums over any set but S, which
    now holds two sites left out: the job fails rather than unmask another set."""
    fed = federation(["a", "b", "m", "x"], dim=DIM)
    tamper(fed, "m", corrupt_share_to("b"))
    st = fed.coord.store
    unmasks = []

    def watch(site, body):  # every unmask request the coordinator sends (none dies)
        if isinstance(body, UnmaskRequest):
            unmasks.append(sorted(body.survivors))
        return False
    fed.kill_hook = watch

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(attempts=2), actor="test")
        st.record_unmask_set(job, 1, ["a", "b", "m"])
        await fed.pump_alive(until=lambda: st.job(job).status in ("completed", "failed"),
                             max_steps=4000)
        return job
    job = asyncio.run(go())
    assert st.job(job).status == "failed"
    first, second = st.rounds(job)
    assert first.cohort == ["a", "b", "m"] and "tampered" in first.reason
    assert "already unmasked over ['a', 'b', 'm']" in second.reason, second.reason
    assert unmasks == []
