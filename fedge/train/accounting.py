"""Privacy accounting without torch: the ledger, ε, and the plan check.

Kept apart from ``fedge.train.privacy`` (which needs torch for DP-SGD) so that
the coordinator can refuse a plan whose privacy target cannot be met without
importing torch. The accountant is Google's ``dp_accounting``: its privacy loss
distribution (PLD) accountant, under the REPLACE_ONE neighbouring relation.

Adjacency. Every ε here bounds what the released updates reveal when one record is
replaced by another (DP-SGD, "per record"), or one site's whole data by other data
(DP-FedAvg, "client-level"), never when one is added or removed: a site's exact
record count leaves with every update (``TrainDone.n_examples``, the weight of its
update in the aggregate), so adding or removing a record is not hidden, and the
add-or-remove bound (what an RDP accountant gives for Poisson sampling) would be
smaller than the truth. Replace-one ε is roughly twice the add-or-remove one for the
same mechanism. The PLD accountant's estimate is pessimistic (rounded up on its grid):
the ε reported is an upper bound.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.text import as_user as _as_user

_log = logging.getLogger(__name__)

__all__ = [
    "CONTEXT_FIELDS",
    "COX_DP_RULE",
    "DP_FEDAVG",
    "DP_SGD",
    "LEDGER_VERSION",
    "MECHANISMS",
    "NO_DP",
    "PENDING",
    "PER_LOSS_TERM",
    "RELEASED",
    "LedgerUnreadable",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "calibrate_noise",
    "check_dp_plan",
    "client_epsilon_for",
    "epsilon_for",
    "ledger_run",
]


class PrivacyBudgetError(ValueError):
    """A plan's privacy target cannot be met; the message carries the numbers."""


