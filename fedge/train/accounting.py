"""Privacy accounting without torch: the ledger, ε, and the plan check.

Kept apart from ``fedge.train.privacy`` (which needs torch for DP-SGD) so that
the coordinator can refuse a plan whose privacy target cannot be met without
importing torch. The accountant is Google's ``dp_accounting`` (RDP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COX_DP_RULE",
    "PER_LOSS_TERM",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "calibrate_noise",
    "check_dp_plan",
    "epsilon_for",
]


class PrivacyBudgetError(ValueError):
    """A plan's privacy target cannot be met; the message carries the numbers."""


# Why DP-SGD on a Cox model needs the plan's explicit consent (fedge.train.privacy's
# docstring): said the same way by the coordinator's plan check and by a site.
COX_DP_RULE = (
    "DP-SGD on a Cox model clips each record's own loss term, but a record also sits "
    "in the risk-set denominators of the other events in its batch, so removing one "
    "record can move the clipped gradient sum by up to about (2b - 1) x max_grad_norm "
    "for a batch of b, not max_grad_norm: the epsilon reported is per loss term, not a "
    "record-level bound. Set privacy.dp.cox_per_term = true to run it on those terms"
)

# The label a ledger entry (and a round's metrics) carries when its ε is per Cox
# loss term rather than per record.
PER_LOSS_TERM = "per loss term, not a record-level bound"


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


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """Silence dp_accounting's absl warnings while it runs: for some (q, sigma) its RDP
    series "failed to converge" at a few small orders, which it then leaves out of the
    minimum over orders (ε stays an upper bound), and it says so ~7 times per ε, so an
    agent's journal fills with lines that need no action. Errors still get through."""
    log = logging.getLogger("absl")
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


@dataclass
class PrivacyLedger:
    """The mechanisms one site ran: list of {job, round, noise_multiplier, sampling_rate, steps}."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, *, job: str, round: int, noise_multiplier: float, sampling_rate: float, steps: int,
        per_loss_term: bool = False,
    ) -> None:
        """Add one round's mechanism. ``per_loss_term``: DP-SGD on a Cox model, whose ε
        bounds one loss term, not one record (the entry says so in ``bound``)."""
        entry: dict[str, Any] = {
            "job": job,
            "round": int(round),
            "noise_multiplier": float(noise_multiplier),
            "sampling_rate": float(sampling_rate),
            "steps": int(steps),
        }
        if per_loss_term:
            entry["bound"] = PER_LOSS_TERM
        self.entries.append(entry)

    def per_loss_term(self, *, job: str | None = None) -> bool:
        """Whether any selected entry's ε is per Cox loss term: then so is their
        composition, and it is not a record-level bound."""
        return any(e.get("bound") == PER_LOSS_TERM for e in self.entries
                   if job is None or e["job"] == job)

    def events(
        self, *, job: str | None = None, round: int | None = None
    ) -> list[tuple[float, float, int]]:
        """The distinct mechanisms among the selected entries, as (noise_multiplier,
        sampling_rate, steps) with the steps of identical mechanisms summed.

        RDP composes additively, and an entry is ``steps`` runs of one Poisson-sampled
        Gaussian mechanism that (noise_multiplier, sampling_rate) defines, so entries
        sharing both compose to exactly what one entry with their summed steps does.
        A site's DP job records the same mechanism every round: its ledger grows by a
        row a round, this list does not.
        """
        steps: dict[tuple[float, float], int] = {}
        for e in self.entries:
            if (job is None or e["job"] == job) and (round is None or e["round"] == round):
                key = (float(e["noise_multiplier"]), float(e["sampling_rate"]))
                steps[key] = steps.get(key, 0) + int(e["steps"])
        return [(z, q, n) for (z, q), n in steps.items()]

    def epsilon(self, delta: float, *, job: str | None = None, round: int | None = None) -> float:
        """Composed ε of the selected entries (all, one job, or one job's round).

        Each distinct mechanism (``events``) is composed once with its summed steps:
        the same ε as composing entry by entry, in a time that does not grow with the
        number of rounds recorded (each composition costs a fraction of a second).
        """
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        chosen = self.events(job=job, round=round)
        if not chosen:
            return 0.0
        accountant = RdpAccountant()
        with _quiet_accountant():
            for noise_multiplier, sampling_rate, steps in chosen:
                event = dp_accounting.PoissonSampledDpEvent(
                    sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
                )
                accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
            return float(accountant.get_epsilon(delta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        return cls(entries=[dict(e) for e in d.get("entries", [])])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON atomically (temp file, fsync, rename): a site's spent
        budget must survive a crash of the agent. A write that fails (a full disk)
        leaves the saved ledger as it was and no temp file behind.

        Raises: OSError."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
    needed = _advised_noise(
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


def _advised_noise(*, target_epsilon: float, delta: float, sampling_rate: float,
                   steps: int) -> float:
    """The noise multiplier a refusal advises, as printed (3 decimals): the smallest
    such value whose ε, computed at the printed value, meets the target, so a plan
    resubmitted with it is accepted (rounding to nearest could print one just below).

    Raises:
        PrivacyBudgetError: as ``calibrate_noise``.
    """

    def fits(z: float) -> bool:
        return epsilon_for(noise_multiplier=z, sampling_rate=sampling_rate, steps=steps,
                           delta=delta) <= target_epsilon

    # calibrate_noise is within 0.1 % above the least noise: a step or two either way
    z = math.ceil(calibrate_noise(target_epsilon=target_epsilon, delta=delta,
                                  sampling_rate=sampling_rate, steps=steps) * 1000) / 1000
    while not fits(z):
        z = round(z + 0.001, 3)
    while z > 0.001 and fits(round(z - 0.001, 3)):
        z = round(z - 0.001, 3)
    return z


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
