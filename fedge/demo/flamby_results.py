"""FLamby's own Fed-TCGA-BRCA results, seed by seed, so fedge's runs can be placed in
FLamby's seed spread rather than against one mean.

Test C-index of each centre (client_test_0..5), from owkin/FLamby's result files:
``flamby/results/results_benchmark_fed_tcga_brca/tcga_seed42.csv`` and
``tcga_seed45.csv``, ``flamby/new_results/results_benchmark_fed_tcga_brca/
tcga_seed43.csv``, ``tcga_seed44.csv`` and ``tcga_seed46.csv`` (rounded to 4
places). Federated strategies are the ``<Name>100`` rows (100 local updates);
pooled is "Pooled Training"; local-only is each centre's own model on its own
test rows ("Local i" on client_test_i), Adam lr 0.1 for both baselines.
Their means over seeds are FLamby's published numbers (pooled 0.676, FedAvg
0.732 published / 0.726 here, FedProx 0.729, FedAdam and FedYogi 0.815,
FedAdagrad 0.813).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FLAMBY_PER_CLIENT", "Spread", "flamby_spread", "spread"]

_ADAM = {  # FedAdam and FedYogi gave identical rows in every file
    42: (0.8520, 0.6136, 0.8796, 0.5625, 0.9362, 1.0),
    43: (0.8547, 0.6818, 0.8148, 0.4375, 0.8723, 1.0),
    44: (0.8380, 0.6364, 0.9259, 0.7083, 0.9362, 1.0),
    45: (0.8827, 0.6136, 0.8981, 0.7292, 0.8936, 1.0),
    46: (0.8156, 0.7273, 0.8889, 0.5833, 0.8723, 1.0),
}

# method -> seed -> per-centre test C-index
FLAMBY_PER_CLIENT: dict[str, dict[int, tuple[float, ...]]] = {
    "pooled": {
        42: (0.8017, 0.5227, 0.8333, 0.5208, 1.0, 1.0),
        43: (0.7011, 0.8182, 0.8426, 0.4375, 0.9787, 0.6667),
        44: (0.7933, 0.3864, 0.4907, 0.75, 0.6170, 0.6667),
        45: (0.8575, 0.7045, 0.7685, 0.6458, 0.8723, 0.3333),
        46: (0.7123, 0.4773, 0.5926, 0.7917, 0.3617, 0.3333),
    },
    "local-only": {
        42: (0.6453, 0.4773, 0.8796, 0.5625, 0.9149, 0.6667),
        43: (0.6592, 0.4318, 0.8333, 0.625, 0.8936, 0.6667),
        44: (0.6732, 0.5, 0.8796, 0.5625, 0.8298, 0.6667),
        45: (0.5782, 0.5455, 0.7963, 0.6458, 0.8511, 0.6667),
        46: (0.6648, 0.6818, 0.8611, 0.5833, 0.7660, 0.6667),
    },
    "fedavg": {
        42: (0.7570, 0.75, 0.7593, 0.625, 0.9787, 1.0),
        43: (0.5754, 0.2273, 0.3519, 0.8333, 0.1277, 0.3333),
        44: (0.7737, 0.7727, 0.7593, 0.5833, 1.0, 1.0),
        45: (0.8352, 0.6591, 0.8056, 0.7708, 0.8511, 1.0),
        46: (0.7821, 0.7273, 0.7778, 0.5625, 0.9787, 1.0),
    },
    "fedprox": {
        42: (0.7039, 0.7955, 0.7315, 0.6042, 0.9574, 1.0),
        43: (0.5726, 0.25, 0.3333, 0.8542, 0.2340, 0.3333),
        44: (0.7598, 0.7727, 0.75, 0.5625, 1.0, 1.0),
        45: (0.8268, 0.7955, 0.7685, 0.7917, 0.7872, 1.0),
        46: (0.7095, 0.7273, 0.75, 0.5208, 0.9787, 1.0),
    },
    "fedadam": _ADAM,
    "fedyogi": _ADAM,
    "fedadagrad": {
        42: (0.8184, 0.7273, 0.8519, 0.5833, 0.9362, 1.0),
        43: (0.8464, 0.5909, 0.8796, 0.7083, 0.8723, 1.0),
        44: (0.8575, 0.5682, 0.8889, 0.7083, 0.8298, 1.0),
        45: (0.8464, 0.6136, 0.8981, 0.7083, 0.7872, 1.0),
        46: (0.8715, 0.6136, 0.8426, 0.6875, 0.8511, 1.0),
    },
    "scaffold": {
        42: (0.5838, 0.7727, 0.6389, 0.5625, 0.9149, 0.6667),
        43: (0.5642, 0.7273, 0.6204, 0.5417, 0.8085, 1.0),
        44: (0.6620, 0.6136, 0.7130, 0.3125, 0.9787, 0.6667),
        45: (0.5615, 0.9318, 0.7315, 0.5625, 0.9362, 0.6667),
        46: (0.5922, 0.7273, 0.6759, 0.2917, 0.9149, 0.6667),
    },
}


@dataclass(frozen=True)
class Spread:
    """Per-seed means of the per-centre C-index, summarised."""

    per_seed: tuple[float, ...]
    mean: float
    sd: float  # sample standard deviation over seeds (ddof=1)
    low: float
    high: float

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies within one seed standard deviation of the mean."""
        return abs(value - self.mean) <= self.sd


def spread(per_seed: list[float] | tuple[float, ...]) -> Spread:
    """Raises: ValueError: fewer than two seeds (no spread)."""
    v = np.asarray(per_seed, dtype=np.float64)
    if v.size < 2:
        raise ValueError(f"a seed spread needs at least 2 seeds, got {v.size}")
    return Spread(
        tuple(float(x) for x in v),
        float(v.mean()),
        float(v.std(ddof=1)),
        float(v.min()),
        float(v.max()),
    )


def flamby_spread(method: str) -> Spread:
    """FLamby's seed spread of the mean per-centre test C-index for ``method``.

    Raises:
        KeyError: a method FLamby's files do not hold (the known ones are named).
    """
    if method not in FLAMBY_PER_CLIENT:
        raise KeyError(f"no FLamby results for {method!r}; known: {sorted(FLAMBY_PER_CLIENT)}")
    seeds = FLAMBY_PER_CLIENT[method]
    return spread([float(np.mean(seeds[s])) for s in sorted(seeds)])