class LedgerUnreadable(ValueError):
    """A saved privacy ledger that cannot be read (permissions, I/O): read as empty it
    would forget the budget spent, so nothing that needs it may go on. The message
    names the file, the user and how to mend it; ``path`` and ``error`` hold them."""

    def __init__(self, path: Path, error: OSError) -> None:
        self.path, self.error = Path(path), error
        hint = ""
        if error.errno in (errno.EACCES, errno.EPERM):
            hint = (f"; it and its directory must belong to the user the agent runs as "
                    f"(e.g. chown -R fedge: {self.path.parent})")
        super().__init__(f"privacy ledger {self.path} cannot be read{_as_user()}: "
                         f"{error.strerror or error}{hint}")




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
    """ε after ``steps`` Poisson-sampled Gaussian steps (DP-SGD), for replacing one
    record with another (the module docstring: the record count is released with the
    updates), from dp_accounting's PLD accountant: an upper bound.

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
    return _composed_epsilon(
        ((DP_SGD, float(noise_multiplier), float(sampling_rate), int(steps)),), float(delta))


def client_epsilon_for(*, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Client-level ε of DP-FedAvg after ``rounds`` releases of a cohort's noised sum
    (the ``DP_FEDAVG`` event of `_composed_epsilon`: replacing one site's data, q = 1),
    the figure a site's ledger gives for the same rounds: an upper bound.

    Raises:
        ValueError: noise_multiplier <= 0, rounds < 0, or delta outside (0, 1).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be > 0")
    if rounds < 0:
        raise ValueError(f"rounds={rounds} must be >= 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must lie in (0, 1)")
    if rounds == 0:
        return 0.0
    return _composed_epsilon(((DP_FEDAVG, float(noise_multiplier), 1.0, int(rounds)),),
                             float(delta))


# Beyond this add-or-remove estimate no ε protects anything, and the grid that keeps
# ε within 0.1 % would need more memory than a site has: such a composition is
# accounted on a coarse grid (scale / 300), still an upper bound. Only one the
# accountant cannot compute even so is reported as unbounded (math.inf).
EPSILON_CEILING = 1e4

# The RDP orders of the scale estimate (a few: it only sizes the PLD grid)
_SCALE_ORDERS = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0,
                 256.0, 512.0)
_FINEST_GRID = 1e-4  # dp_accounting's default value_discretization_interval


def _grid(scale: float, steps: int) -> float:
    """The PLD grid (value_discretization_interval) for a composition of ``steps``
    mechanisms whose ε is about ``scale``: never finer than dp_accounting's default.

    The pessimistic estimate rounds every step's privacy loss up, so any grid gives an
    upper bound; its excess grows about as steps x grid^2 / 3, so the grid is sized to
    keep it near 1e-3 x ε (and under scale / 300): within 0.2 % of the default grid's
    ε over z 0.6-1000, q 0.001-1, 1-100000 steps (tests/train/test_ledger_mechanisms.py
    checks some), and a plan check's or a noise calibration's few dozen compositions
    take a second, not minutes (the default grid takes up to ~1.5 s for each). Where
    the scale overstates ε (the RDP estimate at small q or small z: hundreds of times),
    ``_composed_epsilon`` sizes the grid again from the ε the first grid gave.
    """
    if scale > EPSILON_CEILING:
        return scale / 300
    return max(_FINEST_GRID, min(scale / 300, math.sqrt(1e-3 * scale / max(steps, 1))))


# _composed_epsilon's answers, newest last: a plan check or a noise calibration asks
# for the same compositions many times, and a release's log line reads the one its
# training computed (_cached_epsilon) rather than run the accountant again
_EPSILONS: collections.OrderedDict[tuple[Any, float], float] = collections.OrderedDict()
_EPSILONS_HELD = 4096
_EPSILONS_LOCK = threading.Lock()


def _cached_epsilon(events: tuple[tuple[str, float, float, int], ...],
                    delta: float) -> float | None:
    """``_composed_epsilon(events, delta)`` where it was computed and is still held,
    else None (nothing is computed)."""
    with _EPSILONS_LOCK:
        return _EPSILONS.get((events, float(delta)))


def _composed_epsilon(events: tuple[tuple[str, float, float, int], ...], delta: float) -> float:
    """ε at ``delta`` of the composition of ``events`` (``PrivacyLedger.events``'s
    tuples, sorted), for replacing one record (or, for DP-FedAvg, one site's data),
    from dp_accounting's PLD accountant (pessimistic: an upper bound). Cached (the
    last ``_EPSILONS_HELD`` compositions asked for).
    """
    key = (events, float(delta))
    with _EPSILONS_LOCK:
        held = _EPSILONS.get(key)
        if held is not None:
            _EPSILONS.move_to_end(key)
            return held
    epsilon = _accounted_epsilon(events, float(delta))
    with _EPSILONS_LOCK:
        _EPSILONS[key] = epsilon
        _EPSILONS.move_to_end(key)
        while len(_EPSILONS) > _EPSILONS_HELD:
            _EPSILONS.popitem(last=False)
    return epsilon


def _accounted_epsilon(events: tuple[tuple[str, float, float, int], ...],
                       delta: float) -> float:
    """``_composed_epsilon``'s computation, uncached.

    Events:
        ``(DP_SGD, z, q, steps)``: ``steps`` Poisson-sampled (rate q) Gaussian steps
            whose clipped sum moves by up to 2C when a record is replaced, with noise
            zC: the PLD accountant's PoissonSampledDpEvent(q, GaussianDpEvent(z)) under
            REPLACE_ONE.
        ``(DP_FEDAVG, z, 1.0, rounds)``: ``rounds`` releases of a cohort's sum of
            updates each clipped to S, with noise N(0, (zS)^2) on the sum; the cohort is
            public (the roster), so neighbours replace one site's data, which moves the
            sum by up to 2S: sensitivity 2S against noise zS, i.e. GaussianDpEvent(z/2)
            in add-or-remove terms, and GaussianDpEvent(z) under REPLACE_ONE (the
            accountant doubles the sensitivity for a replacement). Every site takes part
            in every round (q = 1). A record's influence is bounded by its site's, so
            this also bounds every record of the site.
        ``(NO_DP, ...)``: exact updates: unbounded (math.inf).
    """
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if any(kind == NO_DP or z <= 0 for kind, z, _, n in events if n > 0):
        return math.inf

    def event(kind: str, z: float, q: float, n: int, *, halve: bool) -> Any:
        if kind == DP_FEDAVG:  # halve: the same Gaussian in add-or-remove terms
            return dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(z / 2 if halve else z), n)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)

    chosen = [e for e in events if e[3] > 0]
    if not chosen:
        return 0.0
    with _quiet_accountant():
        # the scale of ε, to size the PLD grid: the add-or-remove RDP ε (about half
        # the replace-one one), computed in closed form without a grid
        rdp = RdpAccountant(_SCALE_ORDERS)
        for kind, z, q, n in chosen:
            rdp.compose(event(kind, z, q, n, halve=True))
        scale = float(rdp.get_epsilon(delta))
        steps = sum(n for *_, n in chosen)

        def pld_epsilon(grid: float) -> float:
            pld = PLDAccountant(
                neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
                value_discretization_interval=grid)
            for kind, z, q, n in chosen:
                pld.compose(event(kind, z, q, n, halve=False))
            return float(pld.get_epsilon(delta))

        if not math.isfinite(scale):
            return math.inf
        grid = _grid(scale, steps)
        try:
            epsilon = pld_epsilon(grid)
        except (OverflowError, MemoryError, ValueError):
            return math.inf  # beyond what the accountant can compute: unbounded
        # the scale may overstate ε many times (RDP at small q or z): then the grid
        # was coarser than ε calls for; size it again from the ε it gave (an upper
        # bound, so the new grid is still no finer than needed)
        finer = _grid(epsilon, steps)
        if finer < grid / 2:
            with contextlib.suppress(OverflowError, MemoryError, ValueError):
                epsilon = min(epsilon, pld_epsilon(finer))
        return epsilon


def _utc_now() -> str:
    """Now, UTC, ISO 8601 to the second: when a ledger entry was recorded or charged."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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

