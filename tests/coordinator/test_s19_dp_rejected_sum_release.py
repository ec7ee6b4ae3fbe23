"""Under DP-FedAvg the coordinator counts, per site, the round attempts whose sum held
its update (fedge.coordinator.report.client_privacy), and the job's records give
each site's client-level epsilon from that count (checkpoint.recorded_epsilon). A sum
that was unmasked and then rejected (out of bounds: "aggregate rejected") was learned
all the same: its failed attempt keeps the sum's survivors and is one release each.

Before, a failed attempt's row had no survivors, and the report's epsilon was that of
one release fewer. Real coordinator, agents, SecAgg+ and SQLite in memory; the sum is
pushed out of bounds by a real agent whose masked input a tamper hook offsets
(tests/coordinator/test_s15_tamper.py)."""

from __future__ import annotations

import json

import numpy as np

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.report import CLIENT_DP_DELTA, client_privacy, write_job_report
from fedge.train.accounting import client_epsilon_for
from tests.coordinator.test_s15_poisoned_sum import offset_masked_input
from tests.coordinator.test_s15_tamper import DIM, audited, plan, run_job, steps_per_unit

SITES = {"a": 100, "b": 100, "m": 100}
DP_FEDAVG = ("[privacy]\n"
             "client_dp = { clip_norm = 1.0, noise_multiplier = 0.5, cohort_size = 1 }\n")
CLIP = 3.0  # secagg.clip: 6 std of the noise share (fedge.coordinator.plan)


def off_the_weight_in_attempt_1(fed):
    """m takes 1.5 off the sum's weight coordinate (under DP-FedAvg each weight is
    min(1, c) = 1 for c = 3: the sum no honest inputs make) in round 1's first attempt only."""
    seen: list[int] = []

    def offset(n):
        seen.append(n)
        shift = -round(1.5 * steps_per_unit(3, CLIP)) if len(seen) == 1 else 0
        return np.eye(1, n, n - 1, dtype=np.int64)[0] * shift
    offset_masked_input(fed, "m", offset)


def test_a_rejected_dp_fedavg_sum_is_one_release_of_each_of_its_survivors(federation,
                                                                           tmp_path):
    fed = federation(list(SITES), dim=DIM, n_examples=SITES)
    off_the_weight_in_attempt_1(fed)
    text = plan(rounds=1, attempts=3, clip=CLIP) + DP_FEDAVG
    job = run_job(fed, text)
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job).error

    first, second = st.rounds(job)
    assert (first.status, second.status) == ("failed", "committed")
    assert first.reason.startswith("aggregate rejected: "), first.reason
    assert [d["round"] for d in audited(fed, "aggregate_out_of_bounds", job)] == [1]
    # the sum was unmasked over all three before it was rejected
    assert first.survivors == ["a", "b", "m"]
    assert second.survivors == ["a", "b", "m"]  # pinned to the same set
    failed = audited(fed, "round_failed", job)
    assert [d.get("survivors") for d in failed] == [["a", "b", "m"]]

    status = fed.coord.job_status(job)
    counted = client_privacy(text, status["rounds"])
    assert counted is not None
    assert {s: v["releases"] for s, v in counted["sites"].items()} == \
        {"a": 2, "b": 2, "m": 2}
    two = client_epsilon_for(noise_multiplier=0.5, rounds=2, delta=CLIENT_DP_DELTA)
    eps = ck.recorded_epsilon(text, status["metrics"], status["rounds"])
    assert eps is not None and eps["mechanism"] == "dp_fedavg"
    assert eps["sites"] == {s: two for s in SITES}
    # what the job's final model carries (the coordinator wrote it at the job's end)
    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    assert final.outcome is not None and final.outcome.epsilon is not None
    assert final.outcome.epsilon["sites"] == {s: two for s in SITES}

    write_job_report(tmp_path, status, text)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {s: v["releases"] for s, v in report["client_privacy"]["sites"].items()} == \
        {"a": 2, "b": 2, "m": 2}
    md = (tmp_path / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 1 | 1 | failed |"))
    assert "| 3 | 3 |" in row  # cohort 3, survivors 3
    assert all(f"| {s} | 2 | {two:.3f} |" in md for s in SITES)


def test_an_attempt_that_failed_before_its_sum_keeps_no_survivors(federation):
    """The other side: an attempt that fails in training (too few sites trained) formed
    no sum, so its row names no survivors and counts as no release."""
    fed = federation(["a", "b"], dim=DIM, n_examples={"a": 100, "b": 100})
    fed.kill_hook = lambda site, body: site == "b"  # b is gone at its first task
    text = plan(rounds=1, attempts=1, clip=CLIP) + DP_FEDAVG
    job = run_job(fed, text)
    st = fed.coord.store
    assert st.job(job).status == "failed"
    (attempt,) = st.rounds(job)
    assert attempt.status == "failed" and attempt.survivors == []
    counted = client_privacy(text, fed.coord.job_status(job)["rounds"])
    assert counted is not None and counted["sites"] == {}
