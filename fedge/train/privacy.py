"""Differential privacy: record-level DP-SGD, client-level DP-FedAvg, and the accountant.

Record-level DP-SGD (Abadi et al. 2016): each step samples a batch by Poisson
sampling with rate q = batch_size / n, computes per-example gradients
(``torch.func``: ``vmap(grad(...))``, or ``jacrev`` of the per-example loss
terms for Cox models), clips each to L2 norm C, sums, adds N(0, (sigma*C)^2)
and divides by the expected batch size. Privacy is accounted with Google's
``dp_accounting`` RDP accountant on the composition of Poisson-sampled
Gaussian mechanisms, so ε is what the maintained library says, not a formula
of ours.

Cox models: the partial likelihood couples a record to the risk sets of
others. We clip each record's own loss term (its event term with the batch
risk set); a record also enters other records' denominators, so for Cox
models the reported ε is that of the per-term mechanism (an approximation, as
in published DP-Cox work); for classification and regression it is exact.

Each site keeps a ``PrivacyLedger`` (JSON-serialisable) of the mechanisms it
ran; ``epsilon`` composes all of them: per round and cumulative, per job.

Plan validation: ``check_dp_plan`` is what the coordinator calls on a plan
with a ``target_epsilon``; it raises ``PrivacyBudgetError`` with the numbers
when the rounds asked cannot meet the target.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "ClientDPConfig",
    "DPConfig",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "calibrate_noise",
    "check_dp_plan",
    "dp_fedavg_privatise",
    "epsilon_for",
    "noisy_clipped_gradient",
]


class PrivacyBudgetError(ValueError):
    """A plan's privacy target cannot be met; the message carries the numbers."""


@dataclass(frozen=True)
class DPConfig:
    """Record-level DP-SGD settings of a plan (``[train.dp]``)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None

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
        cfg = cls(**{k: (float(v) if v is not None else None) for k, v in d.items()})
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


@dataclass(frozen=True)
class ClientDPConfig:
    """Client-level DP-FedAvg (McMahan et al. 2018): clip each update, noise the sum.

    Under secure aggregation no one sees an individual update, so each client adds
    its share N(0, (z*S)^2 / cohort_size); the sum carries N(0, (z*S)^2).
    """

    clip_norm: float
    noise_multiplier: float
    cohort_size: int

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
        cfg = cls(float(d["clip_norm"]), float(d["noise_multiplier"]), int(d["cohort_size"]))
        if not cfg.clip_norm > 0:
            raise ValueError(f"train.client_dp.clip_norm={cfg.clip_norm} must be > 0")
        if not cfg.noise_multiplier >= 0:
            raise ValueError(
                f"train.client_dp.noise_multiplier={cfg.noise_multiplier} must be >= 0"
            )
        if cfg.cohort_size < 1:
            raise ValueError(f"train.client_dp.cohort_size={cfg.cohort_size} must be >= 1")
        return cfg


# ---------------------------------------------------------------------------
# accounting


def epsilon_for(
    *, noise_multiplier: float, sampling_rate: float, steps: int, delta: float
) -> float:
    """ε after ``steps`` Poisson-sampled Gaussian steps (dp_accounting RDP accountant).

    Raises:
        ValueError: sampling_rate outside (0, 1], steps < 0, or delta outside (0, 1).
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate={sampling_rate} must lie in (0, 1]")
    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must lie in (0, 1)")
    if steps == 0:
        return 0.0
    return PrivacyLedger(
        entries=[
            {
                "noise_multiplier": noise_multiplier,
                "sampling_rate": sampling_rate,
                "steps": steps,
                "round": 0,
                "job": "",
            }
        ]
    ).epsilon(delta)


