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
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "COX_DP_RULE",
    "PENDING",
    "PER_LOSS_TERM",
    "RELEASED",
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


# A ledger entry's status. A run of a DP mechanism is charged when its output can
# leave the site, not when training ends: a round's first attempt that fails before
# its masked input is sent, or a site never asked for it, spends nothing.
PENDING = "pending"    # trained; the output is still only at the site: not counted
RELEASED = "released"  # the output left, or was about to (marked first): counted
STATUSES = (PENDING, RELEASED)

_REQUIRED = ("job", "round", "noise_multiplier", "sampling_rate", "steps")

# (job, round, attempt): one run of one round's mechanism at this site
EntryKey = tuple[str, int, int]


def _selects(e: Mapping[str, Any], job: str | None, round: int | None) -> bool:
    return (job is None or e["job"] == job) and (round is None or e["round"] == round)


def _key(e: Mapping[str, Any]) -> tuple[str, int, int | None]:
    return (e["job"], int(e["round"]), e.get("attempt"))


def _normalised(entries: Any) -> list[dict[str, Any]]:
    """Copies of ``entries``, checked, each with an ``attempt`` and a ``status``.

    An entry saved by a release before statuses (no ``status``) is released: it was
    charged when its round trained, and an upgrade never lowers a site's recorded
    spend. One without ``attempt`` is numbered after the earlier runs of its round.

    Raises:
        ValueError: an entry lacks a key, has an unknown status or a bad attempt, or
            repeats another's (job, round, attempt); the message names the entry.
    """
    if not isinstance(entries, list):
        raise ValueError(f"entries is a {type(entries).__name__}, not a list")
    out: list[dict[str, Any]] = []
    runs: dict[tuple[str, int], int] = {}
    seen: set[tuple[str, int, int | None]] = set()
    for i, raw in enumerate(entries):
        if not isinstance(raw, Mapping):
            raise ValueError(f"entry {i} is not a table")
        e = dict(raw)
        missing = set(_REQUIRED) - set(e)
        if missing:
            raise ValueError(f"entry {i} lacks {sorted(missing)}")
        e.setdefault("status", RELEASED)
        if e["status"] not in STATUSES:
            raise ValueError(f"entry {i}: status {e['status']!r} is not one of {STATUSES}")
        run = (e["job"], int(e["round"]))
        if "attempt" not in e:
            e["attempt"] = runs.get(run, 0) + 1
        if not isinstance(e["attempt"], int) or isinstance(e["attempt"], bool) \
                or e["attempt"] < 1:
            raise ValueError(f"entry {i}: attempt {e['attempt']!r} is not an integer >= 1")
        runs[run] = max(runs.get(run, 0), e["attempt"])
        if _key(e) in seen:
            raise ValueError(f"entry {i} repeats job {e['job']!r} round {e['round']} "
                             f"attempt {e['attempt']}")
        seen.add(_key(e))
        out.append(e)
    return out


