"""A tampered-share accusation that comes after the accuser's masked input is a plain
refusal (L1 of the second malicious-site review, session 15).

An honest agent finds a tampered share when it opens the shares relayed to it, before
its masked input leaves (fedge.secagg.client, ``_open_share``). The insider m took
part honestly, then answered the UnmaskRequest with a TaskRefused reading like that
refusal, naming the honest site h. The round took it as an accusation: the attempt
failed after every honest masked input had left, h and m were left out of the job,
and every retry, pinned to the survivors asked to unmask, failed with it: the job
failed on one message, with h audited as accused. Now m is only lost as a survivor,
as with any refusal: the others' shares unmask the sum.
"""

from __future__ import annotations

from fedge.secagg.messages import ConsistencySignature, MaskedInput, UnmaskShares
from fedge.wire import codec
from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import audited, plan, run_job, tamper

FORGED = "TamperedShare: share from 'h' is malformed: bad"


def refuse_instead_of(kind, reason=FORGED):
    """m's hook: answer with a TaskRefused saying ``reason`` where it would send
    ``kind``; everything before goes as an honest agent sends it."""
    task = {}

    def hook(body):
        if hasattr(body, "task_id"):
            task["id"] = body.task_id
        if isinstance(body, kind):
            return m.TaskRefused(task_id=task["id"], task="train", reason=reason)
        return body
    return hook


def test_a_forged_accusation_at_unmasking_is_a_plain_refusal_and_the_round_commits(
        federation):
    fed = federation(["a", "b", "c", "h", "m"])
    tamper(fed, "m", refuse_instead_of(UnmaskShares))
    job = run_job(fed, plan(attempts=3))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    (first,) = st.rounds(job)  # one attempt
    assert first.status == "committed", first.reason
    assert first.survivors == ["a", "b", "c", "h", "m"]  # m's input was in, unmasked
    assert audited(fed, "share_accusation", job) == []


def test_a_forged_accusation_at_the_consistency_check_is_a_plain_refusal(federation):
    """After m's masked input was taken, its refusal at the consistency check accuses
    nobody either: m signs nothing, and the round goes on with its input in the sum."""
    fed = federation(["a", "b", "c", "h", "m"])
    tamper(fed, "m", refuse_instead_of(ConsistencySignature))
    job = run_job(fed, plan(attempts=3))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    assert audited(fed, "share_accusation", job) == []


def test_withholding_the_masked_input_then_accusing_at_unmasking_accuses_nobody(
        federation):
    """m keeps its masked input back (the input stage closes without it), then sends
    the forged refusal while the others unmask: the input can no longer be summed, so
    this is no accusation either, and the round commits over the other four."""
    fed = federation(["a", "b", "c", "h", "m"])
    held = {}

    async def m_sends(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        if hasattr(env.body, "task_id"):
            held["task"] = env.body.task_id
        if isinstance(env.body, MaskedInput):
            held["header"] = env.header  # withheld
            return
        fed.inbox.append(("m", [bytes(f) for f in frames]))
    fed.agents["m"].send_frames = m_sends
    a_sends = fed.agents["a"].send_frames

    async def a_then_m(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        if isinstance(env.body, UnmaskShares) and "header" in held:
            refusal = m.TaskRefused(task_id=held["task"], task="train", reason=FORGED)
            fed.inbox.append(("m", [bytes(f) for f in codec.encode(
                refusal, sender="m", job=held["header"].job, round=held["header"].round)]))
        await a_sends(frames)
    fed.agents["a"].send_frames = a_then_m
    job = run_job(fed, plan(attempts=3))
    st = fed.coord.store
    assert "header" in held
    assert st.job(job).status == "completed", st.job(job).error
    (first,) = st.rounds(job)
    assert first.survivors == ["a", "b", "c", "h"]
    assert audited(fed, "share_accusation", job) == []
