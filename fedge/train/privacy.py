"""Differential privacy: record-level DP-SGD, client-level DP-FedAvg, and the accountant.

Record-level DP-SGD (Abadi et al. 2016): each step samples a batch by Poisson
sampling with rate q = batch_size / n, computes per-example gradients
(``torch.func``: ``vmap(grad(...))``, or ``jacrev`` of the per-example loss
terms for Cox models), clips each to L2 norm C, sums, adds N(0, (sigma*C)^2)
and divides by the expected batch size. Privacy is accounted with Google's
``dp_accounting`` PLD accountant on the composition of Poisson-sampled
Gaussian mechanisms, for replacing one record (``REPLACE_ONE``: a site's record
count leaves with its updates, so add/remove neighbours could be told apart), so
ε is what the maintained library says, not a formula of ours
(``fedge.train.accounting``).

Cox models: the partial likelihood couples a record to the risk sets of
others. We clip each record's own loss term (its event term with the batch
risk set), but a record also enters the denominators of every earlier event in
its batch, so removing one record can move the clipped sum by up to about
(2b - 1)·C for a batch of b, not C. The ε reported for a Cox model is therefore
that of the per-term mechanism, not a record-level bound: the plan must opt in
(``[privacy.dp] cox_per_term = true``; the coordinator's plan check and
``local_train`` refuse it otherwise), and the ledger and the round's metrics
label it (``per_loss_term``, ``epsilon_per_loss_term``). For classification
and regression ε is the record-level bound.

Randomness: the Poisson sampling and every noise draw come from keys of 16
fresh bytes from the OS (``os.urandom``) that are never stored or sent, expanded
by the compiled core's AES-128-CTR (``secret_uniform``, ``secret_gaussian``).
Noise derived from the job's training seed, which the coordinator chooses,
could be regenerated and subtracted by the coordinator: the ε would then
protect nothing. So DP rounds are not bit-reproducible; everything else in
``local_train`` still is.

Each site keeps a ``PrivacyLedger`` (JSON-serialisable) of every training run
whose update can leave it, with its mechanism (``dp_sgd``, ``dp_fedavg``, or
``none``, which makes any ε it is part of unbounded), each run pending until its
output can leave the site, then released; ``epsilon`` composes the released runs
only (a pending run whose update never left spends nothing): per round and
cumulative, per job. DP-FedAvg is accounted client-level (one Gaussian release a
round, q = 1, neighbours replacing one site's data).

DP-FedAvg and colluding sites: each site adds its share of the noise, sized so that
the shares of the honest sites alone carry N(0, (zS)^2). A site that assumes up to f
of the K sites of the cohort could collude with the coordinator (agent.toml
``[privacy] max_colluders``; they could leave their own noise out and subtract what
they know) adds N(0, (zS)^2 / (K - f)), not / K: the K - f honest shares still sum to
(zS)^2, so the ε accounted at z holds for it (with no colluder the sum carries more
noise than z asks: the price of the assumption). K - f < 1 is refused
(`honest_sites`).

DP-FedAvg's ε is an approximation: before the sum, each site clips its noised share
elementwise to ``secagg.clip`` and rounds it stochastically onto secure
aggregation's fixed-point grid (``fedge.agent.runtime``; the rounding keyed by the
coordinator's ``quant_seed``). That is not post-processing of the summed Gaussian,
so the ε accounted (a Gaussian mechanism on the sum) is exact only up to those
per-share steps. The plan check keeps the clip at 6 standard deviations or more of a
share sized for K sites (``fedge.coordinator.plan``): clipping touches about 2e-9 of
a share's coordinates (some 2e-3 a round for a 10^6-parameter model; a share sized
for K - f sites is sqrt(K / (K - f)) wider and clipped more often), and rounding
moves each by less than one grid step. A distributed discrete Gaussian or Skellam
mechanism with its own accounting (Kairouz et al. 2021) would close the gap. (For
DP-SGD the same steps are post-processing of the site's own DP output, and harmless.)

Plan validation: ``check_dp_plan`` is what the coordinator calls on a plan
with a ``target_epsilon``; it raises ``PrivacyBudgetError`` with the numbers
when the rounds asked cannot meet the target.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedge.train.accounting import (
    COX_DP_RULE,
    PrivacyBudgetError,
    PrivacyLedger,
    calibrate_noise,
    check_dp_plan,
    epsilon_for,
)

__all__ = [
    "COX_DP_RULE",
    "ClientDPConfig",
    "DPConfig",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "calibrate_noise",
    "check_dp_plan",
    "dp_fedavg_privatise",
    "dp_fedavg_share_std",
    "epsilon_for",
    "honest_sites",
    "noisy_clipped_gradient",
    "private_gradient",
]


@dataclass(frozen=True)
class DPConfig:
    """Record-level DP-SGD settings of a plan (``[train.dp]``)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    # Cox models: the plan accepts an ε per loss term, not per record (module docstring)
    cox_per_term: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPConfig:
        """Raises:
        ValueError: unknown key or a value out of range (named).
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"train.dp: unknown key(s) {unknown}")
        if "noise_multiplier" not in d:
            raise ValueError("train.dp: missing required key 'noise_multiplier'")
        cfg = cls(**{k: (v if k == "cox_per_term" or v is None else float(v))
                     for k, v in d.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises:
        ValueError: naming the field, value and rule.
        """
        if not self.noise_multiplier > 0:
            raise ValueError(f"train.dp.noise_multiplier={self.noise_multiplier} must be > 0")
        if not self.max_grad_norm > 0:
            raise ValueError(f"train.dp.max_grad_norm={self.max_grad_norm} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"train.dp.delta={self.delta} must lie in (0, 1)")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"train.dp.target_epsilon={self.target_epsilon} must be > 0")
        if not isinstance(self.cox_per_term, bool):
            raise ValueError(f"train.dp.cox_per_term={self.cox_per_term!r} must be true or false")


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each update, noise the sum.

    Under secure aggregation no one sees an individual update, so each client adds
    its share N(0, (z*S)^2 / cohort_size); the sum carries N(0, (z*S)^2). A site that
    assumes f colluders adds N(0, (z*S)^2 / (cohort_size - f)) (`dp_fedavg_share_std`;
    module docstring). (An update seen alone carries z/sqrt(cohort_size): a cohort
    above 1 needs secure aggregation, which the plan check and the agent's guard
    require.)

    Checked when made (`validate`): clip_norm > 0, noise_multiplier > 0 (without
    noise DP-FedAvg only clips: no ε), cohort_size >= 1.
    """

    clip_norm: float
    noise_multiplier: float
    cohort_size: int

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClientDPConfig:
        """Raises:
        ValueError: unknown or missing key, or a value out of range (named).
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"train.client_dp: unknown key(s) {unknown}")
        for key in cls.__dataclass_fields__:
            if key not in d:
                raise ValueError(f"train.client_dp: missing required key {key!r}")
        return cls(float(d["clip_norm"]), float(d["noise_multiplier"]), int(d["cohort_size"]))

    def validate(self) -> None:
        """Raises:
        ValueError: naming the field, value and rule.
        """
        if not self.clip_norm > 0:
            raise ValueError(f"train.client_dp.clip_norm={self.clip_norm} must be > 0")
        if not self.noise_multiplier > 0:
            raise ValueError(
                f"train.client_dp.noise_multiplier={self.noise_multiplier} must be > 0: "
                "without noise DP-FedAvg only clips, and the update leaves the site as "
                "trained (no epsilon)"
            )
        if self.cohort_size < 1:
            raise ValueError(f"train.client_dp.cohort_size={self.cohort_size} must be >= 1")


