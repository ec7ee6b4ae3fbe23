"""SecAgg+ as the round's aggregation protocol (wraps ``fedge.secagg.ServerSession``).

Both ends derive the same :class:`~fedge.secagg.config.SecAggConfig` from the
plan and the aggregation cohort with :func:`secagg_config`, so the threshold,
the neighbour degree and the vector length never travel as free parameters.

A site that refuses its part (``TaskRefused``: an agent's ``SecAggAbort``, a
reveal its log forbids) sends nothing more, so the session need not wait for
its stage deadline: ``ServerSession.refuse`` drops it at once, closing a stage
that waits only for refusers, and failing an unmasking that some secret can no
longer complete, saying which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedge.coordinator.plan import Plan
from fedge.coordinator.rounds import Aggregation, AggregationFactory, AggregationResult, RoundInfo

if TYPE_CHECKING:
    from fedge.coordinator.service import Coordinator
    from fedge.secagg.config import SecAggConfig


def secagg_config(plan: Plan, n: int, vector_length: int) -> SecAggConfig:
    """The round's SecAgg+ parameters for an aggregation cohort of ``n`` sites.

    Raises:
        SecAggConfigError: the plan's alpha/delta admit no threshold for this n.
    """
    from fedge.secagg.config import SecAggConfig

    return SecAggConfig.derive(
        n, alpha=plan.secagg.alpha, delta=plan.secagg.delta, clip=plan.secagg.clip,
        vector_length=vector_length, stage_timeout=plan.deadlines.secagg_stage_s,
    )


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
        try:
            config = secagg_config(plan, len(cohort), dim)
            self.session = ServerSession(
                config, RoundContext(info.job_id, info.round, info.model_digest), list(cohort),
                roster, threads=threads)
        except SecAggConfigError as exc:
            self._failure = f"secure aggregation cannot run over {len(cohort)} sites: {exc}"

    def start(self, now: float) -> list[tuple[str, Any]]:
        return [] if self.session is None else self.session.start(now)

    def receive(self, sender: str, body: Any, now: float) -> list[tuple[str, Any]]:
        return [] if self.session is None else self.session.receive(sender, body, now)

    def tick(self, now: float) -> list[tuple[str, Any]]:
        return [] if self.session is None else self.session.tick(now)

    def refused(self, sender: str, now: float) -> list[tuple[str, Any]]:
        """``sender`` refused its part (see the module docstring and
        ``ServerSession.refuse``)."""
        return [] if self.session is None else self.session.refuse(sender, now)

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
            self._result = AggregationResult(r.total, list(r.survivors), list(r.dropped))
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
