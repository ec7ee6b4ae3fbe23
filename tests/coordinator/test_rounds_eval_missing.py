"""A round keeps each survivor that is not in its evaluation, and why: a refusal in
the site's own words, a result with no metric, a lost connection, the deadline. The
round ends and commits exactly as before: only the reasons are new."""

from __future__ import annotations

import numpy as np

from fedge.coordinator.rounds import EVAL_EMPTY, Phase
from fedge.wire import messages as m
from tests.coordinator.test_rounds import PLAN as ROUNDS_PLAN
from tests.coordinator.test_rounds import new_round

# test_rounds' plan with a third round, so round 1 has no final test
PLAN = ROUNDS_PLAN.replace("rounds = 2", "rounds = 3")
NO_VAL = "site 'surv' has no 'val' split (hold one out with a 'split' column)"


def evaluating(sites="abcde"):
    """Round 1 of 3 (no final test), every site trained and summed: EVALUATING."""
    rnd = new_round(PLAN)
    rnd.offer(list(sites), 0.0)
    sends = []
    for s in sites:
        sends += rnd.receive(s, m.TrainDone(rnd.task_id, 10, {"loss": 1.0}), 1.0)
    for site, begin in sends:
        if isinstance(begin, m.AggregateBegin):
            w = begin.weight_scale * 10
            rnd.receive(site, m.PlainUpdate(rnd.task_id, np.concatenate(
                [w * np.full(3, 0.1), [w]]).astype(np.float32)), 1.5)
    assert rnd.phase is Phase.EVALUATING and rnd.survivors == sorted(sites)
    return rnd


def test_each_survivor_not_evaluated_is_kept_with_its_reason():
    rnd = evaluating()
    rnd.receive("a", m.EvalResult(rnd.task_id, 40, {"c_index": 0.54, "loss": 2.8}), 2.0)
    rnd.receive("b", m.EvalResult(rnd.task_id, 200, {}), 2.0)  # all censored
    rnd.receive("c", m.TaskRefused(rnd.task_id, "eval", NO_VAL), 2.0)
    rnd.receive("d", m.EvalResult(rnd.task_id, 5, {"loss": float("nan")}), 2.0)
    assert rnd.phase is Phase.EVALUATING  # e has not answered: the round waits for it
    rnd.lost("e", 2.5)
    assert rnd.phase is Phase.DONE
    assert rnd.eval_missing == {
        "b": EVAL_EMPTY, "c": NO_VAL,
        "d": "invalid result: metric loss = nan is not a finite number",
        "e": "connection lost during evaluation"}
    # the metrics committed are what they were: a's alone
    evals = [r for r in rnd.metric_rows() if r[1] == rnd.plan.eval_split]
    assert {r[0] for r in evals} == {"a", "*"}


def test_a_survivor_silent_at_the_evaluation_deadline_is_named():
    rnd = evaluating("ab")
    rnd.receive("a", m.EvalResult(rnd.task_id, 40, {"loss": 1.0}), 2.0)
    rnd.tick(11.0)
    assert rnd.phase is Phase.EVALUATING  # the deadline is 10 s after the sum (1.5 s)
    rnd.tick(11.5)
    assert rnd.phase is Phase.DONE
    assert rnd.eval_missing == {"b": "no evaluation result before the evaluation deadline"}


def test_a_round_every_survivor_evaluated_has_nothing_missing():
    rnd = evaluating("ab")
    for s in "ab":
        rnd.receive(s, m.EvalResult(rnd.task_id, 40, {"loss": 1.0}), 2.0)
    assert rnd.phase is Phase.DONE and rnd.eval_missing == {}
