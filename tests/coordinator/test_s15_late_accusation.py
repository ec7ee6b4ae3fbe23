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

from fedge.secagg.messages import ConsistencySignature, UnmaskShares
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