# What a run released (an entry's ``mechanism``). Every training run whose update can
# leave the site is recorded, with or without DP: ε composes them all.
DP_SGD = "dp_sgd"        # record-level DP-SGD (privacy.dp): Poisson-sampled Gaussian
DP_FEDAVG = "dp_fedavg"  # client-level DP-FedAvg (privacy.client_dp): one Gaussian a round
NO_DP = "none"           # neither: exact updates; any selection holding one is unbounded
MECHANISMS = (DP_SGD, DP_FEDAVG, NO_DP)

_REQUIRED = ("job", "round", "noise_multiplier", "sampling_rate", "steps")

# What an entry says of its run beyond what ε reads, so that a data-protection officer
# can tell from the appliance alone when, on which data set, under which plan and with
# which settings it trained (``PrivacyLedger.describe``, ``release``): ``at`` (when the
# run was recorded, UTC ISO 8601) and ``released_at`` (when it was charged) are set by
# the ledger; the rest by whoever trains and sends the run. ε never reads them, and an
# entry saved before they existed simply lacks them (a release before this one reads
# an entry's required keys only, so it loads these entries as they are).
CONTEXT_FIELDS = ("dataset", "plan_digest", "max_grad_norm", "delta", "task_id",
                  "task_attempt")

# The saved ledger's format (``PrivacyLedger.save``). Two releases saved a file without
# a version: those before 0.2, which recorded DP-SGD runs only, and 0.2.0, which
# recorded every run as this one does. Their entries tell them apart
# (``_before_mechanisms``): a ledger holding an entry of a release before 0.2 loads
# ``legacy``, one 0.2.0 started does not.
LEDGER_VERSION = 2

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
    One without ``mechanism`` (saved before the ledger recorded runs without DP-SGD,
    when DP-SGD was all it recorded) is DP-SGD.

    Raises:
        ValueError: an entry lacks a key, has an unknown status, mechanism or a bad
            attempt, or repeats another's (job, round, attempt); the message names the
            entry.
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
        e.setdefault("mechanism", DP_SGD)
        if e["mechanism"] not in MECHANISMS:
            raise ValueError(f"entry {i}: mechanism {e['mechanism']!r} is not one of "
                             f"{MECHANISMS}")
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


def _before_mechanisms(entries: Any) -> int:
    """How many of the first ``entries`` of a ledger saved without a version (as read,
    before :func:`_normalised`) were recorded by a release before 0.2, which recorded a
    run only if it used DP-SGD: the count up to the last such entry (0: none).

    0.2.0 saved no version either, but recorded every run with its ``mechanism``, written
    before ``noise_multiplier``, ``sampling_rate`` and ``steps`` (its ``record``). An
    entry of a release before 0.2 has no ``mechanism``, or, where 0.2.0 loaded and saved
    it again, one its load added after the entry's own keys (after ``steps``): JSON
    keeps the order keys were written in. Releases only append entries, so a ledger an
    earlier release began and 0.2.0 carried on holds the earlier one's entries first.
    """
    if not isinstance(entries, list):
        return 0
    last = 0
    for i, e in enumerate(entries):
        keys = list(e) if isinstance(e, Mapping) else []
        if "mechanism" not in keys or ("steps" in keys
                                       and keys.index("mechanism") > keys.index("steps")):
            last = i + 1
    return last


def _events(chosen: list[dict[str, Any]]) -> list[tuple[str, float, float, int]]:
    """``PrivacyLedger.events`` of the entries ``chosen``."""
    steps: dict[tuple[str, float, float], int] = {}
    for e in chosen:
        kind = e.get("mechanism", DP_SGD)
        if kind == DP_SGD:
            key = (kind, float(e["noise_multiplier"]), float(e["sampling_rate"]))
            n = int(e["steps"])
        elif kind == DP_FEDAVG:
            key, n = (kind, float(e["noise_multiplier"]), 1.0), 1
        else:
            key, n = (kind, 0.0, 1.0), 1
        steps[key] = steps.get(key, 0) + n
    return [(kind, z, q, n) for (kind, z, q), n in steps.items()]