KEY_BYTES = 16


def _key(key: bytes | None) -> bytes:
    if key is None:
        return os.urandom(KEY_BYTES)
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"a noise key is {KEY_BYTES} bytes, got {key!r:.40}")
    return key


def secret_gaussian(n: int, std: float, *, key: bytes | None = None) -> np.ndarray:
    """``n`` float32 draws of N(0, std^2) under a key nobody else holds.

    ``key``: 16 bytes; by default fresh from the OS and dropped after use (tests
    pass one to check the distribution). The compiled core expands it with
    AES-128-CTR and Box-Muller; without the core, numpy's PCG64 seeded with the
    same 128 bits.
    """
    from fedge.train.optim import core_function

    k = _key(key)
    out = np.zeros(int(n), np.float32)
    if std > 0:
        noise = core_function("add_gaussian_noise")
        if noise is not None:
            noise(out, std=float(std), seed=k)
        else:
            rng = np.random.default_rng(int.from_bytes(k, "little"))
            out += rng.normal(0.0, std, size=out.shape).astype(np.float32)
    return out


def secret_uniform(n: int, *, key: bytes | None = None) -> np.ndarray:
    """``n`` float64 uniforms in [0, 1) under a key nobody else holds (as above):
    words of the core's AES-128-CTR stream / 2^32, or PCG64 without the core."""
    from fedge.train.optim import core_function

    k = _key(key)
    prg = core_function("prg")
    if prg is not None:
        return np.asarray(prg(k, int(n)), dtype=np.float64) / 2.0**32
    return np.random.default_rng(int.from_bytes(k, "little")).random(int(n))


