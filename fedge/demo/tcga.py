"""Fed-TCGA-BRCA specifics shared by `fedge demo` and bench/flamby_tcga.py.

FLamby's benchmark protocol (owkin/FLamby, ``flamby/config_tcga_brca.json``
and the dataset's ``common.py``): Linear(39, 1) Cox model, batch 8, 100 local
SGD steps per round, 5 rounds, per-strategy learning rates below, seeds 42-46.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.train import metrics as M
from fedge.train.api import DatasetSpec, ModelSpec, SiteData, load_site_data, predict

__all__ = [
    "CENTRES",
    "FLAMBY_PUBLISHED",
    "FLAMBY_STRATEGIES",
    "JobPlan",
    "default_data_dir",
    "load_centres",
    "pooled_test_cindex",
    "site_tables",
]

CENTRES = 6
SEEDS = (42, 43, 44, 45, 46)
FLAMBY_PUBLISHED = {  # mean per-client test C-index over clients x 5 seeds (FLamby paper)
    "pooled": 0.676,
    "fedavg": 0.732,
    "fedprox": 0.729,
    "fedadam": 0.815,
    "fedyogi": 0.815,
    "fedadagrad": 0.813,
}
_ADAPTIVE = {"beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
# strategy -> (client learning rate, strategy table) from FLamby's config_tcga_brca.json
FLAMBY_STRATEGIES: dict[str, tuple[float, dict[str, float]]] = {
    "fedavg": (0.1, {"server_learning_rate": 1.0}),
    "fedprox": (0.1, {"server_learning_rate": 1.0, "mu": 0.1}),
    "fedadam": (0.01, {"server_learning_rate": 0.1, **_ADAPTIVE}),
    "fedyogi": (0.01, {"server_learning_rate": 0.1, **_ADAPTIVE}),
    "fedadagrad": (0.01, {"server_learning_rate": 1.0, "beta1": 0.9, "tau": 1e-8}),
}
COX39 = {"in_features": 39}


def default_data_dir() -> Path:
    """``<repo>/../shared/data/fed_tcga_brca`` (the repo is two levels above this file)."""
    return Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"


def dataset_table(
    data_dir: Path,
    centre: int,
    name: str,
    standardise: str,
    *,
    cv: tuple[int, int] | None = None,
    val_fraction: float = 0.0,
) -> dict[str, Any]:
    table: dict[str, Any] = {
        "name": name,
        "kind": "fed_tcga_brca",
        "path": str(Path(data_dir).resolve()),
        "site": centre,
        "val_fraction": val_fraction,
        "standardise": standardise,
    }
    if cv is not None:
        table["cv_folds"], table["cv_fold"] = cv[0], cv[1]
    return table


def site_tables(
    data_dir: Path, variants: Sequence[tuple[str, str, tuple[int, int] | None]]
) -> dict[str, list[dict[str, Any]]]:
    """``{site id: [[datasets]] tables}``; variants are (dataset name, standardise, cv)."""
    return {
        f"centre-{c}": [dataset_table(data_dir, c, n, s, cv=cv) for n, s, cv in variants]
        for c in range(CENTRES)
    }


def load_centres(data_dir: Path, standardise: str, *, val_fraction: float = 0.0) -> list[SiteData]:
    """The six centres as their agents load them (same table, same standardisation)."""
    return [
        load_site_data(
            DatasetSpec(
                **dataset_table(data_dir, c, f"centre-{c}", standardise, val_fraction=val_fraction)
            )
        )
        for c in range(CENTRES)
    ]


def pooled_test_cindex(weights: np.ndarray, centres: Sequence[SiteData]) -> float:
    """C-index of one model over all centres' test rows together (each row standardised
    by its own centre's standardiser, as the centre would serve it)."""
    spec = ModelSpec("cox_linear", COX39)
    risks, ys = [], []
    for c in centres:
        assert c.test is not None
        risks.append(predict(spec, weights, c.test.x).reshape(-1))
        ys.append(c.test.y)
    y = np.concatenate(ys)
    return M.concordance_index(y[:, 1], np.concatenate(risks), y[:, 0])


@dataclass
class JobPlan:
    """The pieces of a plan; ``text()`` renders the coordinator's TOML."""

    dataset: str
    rounds: int
    seed: int
    strategy: str
    strategy_params: Mapping[str, float]
    lr: float
    steps: int = 100
    batch_size: int = 8
    weight_decay: float = 0.0
    model: str = "cox_linear"
    model_params: Mapping[str, Any] = field(default_factory=lambda: dict(COX39))
    secagg: bool = True
    clip: float = 100.0  # per-coordinate bound of an update under SecAgg; wide: no clipping
    min_clients: int = CENTRES
    eval_split: str = "test"

    def text(self) -> str:
        params = {**self.model_params, "seed": self.seed}
        p = ", ".join(f"{k} = {v!r}" for k, v in params.items())
        strat = "\n".join(f"{k} = {v!r}" for k, v in self.strategy_params.items())
        return (
            f'[job]\ndataset = "{self.dataset}"\nrounds = {self.rounds}\n'
            f"min_clients = {self.min_clients}\nseed = {self.seed}\n"
            f'eval_split = "{self.eval_split}"\n'
            f'[model]\nname = "{self.model}"\nparams = {{ {p} }}\n'
            f"[train]\nsteps = {self.steps}\nbatch_size = {self.batch_size}\n"
            f"learning_rate = {self.lr!r}\nweight_decay = {self.weight_decay!r}\n"
            f'[strategy]\nname = "{self.strategy}"\n{strat}\n'
            f"[secagg]\nenabled = {'true' if self.secagg else 'false'}\nalpha = 0.1\n"
            f"delta = 0.0\nclip = {self.clip!r}\n"
            "[deadlines]\ncohort_s = 60\ntrain_s = 120\nsecagg_stage_s = 30\neval_s = 60\n"
        )


def per_site_cindex(rows: Sequence[Mapping[str, Any]], split: str = "test") -> dict[str, float]:
    """{site: c_index on ``split``} from one round's metric rows ('*' aggregate excluded)."""
    return {
        r["site"]: float(r["value"])
        for r in rows
        if r["site"] != "*" and r["name"] == "c_index" and r["split"] == split
    }
