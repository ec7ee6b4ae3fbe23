"""A round whose unmasking was asked for is only ever summed again over the same sites,
and refusals that leave an aggregation stuck end it at once (in memory, real agents).

Agents log each reveal and refuse to unmask one update over a second survivor set
(fedge.agent.guard.RevealLog): a coordinator that crashed after asking, or an attempt
that failed after asking, must come back to exactly that set."""

from __future__ import annotations

import asyncio

import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.rounds import Phase
from fedge.secagg.errors import UpdateAlreadySummed
from fedge.secagg.messages import UnmaskRequest
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import run

PLAN = """
[job]
dataset = "synthetic"
rounds = {rounds}
min_clients = 2
seed = 11
max_failed_attempts = {attempts}
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedadam"
[secagg]
enabled = true
alpha = 0.1
delta = 0.25
clip = 1.0
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = {stage_s}
eval_s = 3
"""
STAGE_S = 3.0


def plan(rounds=2, attempts=3, stage_s=STAGE_S):
    return PLAN.format(rounds=rounds, attempts=attempts, stage_s=stage_s)


def in_phase(fed, rnd, phase):
    def check():
        r = fed.coord.runner
        return r is not None and r.round is not None and r.round.round == rnd \
            and r.round.phase is phase
    return check



def record_sends(fed):
    """Every message the coordinator sends to a live site, with the (fake) time."""
    sent: list[tuple[float, str, object]] = []

    def hook(site, body):
        sent.append((fed.clock.t, site, body))
        return False
    fed.kill_hook = hook
    return sent


def final_weights(fed, job):
    return ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job)).weights.tobytes()


def history(fed, job):
    return [(r.round, r.status, r.cohort, r.survivors) for r in fed.coord.store.rounds(job)]


def test_a_round_unmasked_before_a_crash_waits_for_all_its_survivors_and_names_the_missing(
        federation):
    """Round 2 is unmasked over a, b, c, d, then the coordinator dies before committing
    it; it comes back with d down. a, b, c would make min_clients (2), but summing them
    would be a second sum of their updates over another set: the retry waits for d,
    asks nobody anything, and fails at the cohort deadline naming d and why. With d
    back, the next attempt sums over a, b, c, d again and the job ends with the model
    of an uninterrupted run, bit for bit."""
    sites = ["a", "b", "c", "d"]
    reference = federation(sites)
    ref_job = run(reference, plan(rounds=3))
    fed = federation(sites)

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=3), actor="test")
        await fed.pump(until=in_phase(fed, 2, Phase.EVALUATING))  # every site revealed
        fed.restart()
        fed.dead.add("d")
        sent = record_sends(fed)
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.runner is not None
                       and fed.coord.runner.round is not None
                       and fed.coord.runner.round.waiting_for.endswith("waiting for d "
                                                                       "(not connected)"))
        waiting = fed.coord.job_status(job)["cohort_wait"]["summary"]
        await fed.pump(until=lambda: fed.coord.store.rounds(job)[-1].status == "failed")
        asked = [(s, type(b).__name__) for _, s, b in sent
                 if not isinstance(b, m.HeartbeatAck | m.RosterUpdate)]
        fed.dead.discard("d")
        fed.kill_hook = None
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status in ("completed",
                                                                           "failed"))
        return job, waiting, asked

    job, waiting, asked = asyncio.run(go())
    st = fed.coord.store
    assert asked == [], "a round pinned to a, b, c, d asked a, b, c alone"
    assert "waiting for d (not connected)" in waiting
    failed = st.rounds(job)[2]
    assert "round 2's update was already unmasked over ['a', 'b', 'c', 'd']" in failed.reason
    assert "a sum over another set would reveal a difference" in failed.reason
    assert "waiting for d (not connected)" in failed.reason
    assert st.job(job).status == "completed", st.job(job).error
    # the attempt the crash cut short is recorded as interrupted (review s16 L1), with
    # the survivors of its sum, formed and revealed before the crash (diffreview2 L2)
    assert history(fed, job) == [(1, "committed", sites, sites),
                                 (2, "interrupted", sites, sites),
                                 (2, "failed", [], []), (2, "committed", sites, sites),
                                 (3, "committed", sites, sites)]
    assert final_weights(fed, job) == final_weights(reference, ref_job)
    # the survivor set was recorded before the unmask requests left, and is dropped
    # when its round commits: it guards nothing once the round cannot run again
    assert [a for a in st.audit_log(action="unmask_set_recorded") if '"round": 2' in a["detail"]]
    assert st.unmask_set(job, 2) is None


def test_a_retry_of_an_unmasked_round_never_starts_with_a_superset_either(federation):
    """e connects after round 2 was unmasked over a, b, c: summing a, b, c, e would hand
    the coordinator e's update as the difference. The retry runs over a, b, c; e joins
    from round 3."""
    fed = federation(["a", "b", "c", "e"])
    fed.dead.add("e")

    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(plan(rounds=3), actor="test")
        await fed.pump(until=in_phase(fed, 2, Phase.EVALUATING))
        fed.restart()
        fed.dead.discard("e")
        await fed.heartbeats()
        await fed.pump(until=lambda: fed.coord.store.job(job).status in ("completed",
                                                                           "failed"))
        return job

    job = asyncio.run(go())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error
    abc, abce = ["a", "b", "c"], ["a", "b", "c", "e"]
    assert history(fed, job) == [(1, "committed", abc, abc), (2, "interrupted", abc, abc),
                                 (2, "committed", abc, abc), (3, "committed", abce, abce)]


