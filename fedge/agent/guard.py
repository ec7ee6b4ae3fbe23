"""What an appliance will not do for a coordinator, whatever the coordinator asks.

Secure aggregation hides one hospital's update only if the appliance itself holds
the line; the coordinator chooses the plan, the cohort, the weights, the seeds and
whether a round is secure, so none of those can be trusted to protect the site:

- `PrivacyPolicy` (agent.toml ``[privacy]``): the hospital's own floor. By default a
  plan without secure aggregation is refused, and so is an aggregation cohort
  smaller than ``min_cohort``.
- `RevealLog`: an update is summed for the coordinator over one survivor set only.
  Training is deterministic under the coordinator's seeds, so a coordinator could
  ask for the same update twice (the same task again, the same round re-sent, the
  same model in another round or job) and sum it with and without one site: the
  difference is that site's update. Before this appliance reveals the shares that
  unmask a sum, it records the update's digest with the survivor set it signed; a
  later session over the same update and another survivor set is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.secagg.errors import UpdateAlreadySummed
from fedge.update.files import write_json

log = logging.getLogger("fedge.agent")

__all__ = ["PrivacyPolicy", "PrivacyPolicyError", "RevealLog", "RevealLogError", "update_digest"]


class PrivacyPolicyError(ValueError):
    """An agent.toml ``[privacy]`` value breaks its rule (named)."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The hospital's floor, checked on every task whatever the plan says.

    ``require_secure_aggregation``: refuse a plan with ``[secagg] enabled = false``
    and any plain (unmasked) aggregation. ``require_dp``: refuse a plan without
    DP-SGD or DP-FedAvg (across rounds, only DP bounds what a malicious coordinator
    learns of one site). ``min_cohort``: refuse to send a masked
    update to a secure aggregation over fewer sites than this (2 at least: a sum over
    one site is that site's update). A plain update, where a policy allows one, is
    seen by the coordinator alone whatever the cohort.
    """

    require_secure_aggregation: bool = True
    min_cohort: int = 2
    require_dp: bool = False

    KEYS = ("require_secure_aggregation", "min_cohort", "require_dp")

    def __post_init__(self) -> None:
        if not isinstance(self.require_secure_aggregation, bool):
            raise PrivacyPolicyError(
                f"privacy.require_secure_aggregation = {self.require_secure_aggregation!r} "
                "must be true or false")
        if not isinstance(self.require_dp, bool):
            raise PrivacyPolicyError(f"privacy.require_dp = {self.require_dp!r} must be true "
                                     "or false")
        m = self.min_cohort
        if isinstance(m, bool) or not isinstance(m, int) or m < 2:
            raise PrivacyPolicyError(f"privacy.min_cohort = {m!r} must be an integer >= 2")

    @classmethod
    def from_config(cls, table: Mapping[str, Any]) -> PrivacyPolicy:
        """Raises: PrivacyPolicyError: not a table, an unknown key or a bad value."""
        if not isinstance(table, Mapping):
            raise PrivacyPolicyError(f"[privacy] = {table!r} must be a table")
        unknown = sorted(set(table) - set(cls.KEYS))
        if unknown:
            raise PrivacyPolicyError(f"[privacy] key(s) {unknown} unknown; known: "
                                     f"{', '.join(cls.KEYS)}")
        return cls(**dict(table))

    def refuse_plan(self, secure: bool, dp: bool = False) -> str | None:
        """Why a plan is refused, or None. ``dp``: the plan has privacy.dp or
        privacy.client_dp."""
        if self.require_secure_aggregation and not secure:
            return ("this appliance requires secure aggregation ([privacy] "
                    "require_secure_aggregation in its agent.toml) and the plan disables it")
        if self.require_dp and not dp:
            return ("this appliance requires differential privacy ([privacy] require_dp in "
                    "its agent.toml) and the plan has neither privacy.dp nor "
                    "privacy.client_dp")
        return None

    def refuse_aggregation(self, *, plan_secure: bool, secure: bool, cohort: int,
                           weight_scale: float, client_dp_cohort: int | None) -> str | None:
        """Why an AggregateBegin is refused, or None."""
        if not secure and (plan_secure or self.require_secure_aggregation):
            why = "the plan enables it" if plan_secure else "this appliance requires it"
            return f"a plain (unmasked) aggregation was asked for, but {why}"
        if secure and cohort < self.min_cohort:  # a plain update is seen alone anyway
            return (f"an aggregation over {cohort} site(s) is below this appliance's "
                    f"min_cohort {self.min_cohort}")
        if not (np.isfinite(weight_scale) and 0.0 < weight_scale <= 1.0):
            return f"weight_scale {weight_scale!r} must lie in (0, 1]"
        if client_dp_cohort is not None and client_dp_cohort > cohort:
            return (f"DP-FedAvg noise was drawn for a cohort of {client_dp_cohort} but the "
                    f"aggregation has {cohort} sites: the sum would carry less noise than "
                    "the plan's epsilon assumes")
        return None


def update_digest(update: np.ndarray, n_examples: int) -> bytes:
    """SHA-256 of an update as it is summed, before any scaling: the clipped
    Δ (and Δc) and the example count. Not the trained weights: the coordinator chooses
    the model, and a change that moves no update (a Cox model's unused bias, a
    constant on every logit) would make the same update look new."""
    h = hashlib.sha256(b"fedge/update/v2")
    h.update(np.ascontiguousarray(update, dtype="<f4").tobytes())
    h.update(int(n_examples).to_bytes(8, "big"))
    return h.digest()


class RevealLogError(Exception):
    """The reveal log cannot be read: nothing may be revealed until it can."""


NEAR = 0.01  # updates closer than this, relative to their norm, count as the same
SKETCH_BUCKETS = 128  # at most 128: a bucket and a sign share one byte
SKETCH_SCHEME = 2  # how sketches are made; 1 (two draws per coordinate) was never released


class RevealLog:
    """Which survivor set each update was summed over, kept on disk when ``path`` is
    given (0600, atomic).

    Two rules, checked before the shares that unmask a sum leave the site:

    - the same update (``update_digest``) is summed over one survivor set only,
      whenever it was (exact digests are never forgotten);
    - an update within ``NEAR`` (1 %) of one summed over another survivor set among
      the newest ``sketches`` is refused too: a coordinator that moves its model a
      hair between two questions would otherwise get two near-equal updates and
      their difference, one site's update to within that hair. Distances come from
      a count sketch (``SKETCH_BUCKETS`` signed buckets per update, the hashing keyed
      by a secret of this log that never leaves the site).

    A log that cannot be read (unreadable, corrupt) is not reset: every reveal is
    refused, naming the file, until it is restored or moved aside by hand.
    """

    def __init__(self, path: Path | None = None, *, sketches: int = 1024) -> None:
        self.path = Path(path) if path is not None else None
        self.sketches = sketches
        self._lock = threading.Lock()
        self._entries: dict[str, list[str]] = {}
        self._times: dict[str, float] = {}
        self._sketches: list[tuple[np.ndarray, float, list[str]]] = []
        self._key = secrets.token_bytes(16)
        self.error: str | None = None
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            text = path.read_text()
        except OSError as exc:
            self.error = (f"secure aggregation reveal log {path} cannot be read ({exc}); "
                          "nothing is revealed until it can")
            log.error("%s", self.error)
            return
        try:
            data = json.loads(text)
            self._key = bytes.fromhex(data["key"])
            for row in data["entries"]:
                digest, survivors, at = row["digest"], row["survivors"], row.get("at", 0.0)
                if not (isinstance(digest, str) and isinstance(survivors, list)
                        and all(isinstance(s, str) for s in survivors)):
                    raise ValueError(f"bad entry {row!r:.80}")
                self._entries[digest] = survivors
                self._times[digest] = float(at)
            # sketches made another way compare with nothing: dropped (digests kept)
            rows = data.get("sketches", []) if data.get("sketch_scheme") == SKETCH_SCHEME \
                else []
            for row in rows:
                sketch = np.frombuffer(base64.b64decode(row["sketch"]), dtype="<f4")
                if sketch.size != SKETCH_BUCKETS:
                    raise ValueError(f"sketch of {sketch.size} buckets")
                self._sketches.append((sketch.astype(np.float64), float(row["norm"]),
                                       [str(x) for x in row["survivors"]]))
        except (ValueError, KeyError, TypeError) as exc:
            self._entries, self._times, self._sketches = {}, {}, []
            self.error = (f"secure aggregation reveal log {path} is corrupt ({exc}); nothing "
                          "is revealed until it is restored, or moved aside by hand (which "
                          "forgets what this site revealed)")
            log.error("%s", self.error)

    def sketch(self, update: np.ndarray) -> np.ndarray:
        """A count sketch of ``update``: each coordinate added, with a sign, into one of
        ``SKETCH_BUCKETS`` buckets chosen by this log's secret key."""
        x = np.asarray(update, dtype=np.float64).ravel()
        rng = np.random.default_rng(int.from_bytes(self._key, "big"))
        # one byte per coordinate: its low 7 bits the bucket, its high bit the sign
        h = rng.integers(0, 2 * SKETCH_BUCKETS, x.size, dtype=np.uint8)
        signed = np.where(h < SKETCH_BUCKETS, x, -x)
        return np.bincount(h & (SKETCH_BUCKETS - 1), weights=signed,
                           minlength=SKETCH_BUCKETS)

    def check_and_record(self, digest: bytes, survivors: Sequence[str],
                         update: np.ndarray | None = None) -> None:
        """Allow revealing the unmasking shares of a sum over ``survivors`` that holds the
        update ``digest`` (values ``update``): recorded on disk before returning.

        Raises:
            UpdateAlreadySummed: this update, or one within NEAR of it, was summed over
                another survivor set.
            RevealLogError: the log could not be read.
            OSError: the record cannot be written (nothing may then be revealed).
        """
        key, now = digest.hex(), sorted(survivors)
        with self._lock:
            if self.error is not None:
                raise RevealLogError(self.error)
            earlier = self._entries.get(key)
            if earlier is not None:
                if earlier != now:
                    raise UpdateAlreadySummed(
                        f"this update was already summed over {len(earlier)} sites "
                        f"{earlier}; a second sum over {now} would give the coordinator "
                        "the difference (a job re-run over other sites needs another seed)")
                return
            sketch, norm = None, 0.0
            if update is not None:
                norm = float(np.linalg.norm(np.asarray(update, dtype=np.float64)))
                sketch = self.sketch(update)
                for other, other_norm, sites in self._sketches:
                    if sites == now or norm == 0.0:
                        continue
                    if float(np.linalg.norm(sketch - other)) <= NEAR * max(norm, other_norm):
                        raise UpdateAlreadySummed(
                            f"an update within {NEAR:.0%} of this one was already summed "
                            f"over {len(sites)} sites {sites}; a second sum over {now} "
                            "would give the coordinator the difference")
            self._entries[key] = now
            self._times[key] = time.time()
            if sketch is not None:
                self._sketches.append((sketch, norm, now))
                del self._sketches[:-self.sketches]
            if self.path is not None:
                try:
                    write_json(self.path, self._state())
                except OSError:
                    del self._entries[key]
                    if sketch is not None:
                        self._sketches.pop()
                    raise

    def _state(self) -> dict[str, Any]:
        return {
            "key": self._key.hex(),
            "sketch_scheme": SKETCH_SCHEME,
            "entries": [{"digest": d, "survivors": s, "at": self._times.get(d, 0.0)}
                        for d, s in self._entries.items()],
            "sketches": [{"sketch": base64.b64encode(sk.astype("<f4").tobytes()).decode(),
                          "norm": n, "survivors": s} for sk, n, s in self._sketches],
        }
