"""A site's example counts are its own word. In training a count far above the median
of its round's (fedge.coordinator.rounds.MAX_EXAMPLES_OVER_MEDIAN) is audited and
summed: even 2**40 moves the mean no further than the clip, as an offset on a masked
input could (sum_problem). In evaluation it is weighed at most that multiple of the
median in the size-weighted metric. Real coordinator, agents, codec, SecAgg+; the
attacker's messages pass a tamper hook (test_s15_tamper). Honest unbalanced
federations: test_s15_counts_honest."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.wire import messages as m
from tests.coordinator.test_s15_tamper import (
    DIM,
    audited,
    final_weights,
    honest_mean,
    plan,
    run_job,
    steps_per_unit,
    tamper,
)

LIE = 1 << 40  # the wire's largest count


def lie_in_train_done(body):
    if isinstance(body, m.TrainDone):
        return dataclasses.replace(body, n_examples=LIE)
    return body


def test_a_site_claiming_2_40_training_examples_moves_the_mean_no_further_than_the_clip(
        federation):
    """A site whose agent weighs its input by the count it claims makes its own
    (clipped) update the round's mean, as an offset on its masked input could: the
    honest weights fall below one quantisation step, and the sum still holds the
    weight the counts give and no coordinate beyond the clip (sum_problem), so the
    round commits that, not garbage (before sum_problem: rounding noise such as
    [1, 1, -1, 3, ...] for a mean near 0.05). Its count is audited, once."""
    fed = federation(["a", "b", "c", "m"], dim=DIM,
                     n_examples={"a": 100, "b": 100, "c": 100, "m": LIE})
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    (rnd,) = st.rounds(job)
    assert rnd.survivors == ["a", "b", "c", "m"]
    final = final_weights(fed, job)
    assert np.all(np.abs(final) <= 1.0 + 4 / steps_per_unit(4))  # the clip, and rounding
    np.testing.assert_allclose(final, honest_mean(fed, ["m"]), atol=8 / steps_per_unit(4))
    (finding,) = audited(fed, "example_count_outlier", job)
    assert (finding["site"], finding["round"], finding["count"], finding["median"]) == (
        "m", 1, LIE, 100)
    assert finding["reason"].startswith(
        f"reported {LIE} examples, more than 100x the median 100 of this round's sites")


def test_a_count_its_masked_input_does_not_carry_fails_the_attempt(federation):
    """The TrainDone says 2**40, the input weighs 100 examples: the sum's weight is
    not the one the counts give, so nothing is committed (aggregate_out_of_bounds)."""
    fed = federation(["a", "b", "c", "m"], dim=DIM,
                     n_examples={"a": 100, "b": 100, "c": 100, "m": 100})
    tamper(fed, "m", lie_in_train_done)
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "failed"
    (rnd,) = st.rounds(job)
    assert rnd.status == "failed" and "not the 1 the survivors' example counts give" \
        in rnd.reason
    (bounds,) = audited(fed, "aggregate_out_of_bounds", job)
    assert bounds["survivors"] == ["a", "b", "c", "m"]
    assert [f["site"] for f in audited(fed, "example_count_outlier", job)] == ["m"]


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


def test_two_sites_are_never_flagged_by_their_counts(federation):
    """Of two, the median is their mean, which neither exceeds 100-fold."""
    sites = {"a": 1, "b": 50_000}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan(secure=False))
    assert fed.coord.store.job(job).status == "completed"
    assert fed.coord.store.rounds(job)[0].survivors == ["a", "b"]
    assert not audited(fed, "example_count_outlier", job)


def test_a_site_claiming_2_40_evaluation_examples_weighs_100x_the_median_at_most(
        federation):
    """Before, the federation's loss (site "*") became the attacker's 0.0 (2.5e-13);
    now the attacker weighs 100x the median of the counts weighed, as an honest site
    that large would, and its own row keeps its count as sent."""
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
    median = sorted([h1["n_examples"], h2["n_examples"], LIE])[1]
    fed_loss = rows[("*", "test", "loss")]
    weighed = h1["n_examples"] + h2["n_examples"] + 100 * median
    want = (h1["value"] * h1["n_examples"] + h2["value"] * h2["n_examples"]) / weighed
    assert fed_loss["value"] == pytest.approx(want, rel=1e-12)
    assert fed_loss["value"] > 1e-3 * min(h1["value"], h2["value"])  # not the liar's 0.0
    assert fed_loss["n_examples"] == weighed
    assert rows[("m", "test", "loss")]["n_examples"] == LIE  # its own row, as sent
    (finding,) = audited(fed, "eval_count_outlier", job)
    assert finding["site"] == "m" and "more than 100x the median" in finding["reason"]
    assert finding["reason"].endswith(f"weighed as {100 * median}")


def test_unbalanced_honest_evaluations_are_all_weighted(federation):
    sites = {"a": 311, "b": 51, "c": 196}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan())
    rows = [r for r in fed.coord.store.metrics(job) if r["split"] == "test"]
    star = next(r for r in rows if r["site"] == "*")
    assert star["n_examples"] == sum(r["n_examples"] for r in rows if r["site"] != "*")
    assert not audited(fed, "eval_count_outlier", job)