def test_refusals_that_leave_the_unmasking_impossible_fail_the_attempt_at_once(federation):
    """Two of three sites refuse to reveal (their log holds the update over another
    set); t = 2, so the unmasking cannot complete: the attempt fails as the second
    refusal arrives, naming both, not when the stage deadline passes."""
    fed = federation(["a", "b", "c"])
    for site in ("a", "b"):
        def refuse(digest, survivors, update=None, site=site, **_):
            raise UpdateAlreadySummed(f"{site}'s update was summed over another set")
        fed.agents[site].reveal_log.check_and_record = refuse
    sent = record_sends(fed)
    job = run(fed, plan(rounds=1, attempts=1))
    st = fed.coord.store
    assert st.job(job).status == "failed"
    (attempt,) = st.rounds(job)
    asked_at = min(t for t, _, b in sent if isinstance(b, UnmaskRequest))
    assert attempt.ended_at - asked_at < STAGE_S, (attempt.ended_at - asked_at, attempt.reason)
    assert "unmasking cannot complete: 2 site(s) dropped out of it (a, b)" in attempt.reason
    assert "a's update was summed over another set" in attempt.reason
    assert "b's update was summed over another set" in attempt.reason


def test_a_refusal_that_leaves_enough_shares_does_not_end_the_unmasking(federation):
    """d refuses to reveal; a, b, c hold t = 3 shares of every secret: the round sums all
    four inputs (d's masked input arrived; its self mask is removed without it), the
    same model as a round where d revealed."""
    sites = ["a", "b", "c", "d"]
    reference = federation(sites)
    ref_job = run(reference, plan(rounds=1))
    fed = federation(sites)

    def refuse(digest, survivors, update=None, **_):
        raise UpdateAlreadySummed("d's update was summed over another set")
    fed.agents["d"].reveal_log.check_and_record = refuse
    job = run(fed, plan(rounds=1))
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job).error
    assert history(fed, job) == [(1, "committed", sites, sites)]
    assert final_weights(fed, job) == final_weights(reference, ref_job)


def test_a_site_refusing_its_part_is_not_waited_for_until_the_stage_deadline(federation):
    """d refuses the aggregation (below its min_cohort) as it begins: once a, b, c have
    advertised their keys nothing is left to wait for, so the stage closes then and the
    round goes on without d, instead of after secagg_stage_s. d's floor rises only once
    it is invited: one its heartbeats report leaves it out of the cohort first
    (tests/coordinator/test_s15_site_floor_federation.py)."""
    reference = federation(["a", "b", "c"])
    ref_job = run(reference, plan(rounds=1))
    fed = federation(["a", "b", "c", "d"])
    sent = record_sends(fed)
    record = fed.kill_hook

    def raise_floor_of_d(site, body):
        if site == "d" and isinstance(body, m.TrainTask):
            fed.agents["d"].policy = PrivacyPolicy(require_secure_aggregation=False,
                                                   min_cohort=10)
        return record(site, body)
    fed.kill_hook = raise_floor_of_d
    job = run(fed, plan(rounds=1))
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job).error
    abc = ["a", "b", "c"]
    assert history(fed, job) == [(1, "committed", ["a", "b", "c", "d"], abc)]
    began = min(t for t, _, b in sent if isinstance(b, m.AggregateBegin))
    evaluated = min(t for t, _, b in sent if isinstance(b, m.EvalTask))
    assert evaluated - began < STAGE_S, evaluated - began
    # the same three inputs, quantised for a cohort of 4 here and of 3 there
    np.testing.assert_allclose(
        np.frombuffer(final_weights(fed, job), np.float32),
        np.frombuffer(final_weights(reference, ref_job), np.float32), atol=1e-6)


RESEED = ("resubmit the plan with another job.seed (or with none: a fresh one is drawn)")


def test_a_seeded_plan_re_run_over_other_sites_fails_with_the_remedy_first(federation):
    """The same seeded plan, run again without d: each site's update is the one it
    already had summed over a, b, c, d, so the sites refuse to reveal over a, b, c
    (the difference would be d's). The failure the owner reads starts with what to
    do about it, not with the protocol's account of the unmasking."""
    fed = federation(["a", "b", "c", "d"])
    first = run(fed, plan(rounds=1))
    assert fed.coord.store.job(first).status == "completed"
    fed.dead.add("d")
    again = run(fed, plan(rounds=1, attempts=1))
    st = fed.coord.store
    job = st.job(again)
    assert job.status == "failed"
    (attempt,) = st.rounds(again)
    assert attempt.reason.startswith(RESEED), attempt.reason
    assert "UpdateAlreadySummed" in attempt.reason  # the sites' own words follow
    assert job.error.startswith(f"round 1 failed 1 times; last: {RESEED}"), job.error
