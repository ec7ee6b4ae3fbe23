"""Why each site was left out of an attempt's cohort is true: 'not in this retry's
cohort: ... retried over the same survivors only' is said of a candidate only where a
pinned retry (an earlier attempt's sum was unmasked) did not take it. An attempt that
failed before any cohort formed, pinned or not, says so of its other candidates. The
old rule gave every candidate outside the cohort the pinned reason, so a first attempt
that timed out waiting for min_clients logged 'cohort of 0 formed; left out: site-0 (not
in this retry's cohort: ...)' though nothing had been unmasked. A real coordinator over
the in-memory federation (real store, real rounds, real agents' heartbeats)."""

from __future__ import annotations

import asyncio
import logging

from fedge.coordinator.cohort import NO_COHORT, PINNED_OUT
from tests.coordinator.test_service import PLAN as SERVICE_PLAN

PLAN = SERVICE_PLAN.replace("rounds = 3", "rounds = 1")  # cohort_s = 5, min_clients = 2


def _heard(fed, sites) -> None:
    """Each of ``sites`` beats once and the coordinator takes the beats."""
    async def go():
        await fed.heartbeats(sites)
    asyncio.run(go())
    while fed.inbox:
        fed.coord.handle_frames(*fed.inbox.pop(0))


def _left_out_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedge.coordinator" and "left out:" in r.getMessage()]


def test_a_first_attempt_that_never_formed_a_cohort_gives_no_pinned_reason(
        federation, caplog) -> None:
    fed = federation(["a", "b"])
    _heard(fed, ["a"])  # b never connects: a alone is below min_clients 2
    coord = fed.coord
    job = coord.submit_job(PLAN, actor="test")
    with caplog.at_level(logging.INFO, logger="fedge.coordinator"):
        coord.tick()
        rnd = coord.runner.round
        assert rnd.pinned_cohort is None and rnd.cohort == []
        fed.clock.t += 6  # past cohort_s (5 s), within the heartbeat timeout (30 s)
        coord.tick()
    assert rnd.phase.value == "failed"
    assert rnd.left_out == {"a": NO_COHORT, "b": "not connected"}
    (line,) = _left_out_lines(caplog)
    assert f"job {job} round 1: no cohort formed; left out: a ({NO_COHORT}); b (not " \
           "connected)" in line
    assert "retry" not in line and "unmasked" not in line


def test_a_pinned_retry_names_the_pinned_reason_only_for_candidates_outside_its_survivors(
        federation, caplog) -> None:
    """An earlier attempt asked for its unmasking over a and b: the retry waits for
    exactly those. c, a candidate outside them, is 'not in this retry's cohort' whether
    the retry starts or fails; a, inside them, is left out only by a failed retry's
    failure (b not connected), never for being outside the survivors."""
    fed = federation(["a", "b", "c"])
    coord = fed.coord
    _heard(fed, ["a", "c"])
    job = coord.submit_job(PLAN, actor="test")
    coord.store.record_unmask_set(job, 1, ["a", "b"])
    with caplog.at_level(logging.INFO, logger="fedge.coordinator"):
        coord.tick()
        rnd = coord.runner.round
        assert rnd.pinned_cohort == ["a", "b"] and rnd.cohort == []
        fed.clock.t += 6
        coord.tick()
    assert rnd.left_out == {"a": NO_COHORT, "b": "not connected", "c": PINNED_OUT}
    (line,) = _left_out_lines(caplog)
    assert f"a ({NO_COHORT})" in line and f"c ({PINNED_OUT})" in line

    # b is back: the next attempt, still pinned, starts with a and b; c stays out
    caplog.clear()
    _heard(fed, ["a", "b", "c"])
    fed.clock.t += 1  # past the pause after a failed attempt
    with caplog.at_level(logging.INFO, logger="fedge.coordinator"):
        for _ in range(10):  # bounded: the pause is 0 s in this plan
            coord.tick()
            if coord.runner.round is not None and coord.runner.round.cohort:
                break
            fed.clock.t += 1
    rnd = coord.runner.round
    assert rnd.pinned_cohort == ["a", "b"] and rnd.cohort == ["a", "b"]
    assert rnd.left_out == {"c": PINNED_OUT}
    (line,) = _left_out_lines(caplog)
    assert f"cohort of 2 formed; left out: c ({PINNED_OUT})" in line
