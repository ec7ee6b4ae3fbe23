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

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.secagg.errors import UpdateAlreadySummed
from fedge.update.files import set_aside, write_json

log = logging.getLogger("fedge.agent")

__all__ = ["PrivacyPolicy", "PrivacyPolicyError", "RevealLog", "update_digest"]


class PrivacyPolicyError(ValueError):
    """An agent.toml ``[privacy]`` value breaks its rule (named)."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The hospital's floor, checked on every task whatever the plan says.

    ``require_secure_aggregation``: refuse a plan with ``[secagg] enabled = false``
    and any plain (unmasked) aggregation. ``min_cohort``: refuse to send a masked
    update to a secure aggregation over fewer sites than this (2 at least: a sum over
    one site is that site's update). A plain update, where a policy allows one, is
    seen by the coordinator alone whatever the cohort.
    """

    require_secure_aggregation: bool = True
    min_cohort: int = 2

    KEYS = ("require_secure_aggregation", "min_cohort")

    def __post_init__(self) -> None:
        if not isinstance(self.require_secure_aggregation, bool):
            raise PrivacyPolicyError(
                f"privacy.require_secure_aggregation = {self.require_secure_aggregation!r} "
                "must be true or false")
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

    def refuse_plan(self, secure: bool) -> str | None:
        """Why a plan is refused, or None."""
        if self.require_secure_aggregation and not secure:
            return ("this appliance requires secure aggregation ([privacy] "
                    "require_secure_aggregation in its agent.toml) and the plan disables it")
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


def update_digest(weights: np.ndarray, delta_control: np.ndarray | None,
                  n_examples: int) -> bytes:
    """SHA-256 of a trained update as the site produced it, before any scaling."""
    h = hashlib.sha256(b"fedge/update/v1")
    h.update(np.ascontiguousarray(weights, dtype="<f4").tobytes())
    h.update(b"\x00" if delta_control is None else
             b"\x01" + np.ascontiguousarray(delta_control, dtype="<f4").tobytes())
    h.update(int(n_examples).to_bytes(8, "big"))
    return h.digest()


class RevealLog:
    """Which survivor set each update was summed over, kept on disk when ``path`` is
    given (0600, atomic; the newest ``keep`` entries)."""

    def __init__(self, path: Path | None = None, *, keep: int = 1024) -> None:
        self.path = Path(path) if path is not None else None
        self.keep = keep
        self._lock = threading.Lock()
        self._entries: dict[str, list[str]] = {}
        self._times: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            rows = json.loads(path.read_text())["entries"]
            for row in rows:
                digest, survivors, at = row["digest"], row["survivors"], row.get("at", 0.0)
                if not (isinstance(digest, str) and isinstance(survivors, list)
                        and all(isinstance(s, str) for s in survivors)):
                    raise ValueError(f"bad entry {row!r:.80}")
                self._entries[digest] = survivors
                self._times[digest] = float(at)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = set_aside(path, log)
            log.error("secure aggregation reveal log %s is unreadable (%s); moved to %s, "
                      "starting a new one", path, exc, aside)
            self._entries, self._times = {}, {}

    def check_and_record(self, digest: bytes, survivors: Sequence[str]) -> None:
        """Allow revealing the unmasking shares of a sum over ``survivors`` that holds the
        update ``digest``: the first time, recorded (on disk before returning); again,
        only over the very same survivors.

        Raises:
            UpdateAlreadySummed: this update was summed over another survivor set.
            OSError: the record cannot be written (nothing may then be revealed).
        """
        key, now = digest.hex(), sorted(survivors)
        with self._lock:
            earlier = self._entries.get(key)
            if earlier is not None:
                if earlier != now:
                    raise UpdateAlreadySummed(
                        f"this update was already summed over {len(earlier)} sites "
                        f"{earlier}; a second sum over {now} would give the coordinator "
                        "the difference (a job re-run over other sites needs another seed)")
                return
            self._entries[key] = now
            self._times[key] = time.time()
            while len(self._entries) > self.keep:
                oldest = next(iter(self._entries))
                del self._entries[oldest]
                self._times.pop(oldest, None)
            if self.path is not None:
                try:
                    write_json(self.path, {"entries": [
                        {"digest": d, "survivors": s, "at": self._times.get(d, 0.0)}
                        for d, s in self._entries.items()]})
                except OSError:
                    del self._entries[key]
                    raise
