"""Roll-out: canary first, then the rest one at a time; stop at the first failure."""

import pytest

from fedge.update.messages import UpdateOutcome
from fedge.update.rollout import Rollout

P = "model/risk/2/model.onnx"


def ok(site_ok=True, detail="fine"):
    return UpdateOutcome("r1", P, site_ok, False, detail)


def test_canary_first_then_each_site_in_turn():
    r = Rollout("r1", P, ["a", "b", "c"])
    assert [s for s, _ in r.start(0)] == ["a"]
    assert [s for s, _ in r.receive("a", ok(), 1)] == ["b"]
    assert r.state == "rest"
    assert [s for s, _ in r.receive("b", ok(), 2)] == ["c"]
    assert r.receive("c", ok(), 3) == [] and r.state == "succeeded"


def test_canary_failure_stops_before_anyone_else_is_told():
    r = Rollout("r1", P, ["a", "b", "c"])
    r.start(0)
    assert r.receive("a", ok(False, "health check failed; rolled back"), 1) == []
    assert r.state == "failed"
    assert "canary a failed" in r.failure and "2 site(s) not updated" in r.failure
    assert set(r.results) == {"a"}


def test_failure_after_canary_stops_the_rest():
    r = Rollout("r1", P, ["a", "b", "c"])
    r.start(0)
    r.receive("a", ok(), 1)
    r.receive("b", ok(False, "hash mismatch"), 2)
    assert r.state == "failed" and "site b failed" in r.failure
    assert "c" not in r.results


def test_silence_past_the_deadline_fails_the_rollout():
    r = Rollout("r1", P, ["a", "b"], deadline_s=5)
    r.start(0)
    r.tick(4.9)
    assert r.state == "canary"
    r.tick(5.0)
    assert r.state == "failed" and "did not report" in r.failure


def test_single_site_rollout_and_stray_outcomes():
    r = Rollout("r1", P, ["a"])
    r.start(0)
    assert r.receive("b", ok(), 1) == []  # not the site being waited on
    assert r.receive("a", UpdateOutcome("other", P, True, False, ""), 1) == []
    r.receive("a", ok(), 2)
    assert r.state == "succeeded"


def test_only_the_awaited_site_is_asked_again_and_the_deadline_runs_on():
    r = Rollout("r1", P, ["a", "b"], deadline_s=10)
    assert r.reask("a", 0) == []  # not started
    r.start(0)
    (site, msg), = r.reask("a", 1)
    assert site == "a" and (msg.rollout_id, msg.path) == ("r1", P)
    assert r.reask("b", 1) == []  # not its turn
    r.tick(10.0)  # asking again did not restart the deadline
    assert r.state == "failed" and r.reask("a", 10) == [] and r.due(20) == []


def test_a_silent_site_is_asked_again_every_quarter_deadline():
    r = Rollout("r1", P, ["a", "b"], deadline_s=40)
    assert r.reask_interval_s == 10
    r.start(0)
    assert r.due(9.9) == []
    assert [s for s, _ in r.due(10)] == ["a"]
    assert r.due(19.9) == []  # counted from the last ask
    r.reask("a", 25)  # it came back: asked then
    assert r.due(30) == [] and [s for s, _ in r.due(35)] == ["a"]
    r.receive("a", ok(), 36)  # b is asked now, and its quarter runs from here
    assert r.due(45) == [] and [s for s, _ in r.due(46)] == ["b"]
    r.receive("b", ok(), 47)
    assert r.state == "succeeded" and r.due(100) == []


def test_bad_rollouts_are_refused():
    with pytest.raises(ValueError, match="at least one site"):
        Rollout("r", P, [])
    with pytest.raises(ValueError, match="twice"):
        Rollout("r", P, ["a", "a"])


def test_state_round_trips_at_every_stage_and_a_bad_one_is_named():
    r = Rollout("r1", P, ["a", "b", "c"], deadline_s=30)
    stages = [r.to_state()]
    r.start(10)
    stages.append(r.to_state())
    r.receive("a", ok(), 11)
    stages.append(r.to_state())
    for state in stages:
        back = Rollout.from_state(state)
        assert back.to_state() == state
    back = Rollout.from_state(stages[-1])
    back.tick(40.9)  # the deadline runs from the saved waiting_since (11)
    assert back.state == "rest"
    assert [s for s, _ in back.receive("b", ok(), 41)] == ["c"]
    late = Rollout.from_state(stages[-1])
    late.tick(41.0)
    assert late.state == "failed" and "b did not report" in late.failure
    with pytest.raises(ValueError, match="waiting_since"):
        Rollout.from_state({k: v for k, v in stages[-1].items() if k != "waiting_since"})
    with pytest.raises(ValueError, match="unknown state 'halfway'"):
        Rollout.from_state({**stages[-1], "state": "halfway"})
    with pytest.raises(ValueError, match="next=3"):
        Rollout.from_state({**stages[-1], "next": 3})
