"""A compromised enrolled site that offsets its masked input is refused by the sum's
bounds (fedge.coordinator.rounds.sum_problem), and honest sums never are.

The attacker is a real Agent whose messages pass a tamper hook (test_s15_tamper).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedge.coordinator import checkpoint as ck
from fedge.coordinator.rounds import INPUT_RELATIVE_ERROR, quantisation_step, sum_problem
from fedge.core import dequantise, quant_bits, quantise
from fedge.secagg.messages import MaskedInput
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


def offset_masked_input(fed, site, offset_of):
    """``site`` adds ``offset_of(n)`` (int64[n], in quantisation steps) to its masked
    input mod 2^32: uniform-looking, so nothing on the wire shows it."""
    def hook(body):
        if isinstance(body, MaskedInput):
            off = np.asarray(offset_of(body.masked.size), dtype=np.int64)
            masked = (body.masked.astype(np.int64) + off) % (1 << 32)
            return dataclasses.replace(body, masked=masked.astype(np.uint32))
        return body
    tamper(fed, site, hook)


# -- attacks ---------------------------------------------------------------------------

def test_offset_on_the_weight_coordinate_is_refused_not_committed(federation):
    """Σw is the coordinator's own number (weight scale × reported counts): a site that
    shrinks it by half (doubling the mean update it divides) fails the attempt."""
    fed = federation(["a", "b", "m"], dim=DIM, n_examples={"a": 100, "b": 100, "m": 100})
    # the three weights are 1 each: take 1.5 off the sum's weight coordinate
    offset_masked_input(fed, "m", lambda n: np.eye(1, n, n - 1, dtype=np.int64)[0]
                        * -round(1.5 * steps_per_unit(3)))
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "failed"
    (attempt,) = st.rounds(job)
    assert "total weight" in attempt.reason and "masked input was altered" in attempt.reason
    assert [d["round"] for d in audited(fed, "aggregate_out_of_bounds", job)] == [1]
    assert not ck.final_path(fed.coord.state_dir, job).exists()


def test_offset_beyond_the_clip_is_refused_not_committed(federation):
    """Every site's update is clipped to [−c, c] per coordinate, so no honest mean
    exceeds c: an offset of +4c on each coordinate of one input (a mean near 1.4c) is
    refused, where before it committed weights of 1.4."""
    fed = federation(["a", "b", "m"], dim=DIM, n_examples={"a": 100, "b": 100, "m": 100})
    offset_masked_input(fed, "m", lambda n: np.r_[np.full(n - 1, round(4.0 * steps_per_unit(3))),
                                                    0])
    job = run_job(fed, plan())
    st = fed.coord.store
    assert st.job(job).status == "failed", st.job(job)
    (attempt,) = st.rounds(job)
    assert "beyond the clip 1" in attempt.reason, attempt.reason
    assert not ck.final_path(fed.coord.state_dir, job).exists()


def test_offset_that_blows_up_weight_and_update_is_refused(federation):
    """The report's variant B without the count lie: +10 steps on Σw and +1.5 on each
    update coordinate (a committed mean of 1.5/3 per coordinate plus noise would be
    within the clip, but the weight no longer adds up)."""
    fed = federation(["a", "b", "m"], dim=DIM, n_examples={"a": 311, "b": 51, "m": 196})
    q = steps_per_unit(3)
    offset_masked_input(fed, "m", lambda n: np.r_[np.full(n - 1, round(1.5 * q)), 10_000])
    job = run_job(fed, plan())
    assert fed.coord.store.job(job).status == "failed"
    assert "total weight" in fed.coord.store.rounds(job)[0].reason


# -- honest runs are never refused -----------------------------------------------------

@pytest.mark.parametrize("secure", [True, False])
def test_unbalanced_honest_sites_commit(federation, secure):
    """311 vs 51 examples (Fed-TCGA-BRCA's largest and smallest centres), secure or
    plain: the sum's bounds hold and the round commits the weighted mean."""
    sites = {"a": 311, "b": 51, "c": 196}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    job = run_job(fed, plan(rounds=2, secure=secure))
    st = fed.coord.store
    assert st.job(job).status == "completed", st.job(job)
    assert [r.status for r in st.rounds(job)] == ["committed", "committed"]
    assert not audited(fed, "aggregate_out_of_bounds", job)


def test_two_unbalanced_plain_sites_commit(federation):
    fed = federation(["a", "b"], dim=DIM, n_examples={"a": 311, "b": 51})
    job = run_job(fed, plan(secure=False))
    assert fed.coord.store.job(job).status == "completed"
    np.testing.assert_allclose(final_weights(fed, job), honest_mean(fed, ["a", "b"]),
                               atol=1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_updates_at_the_clip_commit(federation, strategy):
    """Every update clipped (clip 0.01, targets ~0.1): the weighted mean sits on ±c on
    every coordinate where the sites agree, the sum's edge, and still commits."""
    sites = {"a": 311, "b": 51, "c": 196, "d": 55}
    fed = federation(list(sites), dim=64, n_examples=sites)
    for a in fed.agents.values():
        a.trainer.scale = 5.0
    job = run_job(fed, plan(clip=0.01, strategy=strategy))
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job)
    w = final_weights(fed, job)
    assert np.abs(w).max() == pytest.approx(0.01, rel=1e-3)  # some coordinate at ±c


def test_sum_bounds_hold_for_honest_quantised_inputs_at_their_edges():
    """The real quantiser, many seeds, inputs at ±c·w_i and weights 100x apart (the
    count bound's extreme): sum_problem never refuses an honest sum, and refuses it
    once the sum moves by twice what rounding allows."""
    rng = np.random.default_rng(5)
    clip = 1.0
    for k in (2, 3, 5, 17):
        b = quant_bits(k)
        counts = rng.integers(1, 101, k)
        counts[0] = 100
        counts[1] = 1
        ws = 1.0 / counts.max()
        weights = [ws * int(n) for n in counts]
        for trial in range(20):
            signs = rng.choice([-1.0, 1.0], size=16) if trial % 2 else np.ones(16)
            total = np.zeros(17, dtype=np.uint64)
            for w in weights:
                vec = np.empty(17, dtype=np.float32)
                vec[:-1] = w * clip * signs  # every coordinate at the clip
                vec[-1] = w
                q = quantise(vec, clip=clip, bits=b, seed=rng.bytes(16))
                total += q.astype(np.uint64)
            decoded = dequantise((total % (1 << 32)).astype(np.uint32), n_summands=k,
                                 clip=clip, bits=b)
            expected = sum(ws * int(n) for n in counts)
            step = quantisation_step(clip, k)
            assert sum_problem(decoded, expected_weight=expected, summands=k, clip=clip,
                               step=step) is None, (k, trial)
            allowed = k * step + expected * clip * INPUT_RELATIVE_ERROR
            pushed = decoded.copy()
            pushed[0] += np.sign(pushed[0]) * 2 * allowed
            assert sum_problem(pushed, expected_weight=expected, summands=k, clip=clip,
                               step=step) is not None
            pushed = decoded.copy()
            pushed[-1] += 2 * allowed
            assert sum_problem(pushed, expected_weight=expected, summands=k, clip=clip,
                               step=step) is not None


@pytest.mark.parametrize("secure", [True, False])
def test_dp_fedavg_sums_commit(federation, secure):
    """DP-FedAvg weighs every site min(1, c) whatever its count: Σw is k·min(1, c)."""
    sites = {"a": 311, "b": 51, "c": 196}
    fed = federation(list(sites), dim=DIM, n_examples=sites)
    text = plan(rounds=2, secure=secure, clip=3.0) + (
        "[privacy]\nclient_dp = { clip_norm = 1.0, noise_multiplier = 0.5, cohort_size = 1 }\n")
    job = run_job(fed, text)
    assert fed.coord.store.job(job).status == "completed", fed.coord.store.job(job)
    assert not audited(fed, "aggregate_out_of_bounds", job)
