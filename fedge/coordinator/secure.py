"""SecAgg+ as the round's aggregation protocol (wraps ``fedge.secagg.ServerSession``).

Both ends derive the same :class:`~fedge.secagg.config.SecAggConfig` from the
plan and the aggregation cohort with :func:`secagg_config`, so the threshold,
the neighbour degree and the vector length never travel as free parameters.

A site that refuses its part (``TaskRefused``: an agent's ``SecAggAbort``, a
reveal its log forbids) sends nothing more, so the session need not wait for
its stage deadline: ``ServerSession.refuse`` drops it at once, closing a stage
that waits only for refusers, and failing an unmasking that some secret can no
longer complete, saying which.

The plan's ``job.min_clients`` bounds every sum the coordinator can unmask, not only
the cohort that trains: it is the configuration's ``min_clients`` (the session
produces no sum of fewer masked inputs), and :class:`SecureAggregation` fails the
attempt as soon as the sites whose masked input is in the sum, or may still be sent,
fall below it (a site lost or refusing at the key stages), before any further input
leaves a site (and its DP run is charged for it). The attempt is retried as any
failed attempt is.

A message the session discards that no honest site sends (a body naming another
site, job or round, a malformed one, the wrong message for the stage, a second
answer: ``ServerSession.discards``) is answered ``Rejected`` with the session's
reason, before anything else the session sends (a ``Refusal`` carrying the
session's kind of discard); the round notes it in ``Round.rejected`` and the
coordinator audits it ("rejected_message", throttled by that kind).
The expected ones (a dropped site's late answer, anything once the session is over)
stay quiet.

A committed sum carries the senders of any false unmasking shares the session found
and left out (``SecAggResult.false_shares`` as ``AggregationResult.false_shares``):
the round audits them ("false_unmask_share"). A sum that fails names them in its
failure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedge.coordinator.plan import Plan
from fedge.coordinator.rounds import (
    Aggregation,
    AggregationFactory,
    AggregationResult,
    Refusal,
    RoundInfo,
)

if TYPE_CHECKING:
    from fedge.coordinator.service import Coordinator
    from fedge.secagg.config import SecAggConfig


def secagg_config(plan: Plan, n: int, vector_length: int) -> SecAggConfig:
    """The round's SecAgg+ parameters for an aggregation cohort of ``n`` sites.

    Raises:
        SecAggConfigError: the plan's alpha/delta admit no threshold for this n.
    """
    from fedge.secagg.config import SecAggConfig

    # capped at n: a cohort smaller than min_clients (a round pinned to an older
    # attempt's survivors) gets a config, and SecureAggregation fails it by name
    return SecAggConfig.derive(
        n, alpha=plan.secagg.alpha, delta=plan.secagg.delta, clip=plan.secagg.clip,
        vector_length=vector_length, stage_timeout=plan.deadlines.secagg_stage_s,
        min_clients=min(plan.min_clients, n),
    )


# the server stages a site dropped in before its masked input could be in the sum
_BEFORE_INPUT = ("AdvertiseKeys", "ShareKeys", "MaskedInput")


class SecureAggregation:
    """Adapter from ``ServerSession`` to the round's :class:`Aggregation` protocol."""

    def __init__(self, plan: Plan, info: RoundInfo, cohort: list[str], dim: int,
                 roster: Any, threads: int = 1) -> None:
        from fedge.secagg.config import RoundContext
        from fedge.secagg.errors import SecAggConfigError
        from fedge.secagg.server import ServerSession

        self._failure: str | None = None
        self._result: AggregationResult | None = None
        self.session: Any = None
        self.min_clients = plan.min_clients
        try:
            config = secagg_config(plan, len(cohort), dim)
            self.session = ServerSession(
                config, RoundContext(info.job_id, info.round, info.model_digest), list(cohort),
                roster, threads=threads)
        except SecAggConfigError as exc:
            self._failure = f"secure aggregation cannot run over {len(cohort)} sites: {exc}"

    def start(self, now: float) -> list[tuple[str, Any]]:
        return self._checked(lambda s: s.start(now))

    def receive(self, sender: str, body: Any, now: float) -> list[tuple[str, Any]]:
        out = self._checked(lambda s: s.receive(sender, body, now))
        if self.session is None or not self.session.discards:
            return out
        # what the session discarded and noted goes first: a stage the message closed
        # may fail the attempt, and the failure sends nothing after it
        return [(d.sender, Refusal(d.kind, d.why)) for d in self.session.take_discards()] + out

    def tick(self, now: float) -> list[tuple[str, Any]]:
        return self._checked(lambda s: s.tick(now))

    def refused(self, sender: str, now: float) -> list[tuple[str, Any]]:
        """``sender`` refused its part, or was lost (see the module docstring and
        ``ServerSession.refuse``)."""
        return self._checked(lambda s: s.refuse(sender, now))

    def awaits_input(self, sender: str) -> bool:
        """Whether ``sender``'s masked input can still come into the sum
        (``ServerSession.awaits_masked_input``)."""
        return (self.session is not None and self._failure is None
                and self.session.awaits_masked_input(sender))

    @property
    def answered(self) -> list[str]:
        """The sites whose answer to the session's current stage is in
        (``ServerSession.answered``); none once the aggregation failed."""
        if self.session is None or self._failure is not None:
            return []
        return self.session.answered

    def _checked(self, step: Any) -> list[tuple[str, Any]]:
        """The session's messages from ``step(session)``, or none once the sites that
        can still be in the sum are fewer than the plan's min_clients (module doc):
        the failure then says so, and the next stage's requests never go."""
        if self.session is None or self._failure is not None:
            return []
        out = step(self.session)
        short = self._below_min_clients()
        if short:
            self._failure = short
            return []
        return list(out)

    def _below_min_clients(self) -> str | None:
        s = self.session
        if s.result is not None or s.failure is not None:
            return None  # its own outcome stands (a sum has >= min_clients inputs)
        gone = {c: st for c, st in s.dropped.items() if st in _BEFORE_INPUT}
        left = s.config.n - len(gone)
        if left >= self.min_clients:
            return None
        why = ", ".join(f"{c} in its {st} stage" for c, st in sorted(gone.items()))
        return (f"{left} site(s) left in secure aggregation, fewer than the plan's "
                f"min_clients {self.min_clients}" + (f" ({why} dropped out)" if why else "")
                + ": no sum is asked for")

    def postpone(self, seconds: float) -> None:
        if self.session is not None:
            self.session.postpone(seconds)

    @property
    def left_out(self) -> dict[str, str]:
        return {} if self.session is None else self.session.left_out

    @property
    def threshold(self) -> int:
        """t, as AggregateBegin tells the sites (each derives its own from the plan)."""
        return 0 if self.session is None else int(self.session.config.threshold)

    @property
    def result(self) -> AggregationResult | None:
        s = self.session
        if self._result is None and s is not None and s.result is not None:
            r = s.result
            self._result = AggregationResult(
                r.total, list(r.survivors), list(r.dropped),
                {h: list(w) for h, w in r.false_shares.items()},
                {h: list(w) for h, w in r.unused_shares.items()})
        return self._result

    @property
    def failure(self) -> str | None:
        s = self.session
        if self._failure is None and s is not None and s.failure is not None:
            self._failure = f"{type(s.failure).__name__}: {s.failure}"
        return self._failure


def secagg_factory(coord: Coordinator, threads: int = 1) -> AggregationFactory:
    """An aggregation factory that reads the coordinator's current roster."""

    def make(plan: Plan, info: RoundInfo, cohort: list[str], dim: int) -> Aggregation:
        from fedge.secagg.keys import Roster

        roster = Roster.from_bytes(coord.roster, coord.roster_public_key)
        return SecureAggregation(plan, info, cohort, dim, roster, threads)

    return make
