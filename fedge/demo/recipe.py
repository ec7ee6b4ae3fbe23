"""fedge's recommended recipe for tabular survival data, chosen by federated cross-validation.

The recipe is a procedure, not a fit to one data set: a small fixed grid of
candidates (standardisation, regularisation, server strategy) is scored by
K-fold cross-validation *inside each centre's training split*: for fold k,
every centre holds out its k-th fold of training rows as validation, the
federation trains on the rest, and the score is the mean per-centre validation
C-index. Test rows are dropped before anything else happens. The candidate
with the best mean score over folds wins; ties go to the simpler candidate
(earlier in the grid).

The grid (Cox model, batch 8, 100 local SGD steps per round, 5 rounds):

- standardise: "continuous" (z-score non-binary columns, fitted per centre on
  its own training rows) or "all" (every column);
- weight decay 0 or 0.01 (L2 regularisation of the Cox coefficients);
- strategy: FedAvg (client lr 0.05) or FedAdam (client lr 0.01, server lr
  0.03 or 0.1, beta1 0.9, beta2 0.999, tau 1e-8: Reddi et al.'s settings that
  FLamby also uses).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedge.coordinator.plan import StrategySettings
from fedge.demo.sim import run_federation, site_metrics
from fedge.train.api import ModelSpec, SiteData, TrainConfig, build_model, flatten
from fedge.train.data import Split, Standardiser

__all__ = ["CVRow", "Candidate", "cross_validate", "survival_candidates", "with_standardiser"]


@dataclass(frozen=True)
class Candidate:
    name: str
    standardise: str
    strategy: StrategySettings
    train: TrainConfig
    rounds: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "standardise": self.standardise,
            "strategy": self.strategy.name,
            "strategy_params": dict(self.strategy.params),
            "train": self.train.to_dict(),
            "rounds": self.rounds,
        }


def survival_candidates(rounds: int = 5) -> list[Candidate]:
    """The default grid for any tabular survival data set (see the module docstring)."""
    out: list[Candidate] = []
    adam = {"beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
    for std in ("continuous", "all"):
        for wd in (0.0, 0.01):
            base = TrainConfig(steps=100, batch_size=8, lr=0.05, weight_decay=wd)
            out.append(
                Candidate(
                    f"fedavg std={std} wd={wd:g}",
                    std,
                    StrategySettings("fedavg", {"server_learning_rate": 1.0}),
                    base,
                    rounds,
                )
            )
            for slr in (0.03, 0.1):
                out.append(
                    Candidate(
                        f"fedadam slr={slr:g} std={std} wd={wd:g}",
                        std,
                        StrategySettings("fedadam", {"server_learning_rate": slr, **adam}),
                        replace(base, lr=0.01),
                        rounds,
                    )
                )
    return out


def with_standardiser(
    raw: SiteData, mode: str, train_idx: np.ndarray, val_idx: np.ndarray
) -> SiteData:
    """A fold of an unstandardised site: standardiser fitted on the fold's training rows."""
    x, y = raw.train.x, raw.train.y
    std = Standardiser.fit(x[train_idx], mode)
    return SiteData(
        name=raw.name,
        task=raw.task,
        feature_names=raw.feature_names,
        train=Split(std.transform(x[train_idx]), y[train_idx]),
        val=Split(std.transform(x[val_idx]), y[val_idx]) if val_idx.size else None,
        test=None,
        standardiser=std,
        n_classes=raw.n_classes,
        info=dict(raw.info),
    )


@dataclass
class CVRow:
    candidate: Candidate
    fold_scores: list[float]

    @property
    def score(self) -> float:
        return float(np.mean(self.fold_scores))


def cross_validate(
    spec: ModelSpec,
    raw_sites: Sequence[SiteData],
    candidates: Sequence[Candidate],
    *,
    folds: int = 3,
    seed: int = 0,
    on_row: Callable[[CVRow], None] | None = None,
) -> list[CVRow]:
    """Score each candidate by federated K-fold CV inside the centres' training splits.

    ``raw_sites`` must be loaded with ``standardise="none"`` and ``val_fraction=0``;
    their test splits are ignored. Returns one row per candidate, in grid order.

    Raises:
        ValueError: folds < 2, or a site with fewer training rows than folds.
    """
    if folds < 2:
        raise ValueError(f"folds={folds} must be >= 2")
    rng = np.random.default_rng(seed)
    fold_of: dict[str, np.ndarray] = {}
    for s in raw_sites:
        n = len(s.train)
        if n < folds:
            raise ValueError(f"site {s.name!r} has {n} training rows, fewer than folds={folds}")
        fold_of[s.name] = rng.permutation(n) % folds
    rows: list[CVRow] = []
    init = flatten(build_model(spec))
    for cand in candidates:
        scores = []
        for k in range(folds):
            fold_sites = [
                with_standardiser(
                    s,
                    cand.standardise,
                    np.flatnonzero(fold_of[s.name] != k),
                    np.flatnonzero(fold_of[s.name] == k),
                )
                for s in raw_sites
            ]
            cfg = replace(cand.train, seed=seed + k)
            res = run_federation(
                spec, fold_sites, cfg, cand.strategy, cand.rounds, init=init, eval_split=None
            )
            scores.append(site_metrics(spec, res.weights, fold_sites, "val")["mean"]["c_index"])
        row = CVRow(cand, scores)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def best(rows: Sequence[CVRow]) -> CVRow:
    """The winning row: highest mean score; the earlier candidate on a tie.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("no cross-validation rows")
    top = max(r.score for r in rows if np.isfinite(r.score))
    return next(r for r in rows if r.score == top)
