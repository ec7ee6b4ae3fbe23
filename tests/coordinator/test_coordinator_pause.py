"""A coordinator that did not run for a while (paused, swapped out, a VM frozen, held
up by a locked database) takes the answers that waited for it: sites that answered on
time are not dropped for its deafness, and no round is run twice (which would charge
DP sites twice for it). In memory, real agents and SecAgg+."""

from __future__ import annotations

import pytest

from fedge.wire import codec
from tests.coordinator.test_federation_inproc import run
from tests.coordinator.test_unmask_retry import STAGE_S, history, plan


def pause_before(fed, message_type: str, seconds: float) -> list[str]:
    """The coordinator stops for ``seconds`` just before it handles the first
    ``message_type`` of round 1 (every site's answer already waiting); returns the
    types it then handled, in order."""
    handled: list[str] = []
    handle = fed.coord.handle_frames

    def paused_handle(site, frames):
        kind = codec.decode(frames, max_bytes=1 << 26).header.type
        if kind == message_type and message_type not in handled:
            fed.clock.t += seconds
        handled.append(kind)
        return handle(site, frames)

    fed.coord.handle_frames = paused_handle
    return handled


@pytest.mark.parametrize("stage", ["secagg.masked_input", "secagg.unmask_shares",
                                   "secagg.encrypted_shares"])
def test_answers_that_waited_for_a_paused_coordinator_are_taken(federation, stage):
    sites = ["a", "b", "c"]
    fed = federation(sites)
    handled = pause_before(fed, stage, 3 * STAGE_S)
    job = run(fed, plan(rounds=2))
    st = fed.coord.store
    assert stage in handled
    assert st.job(job).status == "completed", st.job(job).error
    assert history(fed, job) == [(1, "committed", sites, sites), (2, "committed", sites, sites)]


def test_a_pause_the_loop_notices_moves_the_deadlines_before_it_ticks(federation):
    """The pause is noticed by the process loop (``_deaf_for``: a wait that overran)
    before its next tick, with every masked input still unread: the stage's deadline
    moves by the pause, so the tick does not close the stage on answers not yet read.
    Without the move the attempt fails (TooFewInputs) and round 1 is run twice."""
    import time

    from fedge.coordinator.process import _deaf_for

    sites = ["a", "b", "c"]
    fed = federation(sites)
    tick = fed.coord.tick
    paused = []

    def tick_after_pause():
        rnd = fed.coord.runner.round if fed.coord.runner is not None else None
        agg = getattr(rnd, "_aggregation", None) if rnd is not None else None
        session = getattr(agg, "session", None)
        if not paused and session is not None and session.stage == "MaskedInput" \
                and fed.inbox:
            pause = 3 * STAGE_S
            fed.clock.t += pause
            now = time.monotonic()
            # it went back to listening (entered) as it last took a message, and the
            # wait of at most 0.05 s came back ``pause`` later
            _deaf_for(fed.coord, heard_at=now - pause, entered=now - pause, timeout=0.05)
            paused.append(pause)
        return tick()

    fed.coord.tick = tick_after_pause
    job = run(fed, plan(rounds=1))
    assert paused
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job).error
    assert history(fed, job) == [(1, "committed", sites, sites)]


def test_a_failed_secure_aggregation_names_the_sites_it_lost(federation):
    """b and c go silent after key sharing: one masked input arrives, below
    min_clients, and the attempt's record names b and c and the stage they left in
    (it said nothing of them before)."""
    from fedge.secagg.messages import RelayedShares

    fed = federation(["a", "b", "c"])
    fed.kill_hook = lambda site, body: site in ("b", "c") and isinstance(body, RelayedShares)
    job = run(fed, plan(rounds=1, attempts=1))
    (attempt,) = fed.coord.store.rounds(job)
    assert attempt.status == "failed" and "TooFewInputs" in attempt.reason
    assert sorted(attempt.dropped) == ["b", "c"], attempt.dropped
    for site in ("b", "c"):
        assert "MaskedInput stage" in attempt.dropped_reasons[site]


def test_a_secure_aggregation_failing_in_its_unmasking_names_those_asked_who_were_silent(
        federation):
    """t = 3 of 4: b and c go silent when asked to unmask; the attempt fails, naming
    them (the unmasking never drops a silent site: t answers are enough)."""
    from fedge.secagg.messages import UnmaskRequest

    fed = federation(["a", "b", "c", "d"])
    fed.kill_hook = lambda site, body: site in ("b", "c") and isinstance(body, UnmaskRequest)
    job = run(fed, plan(rounds=1, attempts=1))
    (attempt,) = fed.coord.store.rounds(job)
    assert attempt.status == "failed" and "ReconstructionFailed" in attempt.reason
    assert attempt.dropped_reasons == {
        s: "asked to unmask, no answer before the round failed" for s in ("b", "c")}


def test_aggregate_begin_tells_the_sites_the_rounds_threshold(federation):
    from fedge.coordinator.plan import parse_plan
    from fedge.coordinator.secure import secagg_config
    from fedge.wire import messages as m

    fed = federation(["a", "b", "c", "d"])
    told: list[tuple[str, int]] = []
    fed.kill_hook = lambda site, body: isinstance(body, m.AggregateBegin) and \
        told.append((site, body.threshold)) and False
    job = run(fed, plan(rounds=1))
    assert fed.coord.store.job(job).status == "completed"
    t = secagg_config(parse_plan(plan(rounds=1)), 4, fed.dim + 1).threshold
    assert t > 1 and sorted(told) == [(s, t) for s in "abcd"]


def test_a_committed_round_says_in_which_secure_aggregation_stage_a_site_dropped_out(
        federation):
    from fedge.secagg.messages import RelayedShares

    sites = ["a", "b", "c", "d"]
    fed = federation(sites)
    fed.kill_hook = lambda site, body: site == "d" and isinstance(body, RelayedShares)
    job = run(fed, plan(rounds=1, attempts=1))
    (attempt,) = fed.coord.store.rounds(job)
    assert attempt.status == "committed" and attempt.survivors == ["a", "b", "c"]
    assert attempt.dropped_reasons == {"d": "dropped out of secure aggregation in its "
                                            "MaskedInput stage: no answer before the stage "
                                            "deadline"}