@dataclass
class PrivacyLedger:
    """The DP mechanisms one site ran, one entry per run: {job, round, attempt, status,
    noise_multiplier, sampling_rate, steps} (and ``bound`` for a Cox model's).

    A run is charged when its output can leave the site, not when it ends (DP noise is
    fresh from the OS each time, so a retried round is a new run, an entry of its own
    keyed by ``attempt``). Training records its run ``pending``; the agent marks it
    ``released`` and saves the ledger, fsynced, before the update can leave (with
    secure aggregation: before its masked input goes, since from then on the other
    survivors can unmask it without this site; without: before the plain update goes),
    and releases nothing when that save fails. ε counts released entries only. So a
    pending entry is a run whose output never left: one whose round was released after
    a crash cannot exist, as the mark is on disk before the release. (A crash between
    the mark and the send charges an update that never left, as does an attempt that
    fails after its masked input was sent: the error is on the safe side.) Entries are
    never removed. A ledger saved before statuses existed loads with every entry
    released.
    """

    entries: list[dict[str, Any]] = field(default_factory=list)
    # record, release and save of one ledger may come from different threads (a
    # superseded training still running as the next one starts)
    _lock: Any = field(default_factory=threading.RLock, init=False,
                       repr=False, compare=False)

    def record(
        self, *, job: str, round: int, noise_multiplier: float, sampling_rate: float, steps: int,
        per_loss_term: bool = False, pending: bool = False,
    ) -> EntryKey:
        """Add one run of a round's mechanism; return its key (job, round, attempt), the
        attempt numbering this site's runs of that round from 1.

        ``pending``: its output has not left the site; not counted until
        :meth:`release`. Otherwise it is charged at once. ``per_loss_term``: DP-SGD on a
        Cox model, whose ε bounds one loss term, not one record (``bound`` says so)."""
        with self._lock:
            attempt = 1 + max((e["attempt"] for e in self.entries
                               if (e["job"], e["round"]) == (job, int(round))), default=0)
            entry: dict[str, Any] = {
                "job": job,
                "round": int(round),
                "attempt": attempt,
                "status": PENDING if pending else RELEASED,
                "noise_multiplier": float(noise_multiplier),
                "sampling_rate": float(sampling_rate),
                "steps": int(steps),
            }
            if per_loss_term:
                entry["bound"] = PER_LOSS_TERM
            self.entries.append(entry)
            return (job, int(round), attempt)

    def release(self, key: EntryKey, *, path: str | os.PathLike[str] | None = None) -> None:
        """Charge the run ``key``: its output is about to leave the site. With ``path``
        the ledger is saved there (:meth:`save`: fsynced, the directory too) before
        this returns; a save that fails leaves the entry pending and raises, and the
        caller must then not release. A released entry stays as it is (nothing saved).

        Raises:
            KeyError: no entry has that key.
            OSError: the ledger could not be saved.
        """
        with self._lock:
            entry = self._find(key)
            if entry["status"] == RELEASED:
                return
            entry["status"] = RELEASED
            if path is None:
                return
            try:
                self.save(path)
            except BaseException:
                entry["status"] = PENDING
                raise

    def pending(self, *, job: str | None = None) -> list[dict[str, Any]]:
        """The selected entries whose output never left the site (not counted in ε)."""
        return [dict(e) for e in self.entries
                if e.get("status", RELEASED) == PENDING and _selects(e, job, None)]

    def released(self, *, job: str | None = None) -> list[dict[str, Any]]:
        """The selected entries counted in ε."""
        return [dict(e) for e in self.entries
                if e.get("status", RELEASED) == RELEASED and _selects(e, job, None)]

    def per_loss_term(self, *, job: str | None = None) -> bool:
        """Whether any selected entry's ε is per Cox loss term: then so is their
        composition, and it is not a record-level bound."""
        return any(e.get("bound") == PER_LOSS_TERM for e in self.entries
                   if job is None or e["job"] == job)

    def events(
        self, *, job: str | None = None, round: int | None = None,
        including: Mapping[str, Any] | None = None,
    ) -> list[tuple[float, float, int]]:
        """The distinct mechanisms among the selected released entries (and
        ``including``, one more run counted as if released), as (noise_multiplier,
        sampling_rate, steps) with the steps of identical mechanisms summed.

        RDP composes additively, and an entry is ``steps`` runs of one Poisson-sampled
        Gaussian mechanism that (noise_multiplier, sampling_rate) defines, so entries
        sharing both compose to exactly what one entry with their summed steps does.
        A site's DP job records the same mechanism every round: its ledger grows by a
        row a round, this list does not.
        """
        with self._lock:
            chosen = [e for e in self.entries
                      if e.get("status", RELEASED) == RELEASED and _selects(e, job, round)]
        if including is not None and _selects(including, job, round) \
                and all(_key(e) != _key(including) for e in chosen):
            chosen.append(dict(including))
        steps: dict[tuple[float, float], int] = {}
        for e in chosen:
            key = (float(e["noise_multiplier"]), float(e["sampling_rate"]))
            steps[key] = steps.get(key, 0) + int(e["steps"])
        return [(z, q, n) for (z, q), n in steps.items()]

    def epsilon(self, delta: float, *, job: str | None = None, round: int | None = None,
                including: Mapping[str, Any] | None = None) -> float:
        """Composed ε of the selected released entries (all, one job, or one job's
        round); ``including``: one more run counted as if released (a round about to be
        trained, for the budget check, or one trained and not yet released, for the ε
        it will have spent once it is). Pending entries are not counted.

        Each distinct mechanism (``events``) is composed once with its summed steps:
        the same ε as composing entry by entry, in a time that does not grow with the
        number of rounds recorded (each composition costs a fraction of a second).
        """
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        chosen = self.events(job=job, round=round, including=including)
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

    def entry(self, key: EntryKey) -> dict[str, Any]:
        """A copy of the entry ``key``.

        Raises: KeyError: no entry has that key."""
        with self._lock:
            return dict(self._find(key))

    def _find(self, key: EntryKey) -> dict[str, Any]:
        """The entry ``key`` itself (the caller holds the lock). Raises: KeyError."""
        for e in self.entries:
            if _key(e) == tuple(key):
                return e
        raise KeyError(f"no privacy ledger entry for job {key[0]!r} round {key[1]} "
                       f"attempt {key[2]}")

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": [dict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        """Raises: ValueError: as :func:`_normalised` (a bad or repeated entry)."""
        return cls(entries=_normalised(d.get("entries", [])))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON atomically (temp file, fsync, rename, fsync of the
        directory, so the rename itself survives a power cut): a site's spent budget
        must survive a crash. A write that fails (a full disk) before the rename leaves
        the saved ledger as it was and no temp file behind.

        Raises: OSError."""
        from fedge.update.files import write_atomic

        with self._lock:
            write_atomic(Path(path), json.dumps(self.to_dict()).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a saved ledger; a missing file is an empty ledger. Entries saved without
        a status (earlier releases) are released: never less spend after an upgrade.

        Raises:
            ValueError: the file is not a ledger (names the file and the problem).
        """
        target = Path(path)
        if not target.exists():
            return cls()
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
            return cls(entries=_normalised(data["entries"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"privacy ledger {target}: not a valid ledger: {exc}") from exc


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
