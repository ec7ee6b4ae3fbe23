"""Fleet roll-out of one signed target: a canary first, then the rest, one site
at a time; stop at the first failed install. Sans-I/O: the coordinator feeds it
outcomes and the clock and sends what it returns.

Transitions (state, event) -> state::

    pending   --start-->              canary     (UpdateAvailable to the canary)
    canary    --ok-->                 rest       (UpdateAvailable to the next site)
    rest      --ok, sites left-->     rest
    rest      --ok, none left-->      succeeded
    canary/rest --failed outcome-->   failed     (nobody else is told)
    canary/rest --transport outcome-> unchanged  (the same site asked again at once)
    canary/rest --deadline-->         failed

A failed outcome stops the roll-out: a bundle that does not verify or install, or
software that fails its health check, is what the canary is there to catch. A
*transport* outcome (`fedge.update.messages.transport_failure`: the agent's fetch
requests went unanswered after its retries, its connection lost) says nothing about
the bundle and nothing was installed: that site is asked again, and only its
deadline stops the roll-out.

The awaited site is asked again, with no change of state, whenever it reconnects
(`reask`) and every quarter of the deadline while it stays silent (`due`): an ask
or an outcome lost with a dying connection or a crashed coordinator is sent
again, and the agent does not install twice (it answers a repeated ask with the
outcome it already reported, and ignores one for an install still running).

Two clocks: ``now`` (every method's) measures the deadline and the re-asks and must
never step (the coordinator passes ``time.monotonic``), so an NTP step neither fails
an install still running nor stretches the wait for a silent site. ``wall`` (given
with ``now`` wherever a site is asked) dates the ask for :meth:`Rollout.to_state`:
a monotonic reading means nothing to the next boot, so the saved state holds the
wall-clock time of the ask, and :meth:`Rollout.from_state` turns it back into the
new process's ``now`` (the downtime counts against the deadline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedge.update.messages import UpdateAvailable, UpdateOutcome, transport_failure

TRANSITIONS: dict[tuple[str, str], str] = {
    ("pending", "start"): "canary",
    ("canary", "ok"): "rest",
    ("rest", "ok"): "rest",
    ("rest", "done"): "succeeded",
    ("canary", "failed"): "failed",
    ("rest", "failed"): "failed",
    ("canary", "transport"): "canary",
    ("rest", "transport"): "rest",
}


@dataclass
class Rollout:
    rollout_id: str
    path: str
    sites: list[str]
    deadline_s: float = 120.0
    state: str = "pending"
    results: dict[str, dict[str, object]] = field(default_factory=dict)
    failure: str = ""
    _next: int = 0
    _waiting_since: float = 0.0  # on the ``now`` clock (module doc)
    _waiting_since_wall: float = 0.0  # the same instant on the wall clock, as saved
    _asked_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("a roll-out needs at least one site (the canary)")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"roll-out sites {self.sites} name a site twice")
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            # nan <= 0 is False: a NaN deadline failed every roll-out at once
            raise ValueError(f"deadline_s {self.deadline_s} must be a finite number of "
                             "seconds > 0")

    @property
    def canary(self) -> str:
        return self.sites[0]

    @property
    def waiting_for(self) -> str | None:
        return self.sites[self._next] if self.state in ("canary", "rest") else None

    @property
    def done(self) -> bool:
        return self.state in ("succeeded", "failed")

    def _go(self, event: str) -> None:
        self.state = TRANSITIONS[(self.state, event)]

    def start(self, now: float, wall: float | None = None
              ) -> list[tuple[str, UpdateAvailable]]:
        """Ask the canary. ``wall``: the wall clock's time (module doc); None: ``now``
        (one clock for both).

        Raises: RuntimeError if already started."""
        if self.state != "pending":
            raise RuntimeError(f"roll-out {self.rollout_id} already {self.state}")
        self._go("start")
        return self._ask(now, wall)

    @property
    def reask_interval_s(self) -> float:
        """How long the awaited site may stay silent before it is asked again."""
        return self.deadline_s / 4

    def _ask(self, now: float, wall: float | None) -> list[tuple[str, UpdateAvailable]]:
        self._waiting_since = self._asked_at = now
        self._waiting_since_wall = now if wall is None else wall
        return [(self.sites[self._next], UpdateAvailable(self.rollout_id, self.path))]

    def receive(self, site: str, outcome: UpdateOutcome, now: float,
                wall: float | None = None) -> list[tuple[str, UpdateAvailable]]:
        """Feed one agent's outcome. Outcomes from sites not being waited on, or for
        another roll-out or path, are ignored (returns []). A transport failure asks
        the site again (module doc). ``wall`` as for :meth:`start`."""
        if (self.done or site != self.waiting_for or outcome.rollout_id != self.rollout_id
                or outcome.path != self.path):
            return []
        self.results[site] = {"ok": outcome.ok, "rolled_back": outcome.rolled_back,
                              "detail": outcome.detail}
        if transport_failure(outcome):
            self._go("transport")  # the deadline keeps running from the first ask
            return self.reask(site, now)
        if not outcome.ok:
            role = "canary" if self.state == "canary" else "site"
            self.failure = (f"{role} {site} failed to install {self.path}: {outcome.detail}; "
                            f"roll-out stopped, {len(self.sites) - self._next - 1} site(s) "
                            "not updated")
            self._go("failed")
            return []
        self._next += 1
        self._go("ok")
        if self._next == len(self.sites):
            self._go("done")
            return []
        return self._ask(now, wall)

    def reask(self, site: str, now: float) -> list[tuple[str, UpdateAvailable]]:
        """``site`` is back (reconnected, or first seen by a restarted coordinator): if it
        is the site being waited on, ask it again, since the ask or its outcome may have
        been lost with the old connection. The deadline keeps running from the first
        ask; the agent answers a repeated ask with the outcome it already reported."""
        if self.waiting_for != site:
            return []
        self._asked_at = now
        return [(site, UpdateAvailable(self.rollout_id, self.path))]

    def due(self, now: float) -> list[tuple[str, UpdateAvailable]]:
        """The awaited site, asked again if it has been silent for `reask_interval_s`
        since it was last asked (a message lost on a connection that never dropped)."""
        site = self.waiting_for
        if site is None or now - self._asked_at < self.reask_interval_s:
            return []
        return self.reask(site, now)

    def tick(self, now: float) -> None:
        if self.done or now - self._waiting_since < self.deadline_s:
            return
        site = self.waiting_for
        last = self.results.get(site or "?", {})
        fetch = str(last.get("detail", "")) if not last.get("ok", True) else ""
        self.results[site or "?"] = {"ok": False, "rolled_back": False,
                                     "detail": f"no outcome within {self.deadline_s:g} s"
                                     + (f"; last: {fetch}" if fetch else "")}
        self.failure = (f"{site} did not report an outcome for {self.path} within "
                        f"{self.deadline_s:g} s; roll-out stopped")
        if fetch:
            self.failure = (f"{site} could not fetch {self.path} within "
                            f"{self.deadline_s:g} s (last: {fetch}); roll-out stopped")
        self._go("failed")

    def to_state(self) -> dict[str, Any]:
        """Everything needed to go on after a coordinator restart (JSON-able); its
        ``waiting_since`` is the wall-clock time of the ask (module doc)."""
        return {**self.to_dict(), "deadline_s": self.deadline_s, "next": self._next,
                "waiting_since": self._waiting_since_wall}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, now: float | None = None,
                   wall: float | None = None) -> Rollout:
        """The roll-out :meth:`to_state` saved. The deadline runs on from the saved
        ``waiting_since`` (wall-clock seconds), so downtime counts against it: given
        this process's ``now`` and ``wall`` (read together), the wait so far is
        ``wall - waiting_since`` (none if the wall clock is now before it) and the
        deadline counts from ``now`` less that; without them, from ``waiting_since``
        on the one clock given to later calls.

        Raises:
            ValueError: a field is missing or out of range (named), or only one of
                ``now`` and ``wall`` is given.
        """
        if (now is None) != (wall is None):
            raise ValueError("Rollout.from_state needs both now and wall, or neither")
        try:
            r = cls(str(state["rollout_id"]), str(state["path"]),
                    [str(s) for s in state["sites"]], float(state["deadline_s"]))
            r.state, r.failure = str(state["state"]), str(state["failure"])
            r.results = {str(k): dict(v) for k, v in state["results"].items()}
            r._next, r._waiting_since_wall = int(state["next"]), float(state["waiting_since"])
            r._waiting_since = r._waiting_since_wall
            if now is not None and wall is not None:
                r._waiting_since = now - max(0.0, wall - r._waiting_since_wall)
            r._asked_at = r._waiting_since
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"saved roll-out lacks or mistypes {exc}") from exc
        valid = {s for pair in TRANSITIONS.items() for s in (pair[0][0], pair[1])}
        if r.state not in valid:
            raise ValueError(f"saved roll-out {r.rollout_id}: unknown state {r.state!r}")
        if not 0 <= r._next <= len(r.sites) or (r._next == len(r.sites)) != (
                r.state == "succeeded"):
            raise ValueError(f"saved roll-out {r.rollout_id}: next={r._next} does not fit "
                             f"state {r.state!r} with {len(r.sites)} site(s)")
        return r

    def to_dict(self) -> dict[str, object]:
        return {"rollout_id": self.rollout_id, "path": self.path, "sites": self.sites,
                "state": self.state, "waiting_for": self.waiting_for,
                "results": self.results, "failure": self.failure}