@dataclass
class PrivacyLedger:
    """The mechanisms one site ran: list of {job, round, noise_multiplier, sampling_rate, steps}."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, *, job: str, round: int, noise_multiplier: float, sampling_rate: float, steps: int
    ) -> None:
        self.entries.append(
            {
                "job": job,
                "round": int(round),
                "noise_multiplier": float(noise_multiplier),
                "sampling_rate": float(sampling_rate),
                "steps": int(steps),
            }
        )

    def epsilon(self, delta: float, *, job: str | None = None, round: int | None = None) -> float:
        """Composed ε of the selected entries (all, one job, or one job's round)."""
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        chosen = [
            e
            for e in self.entries
            if (job is None or e["job"] == job) and (round is None or e["round"] == round)
        ]
        if not chosen:
            return 0.0
        accountant = RdpAccountant()
        for e in chosen:
            event = dp_accounting.PoissonSampledDpEvent(
                e["sampling_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
            )
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, e["steps"]))
        return float(accountant.get_epsilon(delta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        return cls(entries=[dict(e) for e in d.get("entries", [])])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON atomically (temp file, fsync, rename): a site's spent
        budget must survive a crash of the agent."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a saved ledger; a missing file is an empty ledger.

        Raises:
            ValueError: the file is not a ledger (names the file and the problem).
        """
        target = Path(path)
        if not target.exists():
            return cls()
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            entries = data["entries"]
            keys = {"job", "round", "noise_multiplier", "sampling_rate", "steps"}
            for i, e in enumerate(entries):
                missing = keys - set(e)
                if missing:
                    raise ValueError(f"entry {i} lacks {sorted(missing)}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"privacy ledger {target}: not a valid ledger: {exc}") from exc
        return cls(entries=[dict(e) for e in entries])


def check_dp_plan(
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    steps_per_round: int,
    sampling_rate: float,
    noise_multiplier: float,
) -> float:
    """Refuse a plan whose privacy target cannot be met; return the ε it will spend.

    The coordinator's plan validation calls this with the plan's DP settings and
    the smallest site's sampling rate (batch_size / n_train, the worst case).

    Raises:
        PrivacyBudgetError: the plan would spend more than ``target_epsilon``; the
            message gives ε per round, ε over all rounds, the largest number of
            rounds that fits, and the noise multiplier that would fit.
        ValueError: a parameter out of range.
    """
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds={rounds} and steps_per_round={steps_per_round} must be >= 1")
    total = epsilon_for(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=rounds * steps_per_round,
        delta=delta,
    )
    if total <= target_epsilon:
        return total
    per_round = epsilon_for(
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps_per_round,
        delta=delta,
    )
    lo, hi = 0, rounds  # largest r with eps(r) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        eps_mid = epsilon_for(
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            steps=mid * steps_per_round,
            delta=delta,
        )
        lo, hi = (mid, hi) if eps_mid <= target_epsilon else (lo, mid - 1)
    needed = calibrate_noise(
        target_epsilon=target_epsilon,
        delta=delta,
        sampling_rate=sampling_rate,
        steps=rounds * steps_per_round,
    )
    raise PrivacyBudgetError(
        f"target epsilon {target_epsilon:g} (delta={delta:g}) cannot be met: "
        f"{rounds} rounds x {steps_per_round} steps at sampling rate {sampling_rate:.4g} "
        f"and noise multiplier {noise_multiplier:g} spend epsilon {total:.3f} "
        f"({per_round:.3f} in one round); at most {lo} rounds fit, "
        f"or raise noise_multiplier to {needed:.3f}"
    )


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    max_noise: float = 1000.0,
) -> float:
    """Smallest noise multiplier (to 1e-3 relative) reaching ``target_epsilon``.

    Raises:
        PrivacyBudgetError: even ``max_noise`` does not reach the target.
    """

    def eps(z: float) -> float:
        return epsilon_for(
            noise_multiplier=z, sampling_rate=sampling_rate, steps=steps, delta=delta
        )

    if eps(max_noise) > target_epsilon:
        raise PrivacyBudgetError(
            f"target epsilon {target_epsilon:g} unreachable even with noise multiplier "
            f"{max_noise:g} over {steps} steps at sampling rate {sampling_rate:.4g}"
        )
    lo, hi = 0.05, max_noise
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


# ---------------------------------------------------------------------------
# mechanisms


def noisy_clipped_gradient(
    per_example: list[torch.Tensor],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float]:
    """Clip per-example gradients, sum, add Gaussian noise, divide by the expected batch.

    ``per_example`` is one tensor per parameter, each (B, *shape). Returns the
    flat noisy gradient and the fraction of examples that were clipped.
    """
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_example], dim=1)  # (B, P)
    norms = flat.norm(dim=1)
    factors = torch.clamp(max_grad_norm / (norms + 1e-12), max=1.0)
    summed = (flat * factors[:, None]).sum(dim=0)
    noise = torch.randn(summed.shape, generator=generator, dtype=summed.dtype, device="cpu").to(
        summed.device
    )
    noisy = (summed + noise * noise_multiplier * max_grad_norm) / expected_batch
    clipped = float((norms > max_grad_norm).float().mean()) if flat.shape[0] else 0.0
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

    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return [g[k] for k in names]


def dp_fedavg_privatise(
    update: np.ndarray, cfg: ClientDPConfig, *, seed: bytes
) -> tuple[np.ndarray, float]:
    """Clip a client's model update to ``clip_norm`` and add its noise share.

    Uses the compiled core's ``clip_l2`` / ``add_gaussian_noise`` when present
    (same arithmetic in numpy otherwise). Returns the privatised update (a copy)
    and the update's norm before clipping.
    """
    from fedge.train.optim import core_function

    vec = np.ascontiguousarray(update, dtype=np.float32).copy()
    std = cfg.noise_multiplier * cfg.clip_norm / math.sqrt(cfg.cohort_size)
    clip = core_function("clip_l2")
    noise = core_function("add_gaussian_noise")
    if clip is not None:
        norm = float(clip(vec, cfg.clip_norm))
    else:
        norm = float(np.linalg.norm(vec.astype(np.float64)))
        if norm > cfg.clip_norm:
            vec *= np.float32(cfg.clip_norm / norm)
    if std > 0:
        if noise is not None:
            noise(vec, std=std, seed=seed)
        else:
            rng = np.random.default_rng(int.from_bytes(seed[:8], "little"))
            vec += rng.normal(0.0, std, size=vec.shape).astype(np.float32)
    return vec, norm
