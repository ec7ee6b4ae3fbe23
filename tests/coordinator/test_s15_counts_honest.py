"""Honest federations whose largest site holds more than 100x the median
(fedge.coordinator.rounds.MAX_EXAMPLES_OVER_MEDIAN): a university hospital beside
small clinics. Every site is summed in every round, under FedAvg and DP-FedAvg, and
the large site counts in the size-weighted metric, at 100x the median. Found by the
session-15 review (H1, M1): the round used to leave the large site out. Real
coordinator, agents, codec, SecAgg+ (tests/coordinator/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.coordinator.test_s15_tamper import DIM, audited, final_weights, plan, run_job

HOSPITALS = {"big": 6000, "c1": 30, "c2": 40, "c3": 50}  # median 45: big is 133x


def fedavg_step(fed, sites, w, clip=1.0, lr=0.5):
    """One example-weighted FedAvg round of ``sites`` from model ``w``
    (SyntheticTrainer: each moves lr of the way to its target, clipped)."""
    n = {s: fed.agents[s].trainer.n_examples for s in sites}
    total = sum(n.values())
    return w + sum(np.clip((fed.agents[s].trainer.target(w.size) - w) * lr, -clip, clip)
                   * n[s] / total for s in sites)


def test_a_large_honest_site_is_summed_in_every_fedavg_round(federation):
    fed = federation(list(HOSPITALS), dim=DIM, n_examples=HOSPITALS)
    job = run_job(fed, plan(rounds=2))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    rounds = st.rounds(job)
    assert [(r.status, r.survivors) for r in rounds] == [
        ("committed", sorted(HOSPITALS))] * 2
    assert all(not r.dropped_reasons for r in rounds)
    w = np.zeros(DIM, dtype=np.float64)
    for _ in range(2):
        w = fedavg_step(fed, list(HOSPITALS), w)
    np.testing.assert_allclose(final_weights(fed, job), w, atol=1e-5)
    # audited and logged once for the job, not each round
    (finding,) = audited(fed, "example_count_outlier", job)
    assert (finding["site"], finding["count"], finding["median"]) == ("big", 6000, 45)


def test_dp_fedavg_sums_a_large_honest_site_and_its_cohort_holds(federation):
    """Under DP-FedAvg every site weighs min(1, c): its count decides nothing, and
    leaving the large site out put the aggregation below client_dp.cohort_size, so the
    others refused it and every attempt failed."""
    fed = federation(list(HOSPITALS), dim=DIM, n_examples=HOSPITALS)
    text = plan(rounds=1, secure=True, clip=3.0, attempts=2) + (
        "[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 0.5, "
        "cohort_size = 4 }\n")
    job = run_job(fed, text)
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    (rnd,) = st.rounds(job)
    assert rnd.survivors == sorted(HOSPITALS)
    assert not audited(fed, "example_count_outlier", job)


def test_a_large_honest_site_counts_in_the_metric_at_100x_the_median(federation):
    fed = federation(list(HOSPITALS), dim=DIM, n_examples=HOSPITALS)
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    rows = {(r["site"], r["name"]): r for r in st.metrics(job) if r["split"] == "test"}
    sites = {s: rows[(s, "loss")] for s in HOSPITALS}
    assert {s: r["n_examples"] for s, r in sites.items()} == HOSPITALS  # rows as sent
    weight = {**HOSPITALS, "big": 100 * 45}
    want = sum(sites[s]["value"] * weight[s] for s in sorted(HOSPITALS)) / sum(
        weight.values())
    star = rows[("*", "loss")]
    assert star["value"] == pytest.approx(want, rel=1e-12)
    assert star["n_examples"] == sum(weight.values())
    (finding,) = audited(fed, "eval_count_outlier", job)
    assert finding["site"] == "big" and finding["reason"].endswith("weighed as 4500")


def test_the_size_weighted_metric_caps_a_150x_site_and_keeps_its_row():
    """_eval_rows, as the coordinator stores one split: 150x the median is weighed as
    100x, not left out."""
    from fedge.coordinator.rounds import _eval_rows
    from fedge.wire import messages as m

    evals = {"big": m.EvalResult("t", 7500, {"loss": 1.0}),
             "c1": m.EvalResult("t", 40, {"loss": 3.0}),
             "c2": m.EvalResult("t", 50, {"loss": 5.0}),
             "c3": m.EvalResult("t", 60, {"loss": 7.0})}  # median 55: big is 136x
    rows = {site: (value, n) for site, _, _, value, n in _eval_rows(evals, "test")}
    assert rows["big"] == (1.0, 7500)
    assert rows["*"] == pytest.approx(
        ((1.0 * 5500 + 3.0 * 40 + 5.0 * 50 + 7.0 * 60) / 5650, 5650), rel=1e-12)


def test_a_failed_aggregation_says_refused_only_of_sites_that_refused():
    """A site lost during training did not refuse to train: the failure says so
    (before, every site out before the aggregation was worded "had refused to train")."""
    from fedge.coordinator.rounds import Phase
    from fedge.wire import messages as m
    from tests.coordinator.test_rounds import PLAN, _train, new_round

    rnd = new_round(PLAN)
    rnd.offer(["a", "b", "c", "d"], 0.0)
    rnd.receive("c", m.TaskRefused(rnd.task_id, "train", "column 'sbp': missing"), 1.0)
    rnd.lost("d", 1.0)
    _train(rnd, "ab")
    assert rnd.phase is Phase.AGGREGATING
    for s in "ab":
        rnd.receive(s, m.TaskRefused(rnd.task_id, "aggregate", f"{s} gave up"), 2.0)
    assert rnd.phase is Phase.FAILED
    assert "2 site(s) of the aggregation refused or were lost: a: a gave up; b: b gave up" \
        in rnd.failure
    assert "(1 site(s) had refused to train: c: column 'sbp': missing)" in rnd.failure
    assert "(1 other site(s) were not in the aggregation: d: connection lost during " \
        "training" in rnd.failure
