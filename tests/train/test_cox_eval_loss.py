"""The Cox loss that ``evaluate`` reports: the same Breslow value as the training loss,
in O(n) memory over a whole split, and absent when it carries no information."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fedge.coordinator.rounds import _eval_rows
from fedge.train import metrics as M
from fedge.train.api import ModelSpec, build_model, evaluate, flatten
from fedge.train.data import SiteData, Split
from fedge.train.models import cox_risk_sets


def _breslow_n_by_n(s: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """The evaluation's former denominator (and still the training one), kept here as
    the reference: an n x n at-risk mask, one log-sum-exp per row."""
    at_risk = time.reshape(1, -1) >= time.reshape(-1, 1)
    masked = s.reshape(1, -1).expand(s.numel(), -1).masked_fill(~at_risk, -torch.inf)
    return torch.logsumexp(masked, dim=1)


def _reference_loss(risk: np.ndarray, y: np.ndarray) -> float:
    s = torch.from_numpy(risk.astype(np.float64))
    e = torch.from_numpy(y[:, 0].astype(np.float64))
    terms = (_breslow_n_by_n(s, torch.from_numpy(y[:, 1].astype(np.float64))) - s) * e
    return float(terms.sum() / e.sum())


def _survival_site(x: np.ndarray, y: np.ndarray) -> SiteData:
    names = [f"f{i}" for i in range(x.shape[1])]
    return SiteData("s", "survival", names, train=Split(x, y), val=Split(x, y))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("distinct_times", [1, 3, 40, 10_000])
def test_risk_sets_equal_the_n_by_n_breslow_denominator_under_heavy_ties(
    seed: int, distinct_times: int
) -> None:
    rng = np.random.default_rng(seed)
    n = 500
    time = torch.from_numpy(rng.integers(0, distinct_times, size=n).astype(np.float64))
    # scores spread by hundreds: a shared shift would underflow, each row must not
    s = torch.from_numpy(rng.normal(scale=[1.0, 100.0][seed % 2], size=n))
    log_denominator, size = cox_risk_sets(s, time)
    # 1e-9: float64, the two differ only in the order of the additions
    torch.testing.assert_close(log_denominator, _breslow_n_by_n(s, time), rtol=1e-9, atol=0)
    assert torch.equal(size, (time.reshape(1, -1) >= time.reshape(-1, 1)).sum(dim=1))


def test_risk_sets_in_float32_stay_within_float32_rounding_of_the_reference() -> None:
    rng = np.random.default_rng(7)
    time = torch.from_numpy(rng.integers(0, 12, size=3000).astype(np.float32))
    s = torch.from_numpy(rng.normal(scale=3.0, size=3000).astype(np.float32))
    log_denominator, _ = cox_risk_sets(s, time)
    # 1e-5: float32 running sums over 3000 terms vs one log-sum-exp per row
    torch.testing.assert_close(log_denominator, _breslow_n_by_n(s, time), rtol=1e-5, atol=1e-5)


def test_evaluate_reports_the_breslow_loss_of_the_n_by_n_formula_on_a_tied_split() -> None:
    rng = np.random.default_rng(3)
    n = 1200
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = np.stack([(rng.random(n) < 0.4), rng.integers(1, 9, size=n)], 1).astype(np.float32)
    spec = ModelSpec("cox_linear", {"in_features": 4, "seed": 5})
    w = flatten(build_model(spec)) * 7.0  # spread the scores
    got = evaluate(spec, w, _survival_site(x, y), "val").metrics["loss"]
    model = build_model(ModelSpec("cox_linear", {"in_features": 4, "seed": 5}))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(7.0)
        risk = model(torch.from_numpy(x)).numpy().astype(np.float64).reshape(-1)
    assert got == pytest.approx(_reference_loss(risk, y), rel=1e-9)


def test_a_20000_row_survival_evaluation_needs_under_200_mib() -> None:
    """The n x n loss needed about 7 GiB at 20,000 rows (a 100k-row hospital's val
    split), enough to get the agent OOM-killed on an appliance. Measured as the peak
    resident size of a fresh process (torch's CPU tensors are not seen by tracemalloc),
    after a small evaluation has loaded everything lazily loaded."""
    script = textwrap.dedent(
        """
        import resource
        import numpy as np
        from fedge.train.api import ModelSpec, build_model, evaluate, flatten
        from fedge.train.data import SiteData, Split

        def site(n, seed):
            rng = np.random.default_rng(seed)
            x = rng.normal(size=(n, 39)).astype(np.float32)
            y = np.stack([rng.random(n) < 0.3, rng.integers(1, 400, size=n)], 1)
            y = y.astype(np.float32)
            return SiteData("big", "survival", [f"f{i}" for i in range(39)],
                            train=Split(x[:10], y[:10]), val=Split(x, y))

        spec = ModelSpec("cox_linear", {"in_features": 39})
        w = flatten(build_model(spec))
        small, big = site(200, 1), site(20_000, 0)
        evaluate(spec, w, small, "val")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = evaluate(spec, w, big, "val")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert "loss" in out.metrics and "c_index" in out.metrics, out.metrics
        print((after - before) / 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    extra_mib = float(done.stdout.split()[-1])
    assert extra_mib < 200, f"evaluation of 20,000 rows raised peak RSS by {extra_mib:.0f} MiB"


@pytest.mark.parametrize("weights", [[0.0, 0.0, 0.0], [5.0, -3.0, 0.0], [-50.0, 50.0, 1.0]])
def test_a_split_whose_only_event_is_alone_at_the_last_time_reports_no_loss(
    weights: list[float],
) -> None:
    """Every term is log-sum-exp({s_i}) - s_i = 0 whatever the weights: a 'perfect' 0.0
    that pulled a real federation's aggregate val loss from 2.83 to 1.26."""
    n = 50
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    y = np.stack([np.zeros(n), np.arange(1, n + 1)], 1).astype(np.float32)
    y[-1, 0] = 1.0
    spec = ModelSpec("cox_linear", {"in_features": 2})
    out = evaluate(spec, np.array(weights, np.float32), _survival_site(x, y), "val")
    assert out.n_examples == n and out.metrics == {}


def test_a_one_row_split_with_an_event_reports_no_loss() -> None:
    x = np.ones((1, 2), np.float32)
    y = np.array([[1.0, 4.0]], np.float32)
    spec = ModelSpec("cox_linear", {"in_features": 2})
    out = evaluate(spec, flatten(build_model(spec)), _survival_site(x, y), "val")
    assert out.n_examples == 1 and out.metrics == {}


def test_two_deaths_tied_at_the_last_time_still_carry_a_loss() -> None:
    """Each is in the other's risk set, so the loss depends on the weights (no pair is
    comparable for the C-index, which is left out)."""
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], np.float32)
    y = np.array([[0.0, 1.0], [1.0, 9.0], [1.0, 9.0]], np.float32)
    spec = ModelSpec("cox_linear", {"in_features": 2})
    even = evaluate(spec, np.zeros(3, np.float32), _survival_site(x, y), "val").metrics
    skewed = evaluate(spec, np.array([0.0, 4.0, 0.0], np.float32), _survival_site(x, y),
                      "val").metrics
    assert "c_index" not in even
    assert even["loss"] == pytest.approx(np.log(2.0))
    assert skewed["loss"] != pytest.approx(even["loss"])


def test_the_round_aggregate_counts_only_sites_that_report_the_loss() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2)).astype(np.float32)
    informative = np.stack([rng.random(40) < 0.5, rng.integers(1, 30, size=40)], 1)
    informative = informative.astype(np.float32)
    lone = np.stack([np.zeros(50), np.arange(1, 51)], 1).astype(np.float32)
    lone[-1, 0] = 1.0
    x50 = rng.normal(size=(50, 2)).astype(np.float32)
    spec = ModelSpec("cox_linear", {"in_features": 2})
    w = np.array([0.7, -0.4, 0.0], np.float32)
    a = evaluate(spec, w, _survival_site(x, informative), "val")
    e = evaluate(spec, w, _survival_site(x50, lone), "val")
    assert a.metrics["loss"] > 0 and "loss" not in e.metrics
    rows = _eval_rows({"site-a": a, "site-e": e}, "val")
    assert ("*", "val", "loss", a.metrics["loss"], 40) in rows
    assert not [r for r in rows if r[0] == "site-e"]
    assert M.weighted_mean([(40, a.metrics), (50, e.metrics)])["loss"] == a.metrics["loss"]
