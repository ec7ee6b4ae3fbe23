"""Server strategies against Reddi et al. 2021, Algorithm 2, written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator.plan import StrategySettings
from fedge.coordinator.strategies import Strategy, StrategyError, mean_update

RNG = np.random.default_rng(0)
X0 = RNG.normal(size=5).astype(np.float32)
DELTAS = [RNG.normal(size=5) for _ in range(3)]


def run(name, **params):
    s = Strategy(StrategySettings(name, params))
    x = X0
    for d in DELTAS:
        x = s.step(x, d)
    return x


def test_fedavg_adds_scaled_mean():
    expect = X0.astype(np.float64) + 0.5 * sum(DELTAS)
    # each step rounds to float32; compare with that tolerance
    np.testing.assert_allclose(run("fedavg", server_learning_rate=0.5), expect, rtol=1e-6)


def test_fedprox_server_is_fedavg():
    np.testing.assert_array_equal(run("fedprox", mu=0.3), run("fedavg"))


def test_fedavgm_momentum():
    x, m = X0.astype(np.float64), np.zeros(5)
    for d in DELTAS:
        m = 0.8 * m + d
        x = (x + 0.7 * m).astype(np.float32).astype(np.float64)
    got = run("fedavgm", server_learning_rate=0.7, server_momentum=0.8)
    np.testing.assert_allclose(got, x, rtol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_strategies_follow_the_paper(name):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
    x, m, v = X0.astype(np.float64), np.zeros(5), np.full(5, tau**2)
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        elif name == "fedyogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        x = (x + eta * m / (np.sqrt(v) + tau)).astype(np.float32).astype(np.float64)
    params = {"server_learning_rate": eta, "beta1": b1, "tau": tau}
    if name != "fedadagrad":
        params["beta2"] = b2
    np.testing.assert_allclose(run(name, **params), x, rtol=1e-6)


def test_yogi_and_adam_differ():
    assert not np.array_equal(run("fedadam"), run("fedyogi"))


def test_state_roundtrip_continues_identically():
    settings = StrategySettings("fedadam", {"server_learning_rate": 0.1})
    a = Strategy(settings)
    x = a.step(X0, DELTAS[0])
    saved = {k: v.copy() for k, v in a.state.items()}
    b = Strategy(settings, state=saved)
    np.testing.assert_array_equal(a.step(x, DELTAS[1]), b.step(x, DELTAS[1]))


def test_bad_inputs():
    s = Strategy(StrategySettings("fedavg", {}))
    with pytest.raises(StrategyError, match="shape"):
        s.step(X0, np.zeros(4))
    with pytest.raises(StrategyError, match="NaN"):
        s.step(X0, np.full(5, np.nan))
    with pytest.raises(StrategyError, match="positive"):
        mean_update(np.zeros(3), 0.0)
    np.testing.assert_array_equal(mean_update(np.array([2.0, 4.0]), 2.0), [1.0, 2.0])
