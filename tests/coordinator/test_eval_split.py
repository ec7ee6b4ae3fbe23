"""The split each round's global model is evaluated on is a plan setting (job.eval_split)."""

from __future__ import annotations

import numpy as np
import pytest
from test_rounds import PLAN as ROUND_PLAN
from test_rounds import new_round, send_plain

from fedge.coordinator.plan import PlanError, parse_plan
from fedge.coordinator.rounds import Phase
from fedge.wire import messages as m

PLAN = ROUND_PLAN.replace("seed = 3\n", "seed = 3\n{split}\n")


def test_default_is_test_and_val_or_train_may_be_asked() -> None:
    assert parse_plan(PLAN.format(split="")).eval_split == "test"
    for split in ("val", "train", "test"):
        assert parse_plan(PLAN.format(split=f'eval_split = "{split}"')).eval_split == split


def test_an_unknown_split_is_refused_naming_the_field_and_the_choices() -> None:
    with pytest.raises(
        PlanError, match=r"job\.eval_split = 'validation': must be one of val, test"
    ):
        parse_plan(PLAN.format(split='eval_split = "validation"'))
    with pytest.raises(PlanError, match=r"job\.eval_split = 3: must be a non-empty string"):
        parse_plan(PLAN.format(split="eval_split = 3"))


def test_each_round_evaluates_and_records_the_plans_split() -> None:
    rnd = new_round(PLAN.format(split='eval_split = "val"'))
    sends = rnd.offer(["a", "b"], now=0.0)
    for s in "ab":
        sends += rnd.receive(s, m.TrainDone(rnd.task_id, 10, {"loss": 1.0}), 1.0)
    delta = np.full(3, 0.1)
    evals = send_plain(rnd, sends, {"a": delta, "b": delta}, {"a": 10, "b": 10})
    tasks = [b for _, b in evals if isinstance(b, m.EvalTask)]
    assert [t.split for t in tasks] == ["val", "val"]
    rnd.receive("a", m.EvalResult(rnd.task_id, 4, {"c_index": 0.6}), 2.0)
    rnd.receive("b", m.EvalResult(rnd.task_id, 12, {"c_index": 0.8}), 2.0)
    assert rnd.phase is Phase.DONE
    rows = rnd.metric_rows()
    assert ("*", "val", "c_index", pytest.approx(0.75), 16) in rows
    assert ("a", "val", "c_index", 0.6, 4) in rows
    assert not [r for r in rows if r[1] == "test"]
