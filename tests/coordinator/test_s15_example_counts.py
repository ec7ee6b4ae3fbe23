"""A site's example counts are its own word: one far above the median of its round's
(fedge.coordinator.rounds.MAX_EXAMPLES_OVER_MEDIAN) leaves it out of the sum
(TrainDone) or out of the size-weighted metric (EvalResult), naming it; honest
unbalanced federations are never judged so. Real coordinator, agents, codec, SecAgg+;
the attacker's messages pass a tamper hook (test_s15_tamper)."""

from __future__ import annotations

import dataclasses

import numpy as np

from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import (
    DIM,
    audited,
    final_weights,
    honest_mean,
    plan,
    run_job,
    tamper,
)

LIE = 1 << 40  # the wire's largest count


def lie_in_train_done(body):
    if isinstance(body, m.TrainDone):
        return dataclasses.replace(body, n_examples=LIE)
    return body


def test_a_site_claiming_2_40_training_examples_is_left_out_of_the_sum(federation):
    """Before, its count put every other weight below one quantisation step and the
    round committed rounding noise ([1, 1, -1, 3, ...] for a mean near 0.05)."""
    fed = federation(["a", "b", "c", "m"], dim=DIM,
                     n_examples={"a": 100, "b": 100, "c": 100, "m": 100})
    tamper(fed, "m", lie_in_train_done)
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    (rnd,) = st.rounds(job)
    assert rnd.survivors == ["a", "b", "c"]
    assert rnd.dropped_reasons["m"] == (f"reported {LIE} examples, more than 100x the "
                                        "median 100 of this round's sites")
    np.testing.assert_allclose(final_weights(fed, job), honest_mean(fed, ["a", "b", "c"]),
                               atol=1e-6)
    (finding,) = audited(fed, "example_count_outlier", job)
    assert finding["site"] == "m" and finding["round"] == 1


def test_honest_counts_up_to_100x_the_median_are_summed(federation):
    """5, 20 and 2000 examples (the largest exactly 100x the median): all summed."""
    sites = {"a": 5, "b": 20, "c": 2000}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    assert st.rounds(job)[0].survivors == ["a", "b", "c"]
    np.testing.assert_allclose(final_weights(fed, job), honest_mean(fed, list(sites)),
                               atol=1e-6)
    assert not audited(fed, "example_count_outlier", job)


def test_two_sites_are_never_judged_by_their_counts(federation):
    """Of two, the median is their mean, which neither exceeds 100-fold."""
    sites = {"a": 1, "b": 50_000}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan(secure=False))
    assert fed.coord.store.job(job).status == "completed"
    assert fed.coord.store.rounds(job)[0].survivors == ["a", "b"]


def test_a_site_claiming_2_40_evaluation_examples_does_not_decide_the_metric(federation):
    """Before, the federation's loss (site "*") became the attacker's 0.0 (2.5e-13);
    now it is the honest sites' weighted mean, and the attacker's own row stays."""
    fed = federation(["h1", "h2", "m"])

    def hook(body):
        if isinstance(body, m.EvalResult):
            return dataclasses.replace(body, n_examples=LIE,
                                       metrics={k: 0.0 for k in body.metrics})
        return body
    tamper(fed, "m", hook)
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "completed"
    rows = {(r["site"], r["split"], r["name"]): r for r in st.metrics(job)}
    h1, h2 = rows[("h1", "test", "loss")], rows[("h2", "test", "loss")]
    fed_loss = rows[("*", "test", "loss")]
    want = (h1["value"] * h1["n_examples"] + h2["value"] * h2["n_examples"]) / (
        h1["n_examples"] + h2["n_examples"])
    assert fed_loss["value"] == want
    assert fed_loss["n_examples"] == h1["n_examples"] + h2["n_examples"]
    assert rows[("m", "test", "loss")]["n_examples"] == LIE  # its own row, as sent
    (finding,) = audited(fed, "eval_count_outlier", job)
    assert finding["site"] == "m" and "more than 100x the median" in finding["reason"]


def test_unbalanced_honest_evaluations_are_all_weighted(federation):
    sites = {"a": 311, "b": 51, "c": 196}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan())
    rows = [r for r in fed.coord.store.metrics(job) if r["split"] == "test"]
    star = next(r for r in rows if r["site"] == "*")
    assert star["n_examples"] == sum(r["n_examples"] for r in rows if r["site"] != "*")
    assert not audited(fed, "eval_count_outlier", job)
