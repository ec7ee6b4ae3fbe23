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
    SCAFFOLD    x ← x + η·Δ̄;  c ← (N_old/N)·c + (n_S/N)·Δc̄

SCAFFOLD (Karimireddy et al. 2020, option II; FLamby's ``Scaffold``): the server
keeps the control variate c (state ``"c"``, starts at 0) and sends it with every
task; site i trains with the correction (c − c_i) and also returns
Δc_i = c_i⁺ − c_i. The paper keeps c = (1/N)·Σ_i c_i over all N clients with
c ← c + (|S|/N)·mean_S Δc_i. Here Δc̄ is the same example-weighted mean as Δ̄
(the coordinator sees only sums: Σ_S n_i·Δc_i / n_S, n_S = Σ_S n_i), so the
invariant kept is the example-weighted one,

    c = Σ_i n_i·c_i / N,   N = Σ_i n_i over every site the job has seen,

and the factor that keeps it is n_S/N, not |S|/N (with n = 10, 20, 30 and the
30-example site left out, |S|/N = 2/3 but n_S/N = 1/2). "Seen" means a site that
reported its example count n_i in a TrainDone of a summed round (whether or not
its own update was summed); until then it holds c_i = 0 and weighs nothing, and
the round that first counts it scales c by N_old/N (its c_i = 0 joins the mean).
n_i is each site's last count: a site whose count changes after its c_i moved
makes the invariant approximate by (n_i' − n_i)·c_i/N, which the coordinator
cannot correct (it never sees c_i). The table of sites (state ``"sites/<site>"``:
[n_i, the last round whose sum held its Δc_i]) is part of the checkpoint; the
second number tells each site which of its Δc_i the server's c holds
(fedge.wire.messages.ControlCommit), since c_i may move only by those. A
checkpoint written by fedge < 0.2 holds c and no table; the coordinator rebuilds the
table from its database when it resumes such a job (:meth:`Strategy.restore_sites`).

m starts at 0 and v at τ² (the paper's v₋₁ ≥ τ²). The state (m, v) is part of
every checkpoint, so a resumed job continues bit for bit. Arithmetic is in
float64; the global model is stored as float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedge.coordinator.plan import STRATEGIES, StrategySettings

# SCAFFOLD's table of sites in ``Strategy.state``: "sites/<site>" -> [n_i, last summed round]
SITE_KEY = "sites/"


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

    def sites(self) -> dict[str, tuple[int, int]]:
        """SCAFFOLD's table of the sites seen: {site: (n_i, last round whose sum held
        its Δc_i, 0: none)} (module doc)."""
        out = {}
        for key, buf in self.state.items():
            if key.startswith(SITE_KEY) and buf.shape == (2,):
                out[key[len(SITE_KEY):]] = (int(buf[0]), int(buf[1]))
        return out

    def restore_sites(self, counts: Mapping[str, int], summed: Mapping[str, int]) -> list[str]:
        """Rebuild SCAFFOLD's table of sites for a state that has none: a checkpoint of a
        job an earlier fedge (< 0.2) committed, which kept only c. ``counts`` is each
        site's last n_i of a committed round (its TrainDone's count, stored with its
        train metrics), ``summed`` the last committed round whose survivors held each
        site (0 or absent: none). Sites in ``summed`` without a count cannot be weighed
        and are left out (returned, for the caller to report); c is kept as it is.

        Raises:
            StrategyError: the state has a table already, or a count or round is bad.
        """
        if self.sites():
            raise StrategyError("the strategy state has a table of sites already")
        bad = {s: n for s, n in counts.items() if not (isinstance(n, int) and n >= 1)}
        bad |= {s: r for s, r in summed.items() if not (isinstance(r, int) and r >= 0)}
        if bad:
            raise StrategyError(f"site counts or rounds {bad} are not integers >= 1 (>= 0)")
        uncounted = sorted(s for s, r in summed.items() if r > 0 and s not in counts)
        for site, n in counts.items():
            self.state[SITE_KEY + site] = np.array([n, summed.get(site, 0)], dtype=np.float64)
        return uncounted

    def summed_round(self, site: str) -> int:
        """The last committed round whose sum held ``site``'s Δc_i (0: none): what its
        c_i may have moved by (fedge.wire.messages.ControlCommit). One lookup: it is
        asked for every site of a cohort."""
        buf = self.state.get(SITE_KEY + site)
        return int(buf[1]) if buf is not None and buf.shape == (2,) else 0

    def step(self, global_weights: np.ndarray, mean_update: np.ndarray, *,
             mean_control: np.ndarray | None = None,
             examples: Mapping[str, int] | None = None,
             survivors: Sequence[str] = (), round: int = 0) -> np.ndarray:
        """Return the next global model (float32); updates ``state`` in place.

        ``mean_control`` (Δc̄) is SCAFFOLD's and required by it; other strategies
        refuse it. SCAFFOLD also takes ``examples`` (n_i of every site that trained
        in this round: TrainDone's count), ``survivors`` (those of them whose update
        the sum holds) and ``round`` (the round number, recorded as each survivor's
        last summed round): c ← (N_old/N)·c + (n_S/N)·Δc̄ (module doc). Without
        ``examples`` every site of the job is taken to be in every sum with an
        unchanged count (a reference computation): c ← c + Δc̄.

        Raises:
            StrategyError: shapes differ, the update holds NaN/inf, ``mean_control``
                is missing (SCAFFOLD) or given (any other strategy), or the SCAFFOLD
                site counts are inconsistent (a survivor without a count, a count
                below 1, a round below 1).
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
            if examples is None:
                c = self._buf("c", delta.shape, 0.0)
                c += dc
            else:
                self._control_step(dc, examples, survivors, round)
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

    def _control_step(self, dc: np.ndarray, examples: Mapping[str, int],
                      survivors: Sequence[str], rnd: int) -> None:
        """c ← (N_old/N)·c + (n_S/N)·Δc̄ and the sites table (module doc); nothing
        changes when the inputs are refused."""
        bad = {s: n for s, n in examples.items() if not (isinstance(n, int) and n >= 1)}
        if bad:
            raise StrategyError(f"example counts {bad} are not integers >= 1")
        missing = sorted(set(survivors) - set(examples))
        if missing:
            raise StrategyError(f"survivors {missing} have no example count")
        if not survivors:
            raise StrategyError("no survivor: a control update needs at least one")
        if not (isinstance(rnd, int) and rnd >= 1):
            raise StrategyError(f"round {rnd!r} is not an integer >= 1")
        table = self.sites()
        n_old = sum(n for n, _ in table.values())
        for site, n in examples.items():
            table[site] = (n, table.get(site, (0, 0))[1])
        for site in survivors:
            table[site] = (table[site][0], rnd)
        n_all = sum(n for n, _ in table.values())
        n_summed = sum(examples[s] for s in set(survivors))
        c = self._buf("c", dc.shape, 0.0)
        c *= n_old / n_all
        c += (n_summed / n_all) * dc
        for site, (n, last) in table.items():
            self.state[SITE_KEY + site] = np.array([n, last], dtype=np.float64)

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
