"""An enrolled site sending SecAgg messages or evaluation results for rounds that are
not in progress (each naming a new job, as an insider may) cannot flood the
coordinator's journal: each is logged the first time for its site, job and round,
and a flood of new ones is counted together (review: 5000 messages gave 5000 lines)."""

from __future__ import annotations

import asyncio
import logging

from fedge.wire import codec
from fedge.wire import messages as m

N = 2000


def _late(fed, i: int, job: str) -> None:
    frames = codec.encode(m.EvalResult(task_id="x", n_examples=1, metrics={}),
                          sender="m", job=job, round=i % 1000 + 1)
    fed.coord.handle_frames("m", [bytes(f) for f in frames])


def test_late_messages_naming_new_jobs_give_a_bounded_number_of_lines(federation, caplog) -> None:
    fed = federation(["a", "b", "m"], dim=8)
    asyncio.run(fed.heartbeats())
    with caplog.at_level(logging.INFO, logger="fedge"):
        for i in range(N):
            _late(fed, i, f"job-{i:06d}-" + "A" * 40)
    lines = [r for r in caplog.records if r.getMessage().startswith("late eval_result")]
    assert 1 <= len(lines) <= 61, len(lines)  # 60 new keys a minute, then counted
    assert lines[0].getMessage() == f"late eval_result from m for job-000000-{'A' * 40}/1 ignored"
    rows = [r for r in fed.coord.store.audit_log() if r["actor"] == "m"]
    assert 1 <= len(rows) <= 62, len(rows)


def test_one_late_result_is_logged_once_and_its_repeats_counted(federation, caplog) -> None:
    fed = federation(["a", "b", "m"], dim=8)
    asyncio.run(fed.heartbeats())
    with caplog.at_level(logging.INFO, logger="fedge"):
        for _ in range(50):
            _late(fed, 0, "job-1")
    lines = [r for r in caplog.records if r.getMessage().startswith("late eval_result")]
    assert [r.getMessage() for r in lines] == ["late eval_result from m for job-1/1 ignored"]
    rows = [r for r in fed.coord.store.audit_log() if r["action"] == "late_message"]
    assert len(rows) == 1 and rows[0]["actor"] == "m"
