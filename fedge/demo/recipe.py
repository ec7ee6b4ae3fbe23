"""fedge's recommended recipe for tabular survival data, chosen by federated cross-validation.

The recipe is a procedure, not a fit to one data set: a small fixed grid of
candidates (standardisation, regularisation, schedule) is scored by K-fold
cross-validation *inside each centre's training split*: for fold k, every
centre holds out its k-th fold of training rows, the federation trains on the
rest, and each round's global model is scored on the held-out folds.
Test rows are never loaded. The schedule (number of rounds) is read off the
same runs at ``CHECK_ROUNDS``. The lowest mean held-out loss over folds wins;
ties go to the earlier candidate and the shorter schedule. The winner is then
trained on each centre's whole training split for ``refit_rounds``: the CV
schedule scaled by K/(K-1), so the refit makes as many passes (epochs) over
the larger training split as the CV runs made over theirs (with a fixed number
of local steps per round, rounds count steps, not passes; the usual rule for
refitting an early-stopped learner on all its training data).

The criterion is the cross-validated Cox partial likelihood (Verweij and van
Houwelingen, 1993; what glmnet's Cox CV minimises): the size-weighted mean of
the centres' held-out negative log partial likelihood per event, as the
coordinator's federated evaluation reports it. The held-out C-index is shown
beside it but does not choose: on folds of ~13 rows at the smallest centre it
moves by less than its noise between candidates and schedules (0.729-0.736 on
Fed-TCGA-BRCA), so a choice by C-index is a draw, and it drew an undertrained
5-round schedule once the local data walk became FLamby's epoch stream.

The grid (Cox model, batch 8, 100 local SGD steps per round, up to 20 rounds;
each centre z-scores its non-binary columns with statistics of its own
training rows):

- FedAvg, client lr 0.05, no weight decay;
- FedAvg, client lr 0.05, L2 weight decay 0.01;
- FedAdam (Reddi et al.; server lr 0.1, beta1 0.9, beta2 0.999, tau 1e-8),
  client lr 0.01, no weight decay.

bench/flamby_tcga.py runs this grid through the real federation
(``DatasetSpec.cv_folds``); ``cross_validate`` here runs it in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedge.coordinator.plan import StrategySettings
from fedge.demo.sim import run_federation
from fedge.train.api import ModelSpec, SiteData, TrainConfig, build_model, flatten
from fedge.train.data import Split, Standardiser

__all__ = [
    "CVRow",
    "Candidate",
    "cross_validate",
    "refit_rounds",
    "survival_candidates",
    "with_standardiser",
]


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


CHECK_ROUNDS = (5, 10, 15, 20)


def survival_candidates(rounds: int = 20) -> list[Candidate]:
    """The default grid for any tabular survival data set (see the module docstring)."""
    fedavg = StrategySettings("fedavg", {"server_learning_rate": 1.0})
    fedadam = StrategySettings(
        "fedadam", {"server_learning_rate": 0.1, "beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
    )
    sgd = TrainConfig(steps=100, batch_size=8, lr=0.05)
    return [
        Candidate("fedavg std=continuous wd=0", "continuous", fedavg, sgd, rounds),
        Candidate(
            "fedavg std=continuous wd=0.01",
            "continuous",
            fedavg,
            replace(sgd, weight_decay=0.01),
            rounds,
        ),
        Candidate(
            "fedadam std=continuous wd=0", "continuous", fedadam, replace(sgd, lr=0.01), rounds
        ),
    ]


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
    """One candidate's CV results per schedule, each a list over folds: held-out C-index
    (``fold_scores``, shown) and held-out Cox loss (``fold_losses``, chooses)."""

    candidate: Candidate
    fold_scores: dict[int, list[float]]
    fold_losses: dict[int, list[float]]

    @property
    def scores(self) -> dict[int, float]:
        return {r: float(np.mean(v)) for r, v in self.fold_scores.items()}

    @property
    def losses(self) -> dict[int, float]:
        return {r: float(np.mean(v)) for r, v in self.fold_losses.items()}

    @property
    def best_rounds(self) -> tuple[int, float]:
        """(rounds, mean held-out loss) of the lowest loss; the shorter schedule on ties."""
        low = min(self.losses.values())
        return next((r, s) for r, s in sorted(self.losses.items()) if s == low)


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
        checks = [r for r in CHECK_ROUNDS if r <= cand.rounds] or [cand.rounds]
        per_round: dict[int, list[float]] = {r: [] for r in checks}
        per_round_loss: dict[int, list[float]] = {r: [] for r in checks}
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

            def record(
                r: int,
                rec: dict[str, Any],
                acc: dict[int, list[float]] = per_round,
                acc_loss: dict[int, list[float]] = per_round_loss,
            ) -> None:
                if r in acc:  # the round-r global model, evaluated on the held-out folds
                    acc[r].append(rec["val"]["weighted"].get("c_index", float("nan")))
                    acc_loss[r].append(rec["val"]["weighted"]["loss"])

            run_federation(
                spec,
                fold_sites,
                cfg,
                cand.strategy,
                max(checks),
                init=init,
                eval_split="val",
                on_round=record,
            )
        row = CVRow(cand, per_round, per_round_loss)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def refit_rounds(cv_rounds: int, folds: int) -> int:
    """Rounds on the whole training split that match ``cv_rounds`` on (K-1)/K of it in
    passes over the data: ``round(cv_rounds * K / (K - 1))``.

    Raises:
        ValueError: cv_rounds < 1 or folds < 2.
    """
    if cv_rounds < 1 or folds < 2:
        raise ValueError(f"cv_rounds={cv_rounds} must be >= 1 and folds={folds} >= 2")
    return max(1, round(cv_rounds * folds / (folds - 1)))


def best(rows: Sequence[CVRow]) -> tuple[CVRow, int]:
    """The winning (row, rounds): lowest mean held-out loss; earlier candidate, fewer
    rounds on ties.

    Raises:
        ValueError: no rows.
    """
    if not rows:
        raise ValueError("no cross-validation rows")
    low = min(r.best_rounds[1] for r in rows)
    row = next(r for r in rows if r.best_rounds[1] == low)
    return row, row.best_rounds[0]