@dataclass
class PrivacyLedger:
    """Every training run of one site whose update can leave it, one entry per run:
    {job, round, attempt, at, status, mechanism, noise_multiplier, sampling_rate, steps}
    (and ``bound`` for a Cox model's DP-SGD; ``clip_norm``, ``cohort_size`` for
    DP-FedAvg; ``released_at`` once charged; what :meth:`describe` adds:
    ``CONTEXT_FIELDS``, for the record only, never read by ε). ``mechanism``:
    ``dp_sgd`` (record-level DP-SGD: ``steps``
    Poisson-sampled Gaussian steps at rate ``sampling_rate``), ``dp_fedavg``
    (client-level DP-FedAvg: one Gaussian release of the round's clipped update,
    ``sampling_rate`` 1 and ``steps`` 1) or ``none`` (no DP: the exact update left,
    ``noise_multiplier`` 0). A run without DP is recorded too: its records are those
    a DP job of the same site protects, and any selection of entries that holds a
    released one has an unbounded ε (math.inf).

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
    released; one saved before mechanisms existed, with every entry DP-SGD.

    Upgrades. :meth:`save` writes format ``LEDGER_VERSION`` (2). A file without a
    ``version`` was saved by 0.2.0 or by a release before 0.2. One whose entries a
    release before 0.2 recorded (:func:`_before_mechanisms`) recorded a run only if it
    used DP-SGD (and computed its ε add-or-remove, about half the replace-one ε
    computed here): such a ledger is ``legacy``, its first ``legacy_entries`` entries
    were recorded by that release, and runs it trained without DP-SGD (exact updates,
    DP-FedAvg) are not in it. Both are kept in every later save, so the ledger says so
    for good. One 0.2.0 started (every entry its own) is not legacy: that release
    recorded every run and computed ε as this one does. A file without a version or
    entries, which neither saved, loads legacy with no legacy entries (the safe side:
    runs may be missing). ``complete_since``: when this ledger began recording every
    run (its first save by a release that does; None before that; 0, the epoch, for
    one 0.2.0 started, complete from its start, which it kept no time of). A run
    released before then without DP-SGD is not in it: ``fedge agent privacy`` counts
    those it can from the secure aggregation reveal log.

    ε is for replacing one record (DP-SGD) or one site's data (DP-FedAvg), the site's
    record count being released with its updates (the module docstring).
    """

    entries: list[dict[str, Any]] = field(default_factory=list)
    # started by a release that recorded DP-SGD runs only (a file saved without a
    # version); its first legacy_entries entries are that release's
    legacy: bool = False
    legacy_entries: int = 0
    # when this ledger began recording every run whose update can leave (time.time())
    complete_since: float | None = None
    # record, release and save of one ledger may come from different threads (a
    # superseded training still running as the next one starts)
    _lock: Any = field(default_factory=threading.RLock, init=False,
                       repr=False, compare=False)

    def record(
        self, *, job: str, round: int, noise_multiplier: float = 0.0,
        sampling_rate: float = 1.0, steps: int = 1, per_loss_term: bool = False,
        pending: bool = False, mechanism: str = DP_SGD, clip_norm: float | None = None,
        cohort_size: int | None = None,
    ) -> EntryKey:
        """Add one run of a round's mechanism; return its key (job, round, attempt), the
        attempt numbering this site's runs of that round from 1.

        ``mechanism``: ``dp_sgd`` (``noise_multiplier``, ``sampling_rate``, ``steps``),
        ``dp_fedavg`` (``noise_multiplier`` z: the cohort's sum carries N(0, (zS)^2);
        ``clip_norm`` S and ``cohort_size`` kept for the record; counted as one
        release, whatever ``sampling_rate`` and ``steps`` say) or ``none`` (the exact
        update: ``noise_multiplier`` is recorded as 0; ``steps`` for the record).
        ``pending``: its output has not left the site; not counted until
        :meth:`release`. Otherwise it is charged at once. ``per_loss_term``: DP-SGD on a
        Cox model, whose ε bounds one loss term, not one record (``bound`` says so).

        Raises:
            ValueError: an unknown mechanism, or DP-SGD without a positive
                noise_multiplier or with a sampling_rate outside (0, 1].
        """
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism {mechanism!r} is not one of {MECHANISMS}")
        if mechanism == DP_SGD and not (noise_multiplier > 0 and 0 < sampling_rate <= 1):
            raise ValueError(f"a dp_sgd run needs noise_multiplier > 0 (got "
                             f"{noise_multiplier}) and sampling_rate in (0, 1] (got "
                             f"{sampling_rate})")
        with self._lock:
            attempt = 1 + max((e["attempt"] for e in self.entries
                               if (e["job"], e["round"]) == (job, int(round))), default=0)
            entry: dict[str, Any] = {
                "job": job,
                "round": int(round),
                "attempt": attempt,
                "at": _utc_now(),
                "status": PENDING if pending else RELEASED,
                "mechanism": mechanism,
                "noise_multiplier": 0.0 if mechanism == NO_DP else float(noise_multiplier),
                "sampling_rate": float(sampling_rate) if mechanism == DP_SGD else 1.0,
                "steps": 1 if mechanism == DP_FEDAVG else int(steps),
            }
            if mechanism == DP_FEDAVG:
                entry["clip_norm"] = None if clip_norm is None else float(clip_norm)
                entry["cohort_size"] = None if cohort_size is None else int(cohort_size)
            if per_loss_term:
                entry["bound"] = PER_LOSS_TERM
            if not pending:
                entry["released_at"] = entry["at"]
            self.entries.append(entry)
            return (job, int(round), attempt)

    def describe(self, key: EntryKey, *, dataset: str | None = None,
                 plan_digest: bytes | str | None = None,
                 max_grad_norm: float | None = None, delta: float | None = None,
                 task_id: str | None = None, task_attempt: int | None = None) -> None:
        """Say of the run ``key`` what ε does not read (``CONTEXT_FIELDS``): the data
        set it trained on, the digest of its job's plan
        (``fedge.agent.guard.plan_digest``, kept as hex), the DP settings ε depends on
        beyond the entry's own (DP-SGD's ``max_grad_norm`` C and the plan's ``delta``;
        DP-FedAvg's clip is the entry's ``clip_norm``), and the coordinator's
        ``task_id`` (and its attempt number, where the task says it; the entry's own
        ``attempt`` numbers this site's runs of the round). A None leaves the field as
        it is. Not saved here: the caller saves (or :meth:`release` does).

        Raises:
            KeyError: no entry has that key.
            ValueError: a value of the wrong kind or out of range (named).
        """
        given: dict[str, Any] = {}
        if dataset is not None:
            if not isinstance(dataset, str) or not dataset:
                raise ValueError(f"dataset {dataset!r} is not a name")
            given["dataset"] = dataset
        if plan_digest is not None:
            text = plan_digest.hex() if isinstance(plan_digest, bytes) else plan_digest
            if not isinstance(text, str) or len(text) != 64 \
                    or any(c not in "0123456789abcdef" for c in text):
                raise ValueError(f"plan_digest {plan_digest!r} is not a SHA-256 digest")
            given["plan_digest"] = text
        if max_grad_norm is not None:
            if not 0 < float(max_grad_norm) < math.inf:
                raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0 and finite")
            given["max_grad_norm"] = float(max_grad_norm)
        if delta is not None:
            if not 0 < float(delta) < 1:
                raise ValueError(f"delta={delta} must lie in (0, 1)")
            given["delta"] = float(delta)
        if task_id is not None:
            if not isinstance(task_id, str) or not task_id:
                raise ValueError(f"task_id {task_id!r} is not a task id")
            given["task_id"] = task_id
        if task_attempt is not None:
            if isinstance(task_attempt, bool) or not isinstance(task_attempt, int) \
                    or task_attempt < 1:
                raise ValueError(f"task_attempt {task_attempt!r} is not an integer >= 1")
            given["task_attempt"] = task_attempt
        with self._lock:
            self._find(key).update(given)

    def release(self, key: EntryKey, *, path: str | os.PathLike[str] | None = None,
                task_id: str | None = None, task_attempt: int | None = None) -> None:
        """Charge the run ``key``: its output is about to leave the site. With ``path``
        the ledger is saved there (:meth:`save`: fsynced, the directory too) before
        this returns; a save that fails leaves the entry pending and raises, and the
        caller must then not release. The entry gets ``released_at`` (UTC ISO 8601),
        and ``task_id`` / ``task_attempt`` as :meth:`describe` where given. A released
        entry stays released; it is saved again only when this gives it a task id or
        attempt it did not have (a run without DP is charged as it trains, before the
        agent sends it). One INFO line in the log says what was charged and the job's
        ε so far (``_log_release``).

        Raises:
            KeyError: no entry has that key.
            ValueError: a bad ``task_id`` or ``task_attempt`` (as :meth:`describe`).
            OSError: the ledger could not be saved.
        """
        with self._lock:
            entry = self._find(key)
            before = dict(entry)
            self.describe(key, task_id=task_id, task_attempt=task_attempt)
            if entry["status"] == RELEASED:
                if path is not None and entry != before:
                    self._save_or_undo(path, entry, before)
                return
            entry["status"] = RELEASED
            entry["released_at"] = _utc_now()
            if path is not None:
                self._save_or_undo(path, entry, before)
        self._log_release(key)

    def _save_or_undo(self, path: str | os.PathLike[str], entry: dict[str, Any],
                      before: dict[str, Any]) -> None:
        """Save; if that fails, put ``entry`` back as ``before`` and raise (the run is
        not charged, nor its fields kept, where the disk does not hold them)."""
        try:
            self.save(path)
        except BaseException:
            entry.clear()
            entry.update(before)
            raise

    def _log_release(self, key: EntryKey) -> None:
        """The journal's line for the run ``key``, just charged: what left (or is about
        to), from which data set, under which mechanism, and the job's ε so far at the
        entry's ``delta`` (the plan's; 1e-5, ``fedge agent privacy``'s default, where
        the entry has none). A job that released a run without DP says so (ε
        unbounded). Nothing when the logger does not take INFO.

        The accountant is not run for the line (tens of milliseconds a release, growing
        with the steps): the ε is the one already composed for these runs, as training
        computes it for a DP-SGD run (``fedge.train.api.local_train``) and the agent's
        DP floor for the runs it checks; where none was, the line points to ``fedge
        agent privacy``. Never raises: the charge stands whatever the line says."""
        if not _log.isEnabledFor(logging.INFO):
            return
        try:
            e = self.entry(key)
            delta = float(e.get("delta") or 1e-5)
            if self.without_dp(job=e["job"]):
                said = "unbounded"
            else:
                eps = _cached_epsilon(tuple(sorted(self.events(job=e["job"]))), delta)
                said = ("not computed for this line (`fedge agent privacy` shows it)"
                        if eps is None else "unbounded" if eps == math.inf else f"{eps:.4g}")
            kind = e.get("mechanism", DP_SGD)
            settings = ("no DP: the exact update" if kind == NO_DP else
                        f"noise_multiplier {e['noise_multiplier']:g}"
                        + (f", sampling_rate {e['sampling_rate']:g}, steps {e['steps']}"
                           if kind == DP_SGD else "")
                        + (f", max_grad_norm {e['max_grad_norm']:g}"
                           if "max_grad_norm" in e else "")
                        + (f", clip_norm {e['clip_norm']:g}" if e.get("clip_norm") else ""))
            _log.info("privacy ledger: job %s round %d (attempt %d here%s) released: data set "
                      "%s, mechanism %s (%s); the job's epsilon so far %s at delta %g",
                      e["job"], e["round"], e["attempt"],
                      f", task {e['task_id']}" if "task_id" in e else "",
                      e.get("dataset", "not recorded"), kind, settings, said, delta)
        except Exception:  # the line is for people; the ledger's record is the charge
            _log.exception("privacy ledger: the release of %s was recorded, its log line "
                           "failed", key)

    def pending(self, *, job: str | None = None) -> list[dict[str, Any]]:
        """The selected entries whose output never left the site (not counted in ε)."""
        return [dict(e) for e in self.entries
                if e.get("status", RELEASED) == PENDING and _selects(e, job, None)]

    def released(self, *, job: str | None = None) -> list[dict[str, Any]]:
        """The selected entries counted in ε."""
        return [dict(e) for e in self.entries
                if e.get("status", RELEASED) == RELEASED and _selects(e, job, None)]

    def released_count(self) -> int:
        """How many entries are counted in ε (as ``len(released())``, copying none)."""
        return sum(1 for e in self.entries if e.get("status", RELEASED) == RELEASED)

    def settled_released_count(self) -> int | None:
        """:meth:`released_count`, or None while a release is being saved (a save that
        fails takes its entry back, so the count read then could fall again); never
        waits. What the agent's heartbeat reports (fedge.agent.runtime)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.released_count()
        finally:
            self._lock.release()

    def per_loss_term(self, *, job: str | None = None) -> bool:
        """Whether any selected entry's ε is per Cox loss term: then so is their
        composition, and it is not a record-level bound."""
        return any(e.get("bound") == PER_LOSS_TERM for e in self.entries
                   if job is None or e["job"] == job)

    def mechanisms(self, *, job: str | None = None) -> list[str]:
        """The mechanisms of the selected entries (released or pending), in
        ``MECHANISMS`` order."""
        with self._lock:
            found = {e.get("mechanism", DP_SGD) for e in self.entries
                     if _selects(e, job, None)}
        return [m for m in MECHANISMS if m in found]

    def without_dp(self, *, job: str | None = None) -> list[str]:
        """The jobs among the selected that released an update without DP (a released
        ``none`` run): the ε of any selection holding one of them is unbounded."""
        return sorted({e["job"] for e in self.released(job=job)
                       if e.get("mechanism", DP_SGD) == NO_DP})

    def events(
        self, *, job: str | None = None, round: int | None = None,
        including: Mapping[str, Any] | None = None,
    ) -> list[tuple[str, float, float, int]]:
        """The distinct mechanisms among the selected released entries (and
        ``including``, one more run counted as if released), as (mechanism,
        noise_multiplier, sampling_rate, steps) with the steps of identical mechanisms
        summed: a DP-SGD entry is ``steps`` Poisson-sampled Gaussian steps, a DP-FedAvg
        entry one Gaussian release (its sampling rate 1), a ``none`` entry one exact
        release.

        Composition of identical mechanisms depends only on how many there are, so
        entries sharing all three compose to exactly what one entry with their summed
        steps does. A site's DP job records the same mechanism every round: its ledger
        grows by a row a round, this list does not.
        """
        with self._lock:
            chosen = [e for e in self.entries
                      if e.get("status", RELEASED) == RELEASED and _selects(e, job, round)]
        if including is not None and _selects(including, job, round) \
                and all(_key(e) != _key(including) for e in chosen):
            chosen.append(dict(including))
        return _events(chosen)

    def legacy_epsilon(self, delta: float, *, job: str | None = None) -> tuple[float, float]:
        """ε of the selected released entries an earlier release recorded (the first
        ``legacy_entries``: its DP-SGD runs) as (computed here, as that release computed
        it). Here: for replacing one record, PLD (:meth:`epsilon`). That release: for
        adding or removing one, from dp_accounting's RDP accountant at its default
        orders: the number its ``fedge agent privacy`` showed. Neither is bigger for
        every plan (RDP is looser, add-or-remove smaller); (0, 0) without such entries.

        Raises:
            ValueError: delta outside (0, 1).
        """
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        if not 0 < delta < 1:
            raise ValueError(f"delta={delta} must lie in (0, 1)")
        with self._lock:
            chosen = [e for e in self.entries[:self.legacy_entries]
                      if e.get("status", RELEASED) == RELEASED and _selects(e, job, None)]
        events = _events(chosen)
        if not events:
            return 0.0, 0.0
        now = _composed_epsilon(tuple(sorted(events)), float(delta))
        if any(kind != DP_SGD for kind, *_ in events):  # not that release's entries
            return now, math.inf
        accountant = RdpAccountant()
        with _quiet_accountant():
            for _, z, q, n in events:
                accountant.compose(dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                    n))
            return now, float(accountant.get_epsilon(delta))

    def epsilon(self, delta: float, *, job: str | None = None, round: int | None = None,
                including: Mapping[str, Any] | None = None) -> float:
        """Composed ε of the selected released entries (all, one job, or one job's
        round); ``including``: one more run counted as if released (a round about to be
        trained, for the budget check, or one trained and not yet released, for the ε
        it will have spent once it is). Pending entries are not counted.

        For replacing one record with another (DP-SGD; the site's record count is
        released with its updates, so add-or-remove neighbours are distinguishable),
        from dp_accounting's PLD accountant under REPLACE_ONE: an upper bound. A
        DP-FedAvg entry is a Gaussian release with sensitivity 2S (one site's data
        replaced) against noise zS: its ε is client-level, and as a site's data bounds
        each of its records, it composes with DP-SGD entries into a record-level bound
        (``_composed_epsilon``). A selection holding a released run without DP is
        unbounded: math.inf.

        Each distinct mechanism (``events``) is composed once with its summed steps:
        the same ε as composing entry by entry, in a time that does not grow with the
        number of rounds recorded; compositions are cached.

        Raises:
            ValueError: delta outside (0, 1).
        """
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta} must lie in (0, 1)")
        chosen = self.events(job=job, round=round, including=including)
        if not chosen:
            return 0.0
        return _composed_epsilon(tuple(sorted(chosen)), float(delta))

    def epsilon_if_released(self, key: EntryKey, delta: float, *,
                            total: bool = True) -> tuple[float, float | None]:
        """(ε of the entry ``key``'s job, ε of every job) at ``delta`` as they would
        stand once ``key`` is released, whether it is yet or not: what a site checks
        against its caps before it charges a run. The second is None unless ``total``.

        Raises:
            KeyError: no entry has that key.
            ValueError: delta outside (0, 1).
        """
        with self._lock:
            run = dict(self._find(key))
            job = self.epsilon(delta, job=run["job"], including=run)
            every = self.epsilon(delta, including=run) if total else None
        return job, every

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
        """The saved form: format ``LEDGER_VERSION``, whether the ledger is legacy and
        how many of its entries are, when it began recording every run, the entries.
        (A release before versions reads ``entries`` only.)"""
        with self._lock:
            return {"version": LEDGER_VERSION, "legacy": self.legacy,
                    "legacy_entries": self.legacy_entries,
                    "complete_since": self.complete_since,
                    "entries": [dict(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        """The ledger ``d`` (:meth:`to_dict`'s form, or an earlier release's
        ``{"entries": [...]}``: one a release before 0.2 began loads ``legacy`` with its
        entries legacy, one 0.2.0 began loads complete from its start; the class
        docstring, Upgrades).

        Raises: ValueError: an unknown version, a bad ``legacy``, ``legacy_entries`` or
            ``complete_since``, or as :func:`_normalised` (a bad or repeated entry)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a ledger is a table, not a {type(d).__name__}")
        entries = _normalised(d.get("entries", []))
        version = d.get("version")
        if version is None:  # 0.2.0, or a release before 0.2 (DP-SGD runs only)
            earlier = _before_mechanisms(d.get("entries", []))
            if earlier or not entries:
                return cls(entries=entries, legacy=True, legacy_entries=earlier)
            # 0.2.0 recorded every run from the ledger's first: no reveal predates it
            return cls(entries=entries, complete_since=0.0)
        if version != LEDGER_VERSION or isinstance(version, bool):
            raise ValueError(f"version {version!r}: this release reads {LEDGER_VERSION} "
                             "(a ledger saved by a later release)")
        legacy, count, since = d.get("legacy"), d.get("legacy_entries"), d.get("complete_since")
        if not isinstance(legacy, bool):
            raise ValueError(f"legacy {legacy!r} is not true or false")
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 0 <= count <= len(entries):
            raise ValueError(f"legacy_entries {count!r} is not an integer from 0 to the "
                             f"{len(entries)} entries")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)
                                  or not math.isfinite(since)):
            raise ValueError(f"complete_since {since!r} is not a time")
        return cls(entries=entries, legacy=legacy, legacy_entries=count,
                   complete_since=None if since is None else float(since))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON atomically (temp file, fsync, rename, fsync of the
        directory, so the rename itself survives a power cut): a site's spent budget
        must survive a crash. A write that fails (a full disk) before the rename leaves
        the saved ledger as it was and no temp file behind. The first save sets
        ``complete_since`` (this release records every run from then on).

        Raises: OSError."""
        import time

        from fedge.update.files import write_atomic

        with self._lock:
            first = self.complete_since is None
            if first:
                self.complete_since = time.time()
            try:
                write_atomic(Path(path), json.dumps(self.to_dict()).encode())
            except BaseException:
                if first:
                    self.complete_since = None
                raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a saved ledger; a missing file is an empty ledger. Entries saved without
        a status (earlier releases) are released: never less spend after an upgrade. A
        file saved without a version loads ``legacy`` where a release before 0.2 (which
        recorded DP-SGD runs only) recorded entries of it, not where 0.2.0 began it
        (:meth:`from_dict`).

        Raises:
            LedgerUnreadable: the file (or its directory) cannot be read, e.g. it
                belongs to another user (names the file and the chown that mends it).
            ValueError: the file is not a ledger (names the file and the problem).
        """
        target = Path(path)
        try:
            text = target.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):  # no ledger there (a plain file
            return cls()  # where privacy/ belongs holds none): empty; its save then fails
        except OSError as exc:  # EACCES of the file or its directory, EIO: never "empty"
            raise LedgerUnreadable(target, exc) from exc
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or "entries" not in data:
                raise ValueError("no entries")
            return cls.from_dict(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"privacy ledger {target}: not a valid ledger: {exc}") from exc


def ledger_run(release: Any) -> tuple[PrivacyLedger, EntryKey] | None:
    """The ledger and the entry a run's ``release`` charges, when it is
    ``functools.partial(ledger.release, key, ...)`` (as ``fedge.agent.trainer``'s
    ``LocalResult.release_privacy`` is); None for any other callable."""
    if not isinstance(release, functools.partial) or len(release.args) != 1:
        return None
    ledger = getattr(release.func, "__self__", None)
    if not isinstance(ledger, PrivacyLedger) \
            or getattr(release.func, "__func__", None) is not PrivacyLedger.release:
        return None
    key = release.args[0]
    if not isinstance(key, tuple) or len(key) != 3:
        return None
    return ledger, key


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
    the smallest site's sampling rate (batch_size / n_train, the worst case). ε is
    for replacing one record (``epsilon_for``: a site's record count is released with
    its updates), so it is about twice what an add-or-remove accountant gives.

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
    """Smallest noise multiplier (to 1e-3 relative) reaching ``target_epsilon`` over
    ``steps`` Poisson-sampled Gaussian steps, ε for replacing one record
    (``epsilon_for``).

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
