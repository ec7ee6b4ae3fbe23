"""An attempt the coordinator's stop cut short after its sum was formed (being
evaluated) keeps the sum's survivors in its "interrupted" row, so the coordinator's
DP-FedAvg release count (report.client_privacy: one release per survivor per attempt)
includes it (review s16 diffreview2 L2; cefb6d2 did the same for a cancel). The row
had none, though the noisy sum had been revealed. Real coordinator, agents, SecAgg+
sessions, codec and SQLite store in memory (tests/coordinator/conftest.py); the
restart drops everything in memory and in flight."""

from __future__ import annotations

import asyncio

from fedge.coordinator.report import client_privacy
from fedge.coordinator.rounds import Phase
from fedge.wire import messages as m
from tests.coordinator.test_federation_inproc import plan
from tests.coordinator.test_s16_progress_restart_mid_round import run_into_round_2


def test_an_attempt_interrupted_while_evaluated_keeps_its_sums_survivors(federation):
    fed = federation(["a", "b", "c"])

    # c never answers round 2's evaluation (it answers round 1's): the round waits
    # there, its sum formed
    fed.kill_hook = lambda site, body: (site == "c" and isinstance(body, m.EvalTask)
                                        and fed.coord.runner.round.round == 2)
    job = run_into_round_2(fed, Phase.EVALUATING, secure="true")
    assert fed.coord.runner.round.survivors == ["a", "b", "c"]
    fed.clock.t += 3.0  # the coordinator is down a while
    coord = fed.restart()
    st = coord.store
    fed.kill_hook = None
    fed.dead.clear()  # c's agent comes back with the coordinator

    async def second():
        await fed.heartbeats()
        await fed.pump(until=lambda: st.job(job).status in ("completed", "failed"))

    asyncio.run(second())
    assert st.job(job).status == "completed", st.job(job).error
    attempts = st.rounds(job)
    assert [(a.round, a.attempt, a.status) for a in attempts] == \
        [(1, 1, "committed"), (2, 1, "interrupted"), (2, 2, "committed")]
    cut = attempts[1]
    assert cut.survivors == ["a", "b", "c"]
    assert "while the round was being evaluated" in cut.reason
    status = coord.job_status(job)
    assert [r["survivors"] for r in status["rounds"]] == [["a", "b", "c"]] * 3
    # the job's plan with DP-FedAvg set: what the report would count for such a job
    dp_plan = plan(rounds=2, secure="true") + (
        "\n[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 1.0, "
        "cohort_size = 1 }\n")
    counted = client_privacy(dp_plan, status["rounds"])
    assert counted is not None
    assert {s: v["releases"] for s, v in counted["sites"].items()} == {"a": 3, "b": 3, "c": 3}


def test_an_attempt_interrupted_before_its_sum_keeps_no_survivors(federation):
    fed = federation(["a", "b", "c"])

    job = run_into_round_2(fed, Phase.AGGREGATING, secure="true")
    coord = fed.restart()
    st = coord.store

    async def second():
        await fed.heartbeats()
        await fed.pump(until=lambda: st.job(job).status in ("completed", "failed"))

    asyncio.run(second())
    assert st.job(job).status == "completed", st.job(job).error
    cut = st.rounds(job)[1]
    assert (cut.round, cut.status, cut.survivors) == (2, "interrupted", [])
