"""The Cox loss that ``evaluate`` reports: the same Breslow value as the training loss,
in O(n) memory over a whole split."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

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
