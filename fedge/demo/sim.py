"""An in-process federation: the same training code and server strategies as the
runtime, without processes or sockets.

Used where a whole federation must run many times cheaply: federated
cross-validation of the recipe's hyper-parameters (inside each centre's
training split), the local-only and pooled baselines, and as the labelled
fallback of the benchmark. The real demo and benchmark go through
``fedge coordinator`` / ``fedge agent`` over ZeroMQ with secure aggregation.

Server arithmetic is the coordinator's own ``fedge.coordinator.strategies``:
the next global model is a function of the size-weighted mean update only,
exactly what secure aggregation reveals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedge.coordinator.plan import StrategySettings
from fedge.coordinator.strategies import Strategy, mean_update
from fedge.train import metrics as M
from fedge.train.api import (
    ClientState,
    ModelSpec,
    SiteData,
    TrainConfig,
    build_model,
    evaluate,
    flatten,
    local_train,
)

__all__ = ["FederationResult", "run_federation", "site_metrics", "train_local_only"]

# (n_i, Δ_i) of the cohort → Σ n_i Δ_i / Σ n_i; secure aggregation may replace it.
Aggregator = Callable[[Sequence[tuple[int, np.ndarray]]], np.ndarray]


def plain_mean(updates: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    total = sum(n for n, _ in updates)
    weighted = sum(n * d.astype(np.float64) for n, d in updates)
    return mean_update(np.asarray(weighted), float(total))


@dataclass
class FederationResult:
    weights: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)


def site_metrics(
    spec: ModelSpec, weights: np.ndarray, sites: Sequence[SiteData], split: str
) -> dict[str, Any]:
    """Per-site metrics on ``split`` plus the size-weighted aggregate and the plain mean."""
    per: list[tuple[int, dict[str, float]]] = []
    names: list[str] = []
    for s in sites:
        part = getattr(s, split)
        if part is None or len(part) == 0:
            continue
        ev = evaluate(spec, weights, s, split)
        per.append((ev.n_examples, ev.metrics))
        names.append(s.name)
    out: dict[str, Any] = {"sites": {n: m for n, (_, m) in zip(names, per, strict=True)}}
    if per:
        out["weighted"] = M.weighted_mean(per)
        keys = {k for _, m in per for k in m}
        out["mean"] = {k: float(np.mean([m[k] for _, m in per if k in m])) for k in keys}
    return out


def run_federation(
    spec: ModelSpec,
    sites: Sequence[SiteData],
    cfg: TrainConfig,
    strategy: StrategySettings,
    rounds: int,
    *,
    init: np.ndarray | None = None,
    eval_split: str | None = "val",
    aggregate: Aggregator = plain_mean,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run ``rounds`` rounds of federated training over ``sites`` in this process.

    Raises:
        ValueError: from the training code (bad weights, bad config) or the strategy.
    """
    weights = flatten(build_model(spec)) if init is None else np.asarray(init, np.float32)
    server = Strategy(strategy)
    states = {s.name: ClientState(job="sim") for s in sites}
    prox = strategy.get("mu") if strategy.name == "fedprox" else 0.0
    if prox and not cfg.prox_mu:
        cfg = TrainConfig(**{**cfg.__dict__, "prox_mu": prox})
    result = FederationResult(weights)
    for r in range(rounds):
        updates = []
        train_losses = []
        for s in sites:
            out = local_train(spec, weights, s, cfg, round=r, state=states[s.name])
            updates.append((out.n_examples, out.weights - weights))
            train_losses.append({**out.metrics, **out.local_metrics}["train_loss"])
        weights = server.step(weights, aggregate(updates))
        record: dict[str, Any] = {"round": r + 1, "train_loss": float(np.mean(train_losses))}
        if eval_split is not None:
            record[eval_split] = site_metrics(spec, weights, sites, eval_split)
        result.history.append(record)
        if on_round is not None:
            on_round(r + 1, record)
    result.weights = weights
    return result


def train_local_only(
    spec: ModelSpec,
    site: SiteData,
    cfg: TrainConfig,
    rounds: int,
    *,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """The centre's model trained on its own data only, same local recipe, same budget."""
    weights = flatten(build_model(spec)) if init is None else np.asarray(init, np.float32)
    state = ClientState(job="local")
    for r in range(rounds):
        weights = local_train(spec, weights, site, cfg, round=r, state=state).weights
    return weights
