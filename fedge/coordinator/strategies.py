"""Server strategies: turn the cohort's average update into the next global model.

The coordinator sees only Σ n_i·Δ_i and Σ n_i (secure aggregation), so every
strategy here is a function of the weighted mean pseudo-gradient
Δ̄ = Σ n_i·Δ_i / Σ n_i, with Δ_i = w_i(local) − w(global). Formulas follow
Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, with
FLamby's parameter names (η = ``server_learning_rate``, β₁ = ``beta1``,
β₂ = ``beta2``, τ = ``tau``):

    FedAvg      x ← x + η·Δ̄
    FedAvgM     m ← μ_s·m + Δ̄;                 x ← x + η·m
    FedProx     as FedAvg on the server; clients add (mu/2)·‖w − x‖²
    FedAdagrad  m ← β₁·m + (1−β₁)·Δ̄;  v ← v + Δ̄²;                         x ← x + η·m/(√v + τ)
    FedAdam     m ← β₁·m + (1−β₁)·Δ̄;  v ← β₂·v + (1−β₂)·Δ̄²;               x ← x + η·m/(√v + τ)
    FedYogi     m ← β₁·m + (1−β₁)·Δ̄;  v ← v − (1−β₂)·Δ̄²·sign(v − Δ̄²);    x ← x + η·m/(√v + τ)
    SCAFFOLD    x ← x + η·Δ̄;  c ← c + (|S|/N)·Δc̄

SCAFFOLD (Karimireddy et al. 2020, option II; FLamby's ``Scaffold``): the server
keeps the control variate c (state ``"c"``, starts at 0) and sends it with every
task; site i trains with the correction (c − c_i) and also returns
Δc_i = c_i⁺ − c_i. Δc̄ is the same example-weighted mean as Δ̄ (the coordinator
sees only sums), |S| the sites whose update was summed, N the round's cohort.

m starts at 0 and v at τ² (the paper's v₋₁ ≥ τ²). The state (m, v) is part of
every checkpoint, so a resumed job continues bit for bit. Arithmetic is in
float64; the global model is stored as float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedge.coordinator.plan import STRATEGIES, StrategySettings


class StrategyError(ValueError):
    """A strategy asked to step with inconsistent inputs."""


@dataclass
class Strategy:
    """One server optimiser; ``state`` holds its named float64 buffers."""

    settings: StrategySettings
    state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.settings.name

    def server_control(self, d: int) -> np.ndarray:
        """SCAFFOLD's c as sent to the sites (float32[d]; zeros before the first round).

        Raises:
            StrategyError: the stored c does not have ``d`` values.
        """
        c = self.state.get("c")
        if c is None:
            return np.zeros(d, dtype=np.float32)
        if c.shape != (d,):
            raise StrategyError(f"strategy state 'c' has shape {c.shape}, expected {(d,)}")
        return c.astype(np.float32)

    def step(self, global_weights: np.ndarray, mean_update: np.ndarray, *,
             mean_control: np.ndarray | None = None, participation: float = 1.0) -> np.ndarray:
        """Return the next global model (float32); updates ``state`` in place.

        ``mean_control`` (Δc̄) and ``participation`` (|S|/N, in (0, 1]) are SCAFFOLD's
        and required by it; other strategies refuse a ``mean_control``.

        Raises:
            StrategyError: shapes differ, the update holds NaN/inf, or ``mean_control``
                is missing (SCAFFOLD) or given (any other strategy).
        """
        x = np.asarray(global_weights)
        delta = np.asarray(mean_update, dtype=np.float64)
        if x.shape != delta.shape or x.ndim != 1:
            raise StrategyError(
                f"mean update shape {delta.shape} does not match global model shape {x.shape}"
            )
        if not np.all(np.isfinite(delta)):
            raise StrategyError("mean update holds NaN or infinite values")
        eta = self.settings.get("server_learning_rate")
        name = self.settings.name
        x64 = x.astype(np.float64)
        if (mean_control is not None) != (name == "scaffold"):
            raise StrategyError(f"strategy {name} {'needs' if name == 'scaffold' else 'takes no'}"
                                " mean control-variate update")
        if name == "scaffold":
            assert mean_control is not None
            dc = np.asarray(mean_control, dtype=np.float64)
            if dc.shape != delta.shape:
                raise StrategyError(f"mean control update shape {dc.shape} does not match "
                                    f"global model shape {x.shape}")
            if not np.all(np.isfinite(dc)):
                raise StrategyError("mean control update holds NaN or infinite values")
            if not 0.0 < participation <= 1.0:
                raise StrategyError(f"participation |S|/N = {participation} is not in (0, 1]")
            c = self._buf("c", delta.shape, 0.0)
            c += participation * dc
            new = x64 + eta * delta
        elif name in ("fedavg", "fedprox"):
            new = x64 + eta * delta
        elif name == "fedavgm":
            m = self._buf("m", delta.shape, 0.0)
            m *= self.settings.get("server_momentum")
            m += delta
            new = x64 + eta * m
        elif name in ("fedadam", "fedyogi", "fedadagrad"):
            b1 = self.settings.get("beta1")
            tau = self.settings.get("tau")
            m = self._buf("m", delta.shape, 0.0)
            v = self._buf("v", delta.shape, tau * tau)
            m *= b1
            m += (1.0 - b1) * delta
            sq = delta * delta
            if name == "fedadagrad":
                v += sq
            elif name == "fedadam":
                b2 = self.settings.get("beta2")
                v *= b2
                v += (1.0 - b2) * sq
            else:
                b2 = self.settings.get("beta2")
                v -= (1.0 - b2) * sq * np.sign(v - sq)
            new = x64 + eta * m / (np.sqrt(v) + tau)
        else:  # parse_plan refuses other names; keep the error for direct callers
            raise StrategyError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
        return new.astype(np.float32)

    def _buf(self, key: str, shape: tuple[int, ...], init: float) -> np.ndarray:
        buf = self.state.get(key)
        if buf is None:
            buf = np.full(shape, init, dtype=np.float64)
            self.state[key] = buf
        elif buf.shape != shape:
            raise StrategyError(f"strategy state {key!r} has shape {buf.shape}, expected {shape}")
        return buf


def mean_update(weighted_sum: np.ndarray, total_weight: float) -> np.ndarray:
    """Δ̄ = Σ w_i·Δ_i / Σ w_i.

    Raises:
        StrategyError: the total weight is not positive.
    """
    if not total_weight > 0:
        raise StrategyError(f"total weight {total_weight} must be positive")
    return np.asarray(weighted_sum, dtype=np.float64) / float(total_weight)
