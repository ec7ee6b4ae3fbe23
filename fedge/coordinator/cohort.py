"""Cohort selection: which appliances may take part in a round.

A site is a candidate when it is enrolled (not revoked), connected (heard from
within the heartbeat timeout), eligible by its own health policy, holds the
job's data set, and is not busy with another job. Every exclusion has a reason,
so an operator can see why a site sat a round out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedge.coordinator.store import Appliance


@dataclass(frozen=True)
class Selection:
    candidates: list[str]
    excluded: dict[str, str]


def select_cohort(appliances: Iterable[Appliance], *, connected: set[str], dataset: str,
                  busy: set[str] | None = None) -> Selection:
    """Split the fleet into candidates and excluded sites (with the reason)."""
    busy = busy or set()
    candidates: list[str] = []
    excluded: dict[str, str] = {}
    for a in appliances:
        if a.status != "enrolled":
            excluded[a.site_id] = f"status {a.status}"
        elif a.site_id not in connected:
            excluded[a.site_id] = "not connected"
        elif not a.eligible:
            excluded[a.site_id] = f"not eligible: {a.eligibility_reason or 'no reason given'}"
        elif dataset not in a.datasets:
            excluded[a.site_id] = f"does not hold data set {dataset!r}"
        elif a.site_id in busy:
            excluded[a.site_id] = "busy with another task"
        else:
            candidates.append(a.site_id)
    return Selection(sorted(candidates), excluded)