def noisy_clipped_gradient(
    per_example: list[torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    noise_key: bytes | None = None,
) -> tuple[torch.Tensor, float]:
    """Clip per-example gradients, sum, add Gaussian noise, divide by the expected batch.

    ``per_example`` is one tensor per parameter, each (B, *shape). The noise comes
    from ``secret_gaussian`` (a fresh OS key unless ``noise_key`` is given). Returns
    the flat noisy gradient and the fraction of examples that were clipped.
    """
    summed, norms = _clipped_sum(per_example, max_grad_norm)
    return _noised(summed, norms, max_grad_norm=max_grad_norm,
                   noise_multiplier=noise_multiplier, expected_batch=expected_batch,
                   noise_key=noise_key)


# Examples whose per-example gradients are computed at once (uncoupled losses): the
# forward and backward activations of vmap grow with the examples taken together, a
# CNN's by megabytes each, and a Poisson batch has no upper bound
DP_CHUNK = 32


def private_gradient(
    model: torch.nn.Module,
    loss_terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    coupled: bool,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    noise_key: bytes | None = None,
    chunk: int = DP_CHUNK,
) -> tuple[torch.Tensor, float]:
    """`noisy_clipped_gradient` of the batch (x, y), the per-example gradients of an
    uncoupled loss computed, clipped and summed ``chunk`` examples at a time, so that
    memory grows with ``chunk``, not with the sampled batch. A coupled loss (Cox: one
    record's term depends on the batch's others) is taken whole.

    Raises: ValueError: chunk < 1.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    step = x.shape[0] if coupled else chunk
    summed: torch.Tensor | None = None
    norms = []
    for at in range(0, x.shape[0], max(step, 1)):
        grads = per_example_grads(model, loss_terms, x[at:at + step], y[at:at + step],
                                  coupled=coupled)
        part, part_norms = _clipped_sum(grads, max_grad_norm)
        summed = part if summed is None else summed + part
        norms.append(part_norms)
        del grads
    if summed is None:
        raise ValueError("private_gradient of an empty batch")
    return _noised(summed, torch.cat(norms), max_grad_norm=max_grad_norm,
                   noise_multiplier=noise_multiplier, expected_batch=expected_batch,
                   noise_key=noise_key)


def _clipped_sum(per_example: list[torch.Tensor],
                 max_grad_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-example gradients each clipped to max_grad_norm, their norms)."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_example], dim=1)  # (B, P)
    norms = flat.norm(dim=1)
    factors = torch.clamp(max_grad_norm / (norms + 1e-12), max=1.0)
    return (flat * factors[:, None]).sum(dim=0), norms


def _noised(summed: torch.Tensor, norms: torch.Tensor, *, max_grad_norm: float,
            noise_multiplier: float, expected_batch: float,
            noise_key: bytes | None) -> tuple[torch.Tensor, float]:
    noise = torch.from_numpy(
        secret_gaussian(summed.numel(), noise_multiplier * max_grad_norm, key=noise_key)
    ).to(device=summed.device, dtype=summed.dtype)
    noisy = (summed + noise) / expected_batch
    clipped = float((norms > max_grad_norm).float().mean()) if norms.numel() else 0.0
    return noisy, clipped


def per_example_grads(
    model: torch.nn.Module,
    loss_terms: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    coupled: bool,
) -> list[torch.Tensor]:
    """Per-example gradients with torch.func.

    ``loss_terms(output, y)`` returns one loss per example. Uncoupled losses use
    ``vmap(grad)`` over single examples; a coupled loss (Cox partial likelihood)
    uses ``jacrev`` of the vector of terms computed on the whole batch.

    Dropout: under ``vmap`` each example draws its own mask (``randomness=
    "different"``), as it does in a batched forward pass without DP; the gradient
    of one example is that of its own masked forward pass, so clipping it still
    bounds what that example contributes.
    """
    from torch.func import functional_call, grad, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    if coupled:

        def terms(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return loss_terms(functional_call(model, p, (x,)), y)

        jac = jacrev(terms)(params)
        return [jac[k] for k in names]

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_terms(out, yi.unsqueeze(0)).sum()

    g = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return [g[k] for k in names]


def honest_sites(cfg: ClientDPConfig, colluders: int) -> int:
    """The sites of the cohort whose noise a site counts on: ``cohort_size`` less the
    ``colluders`` it assumes (its ``[privacy] max_colluders``).

    Raises: ValueError: colluders not an integer >= 0, or no honest site left (naming
    both settings)."""
    if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 0:
        raise ValueError(f"colluders={colluders!r} must be an integer >= 0")
    honest = cfg.cohort_size - colluders
    if honest < 1:
        raise ValueError(
            f"privacy.client_dp.cohort_size = {cfg.cohort_size} leaves no honest site when "
            f"{colluders} may collude (this site's [privacy] max_colluders = {colluders}): "
            "DP-FedAvg's noise needs cohort_size - max_colluders >= 1")
    return honest


def dp_fedavg_share_std(cfg: ClientDPConfig, colluders: int = 0) -> float:
    """The standard deviation of one site's noise share: z·S / √(K - f), so that the
    K - f honest shares alone sum to N(0, (zS)^2) (module docstring).

    Raises: ValueError: as `honest_sites`."""
    return cfg.noise_multiplier * cfg.clip_norm / math.sqrt(honest_sites(cfg, colluders))


def dp_fedavg_privatise(
    update: np.ndarray, cfg: ClientDPConfig, *, colluders: int = 0,
    seed: bytes | None = None,
) -> tuple[np.ndarray, float]:
    """Clip a client's model update to ``clip_norm`` and add its noise share,
    N(0, (zS)^2 / (K - f)) for K = ``cohort_size`` and f = ``colluders`` (the sites
    this one assumes could collude and leave their noise out; `dp_fedavg_share_std`).

    Uses the compiled core's ``clip_l2`` / ``add_gaussian_noise`` when present
    (same arithmetic in numpy otherwise). The noise key is ``seed`` or, by default,
    16 fresh bytes from the OS that nobody else holds (see the module's note on
    randomness). Returns the privatised update (a copy) and the update's norm
    before clipping.

    Raises: ValueError: as `honest_sites` (no honest site left).
    """
    from fedge.train.optim import core_function

    std = dp_fedavg_share_std(cfg, colluders)
    vec = np.ascontiguousarray(update, dtype=np.float32).copy()
    clip = core_function("clip_l2")
    if clip is not None:
        norm = float(clip(vec, cfg.clip_norm))
    else:
        norm = float(np.linalg.norm(vec.astype(np.float64)))
        if norm > cfg.clip_norm:
            vec *= np.float32(cfg.clip_norm / norm)
    if std > 0:
        vec += secret_gaussian(vec.size, std, key=seed)
    return vec, norm
