"""A job cancelled while a round is in progress keeps that attempt in its records
(review s16 L1): the rounds table, `jobs status` and report.md show it as
"cancelled", with its cohort and which sites had trained, since those sites may
have released an update (and spent privacy budget) in it. Real coordinator, agents,
codec and SQLite store in memory (tests/coordinator/conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fedge.coordinator.report import write_job_report
from fedge.coordinator.rounds import Phase, Round
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import plan


def _in_round_2(fed, stalled_by: type, until: Callable[[Round], bool]) -> str:
    """A 3-round job whose round 1 committed and whose round 2 waits, c never
    answering its ``stalled_by`` message, until ``until`` holds of the round. Its id."""
    coord, st = fed.coord, fed.coord.store

    async def go():
        await fed.heartbeats()
        job = coord.submit_job(plan(rounds=3, secure="false"), actor="test")
        await fed.pump(until=lambda: st.job(job).committed_round >= 1)
        fed.kill_hook = lambda site, body: site == "c" and isinstance(body, stalled_by)
        await fed.pump(until=lambda: coord.runner is not None
                       and coord.runner.round is not None and coord.runner.round.round == 2
                       and until(coord.runner.round))
        return job

    return asyncio.run(go())


def test_a_round_cut_short_by_a_cancel_is_recorded_as_a_cancelled_attempt(federation,
                                                                          tmp_path):
    fed = federation(["a", "b", "c"])
    coord, st = fed.coord, fed.coord.store

    # c never answers round 2's task: the round waits in training for it
    job = _in_round_2(fed, m.TrainTask, lambda rnd: rnd.phase is Phase.TRAINING
                      and sorted(rnd.trained) == ["a", "b"])
    started = coord.runner.round.started_at
    coord.cancel_job(job, actor="operator:alice")
    assert st.job(job).status == "cancelled"

    attempts = st.rounds(job)
    assert [(a.round, a.attempt, a.status) for a in attempts] == \
        [(1, 1, "committed"), (2, 1, "cancelled")]
    cut = attempts[-1]
    assert cut.cohort == ["a", "b", "c"] and cut.survivors == []
    assert cut.started_at == started
    assert cut.reason.startswith(f"job {st.job(job).error} while the round was training; "
                                 "2 of 3 site(s) had trained (a, b): an update a site "
                                 "released is charged in its own privacy ledger")
    # the cancel is not one of the job's failed attempts
    assert st.job(job).failed_attempts == 0
    assert any(e["action"] == "round_cancelled" and e["actor"] == "operator:alice"
               for e in st.audit_log(job=job))

    status = coord.job_status(job)  # what `jobs status` shows
    assert [(r["round"], r["status"]) for r in status["rounds"]] == \
        [(1, "committed"), (2, "cancelled")]
    write_job_report(tmp_path, status, st.job(job).plan_toml)
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 2 | 1 | cancelled |"))
    assert "| 3 | 0 |" in row and "2 of 3 site(s) had trained (a, b)" in row


def test_jobs_watch_says_the_cut_round_was_cancelled_not_failed(federation):
    # the console printed every attempt that was not committed as "failed after"
    from fedge.console.cli import watch_job

    fed = federation(["a", "b", "c"])
    coord = fed.coord
    job = _in_round_2(fed, m.TrainTask, lambda rnd: rnd.phase is Phase.TRAINING)
    coord.cancel_job(job, actor="operator:alice")
    lines: list[str] = []
    status = watch_job(lambda op, args: (coord.job_status(job), {}), job, interval_s=0,
                       out=lines.append, results_wait_s=0)  # no export in memory
    assert status["status"] == "cancelled"
    cut = next(line for line in lines if line.startswith("round 2 attempt 1 "))
    assert cut.startswith("round 2 attempt 1 was cancelled after ") and "failed" not in cut


def test_a_round_cancelled_after_its_sum_was_formed_keeps_its_survivors(federation):
    # diff review s16 L3: the cancelled row had no survivors, so the coordinator's
    # DP-FedAvg count (report.client_privacy: one release per survivor per attempt)
    # left out a release the sites had made, its sum formed before the cancel
    from fedge.coordinator.report import client_privacy

    fed = federation(["a", "b", "c"])
    coord, st = fed.coord, fed.coord.store

    # c never answers round 2's evaluation: the round waits, its sum formed
    job = _in_round_2(fed, m.EvalTask, lambda rnd: rnd.phase is Phase.EVALUATING)
    coord.cancel_job(job, actor="operator:alice")
    cut = st.rounds(job)[-1]
    assert (cut.round, cut.status, cut.survivors) == (2, "cancelled", ["a", "b", "c"])
    # the job's plan with DP-FedAvg set: what the report would count for such a job
    dp_plan = plan(rounds=3, secure="false") + (
        "\n[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 1.0, "
        "cohort_size = 1 }\n")
    counted = client_privacy(dp_plan, coord.job_status(job)["rounds"])
    assert counted is not None
    assert {s: v["releases"] for s, v in counted["sites"].items()} == {"a": 2, "b": 2, "c": 2}
