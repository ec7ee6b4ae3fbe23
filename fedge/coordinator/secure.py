"""SecAgg+ as the round's aggregation protocol (wraps ``fedge.secagg.ServerSession``).

Both ends derive the same :class:`~fedge.secagg.config.SecAggConfig` from the
plan and the aggregation cohort with :func:`secagg_config`, so the threshold,
the neighbour degree and the vector length never travel as free parameters.

A site that refuses its part (``TaskRefused``: an agent's ``SecAggAbort``, a
reveal its log forbids) sends nothing more, so the session need not wait for
its stage deadline: once every site the stage still waits for has refused, the
stage closes at once; and in the unmasking stage, once the refusals leave some
secret with fewer than t sites able to send a share of it, the aggregation
fails at once, saying which. The session's own rules decide everything else
(its deadline, what a share is worth), read through its public state.
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
        self.threshold = 0
        self.session: Any = None
        self._refused: set[str] = set()
        # the stage the session was in when last seen, and who answered it (a message
        # of the stage's kind the session took)
        self._stage = ""
        self._answered: set[str] = set()
        # the unmask requests as sent: who was asked, for which survivors and dropped
        self._unmask_asked: set[str] = set()
        self._unmask_survivors: list[str] = []
        self._unmask_dropped: list[str] = []
        try:
            config = secagg_config(plan, len(cohort), dim)
            self.threshold = config.threshold
            self.session = ServerSession(
                config, RoundContext(info.job_id, info.round, info.model_digest), list(cohort),
                roster, threads=threads)
        except SecAggConfigError as exc:
            self._failure = f"secure aggregation cannot run over {len(cohort)} sites: {exc}"

    def start(self, now: float) -> list[tuple[str, Any]]:
        return [] if self.session is None else self._sent(self.session.start(now))

    def receive(self, sender: str, body: Any, now: float) -> list[tuple[str, Any]]:
        if self.session is None:
            return []
        self._follow_stage()
        discarded = self.session.discarded
        out = self.session.receive(sender, body, now)
        if self._follow_stage() and self._expects(body) \
                and self.session.discarded == discarded:  # taken, not discarded
            self._answered.add(sender)
        return self._sent(out) + self._close_if_only_refused(now)

    def tick(self, now: float) -> list[tuple[str, Any]]:
        return [] if self.session is None else self._sent(self.session.tick(now))

    def refused(self, sender: str, now: float) -> list[tuple[str, Any]]:
        """``sender`` refused its part (see the module docstring).

        A refusal after its answer to the current stage changes nothing (the answer
        stands, as in ``Round``'s training)."""
        s = self.session
        if s is None or s.done or sender not in s.cohort or sender in s.dropped:
            return []  # a dropped site is out already
        self._follow_stage()
        if sender in self._answered:
            return []
        self._refused.add(sender)
        if s.stage == "Unmasking":
            impossible = self._unmask_impossible()
            if impossible:
                self._failure = impossible
                return []
        return self._close_if_only_refused(now)

    def _close_if_only_refused(self, now: float) -> list[tuple[str, Any]]:
        """Close the stage now when every site it still waits for has refused."""
        s = self.session
        if s.done or not self._refused:
            return []
        self._follow_stage()
        waiting = set(s.cohort) - set(s.dropped) - self._answered
        if not waiting <= self._refused:
            return []
        s.deadline = now  # nobody it waits for will answer
        return self._sent(s.tick(now))

    def _follow_stage(self) -> bool:
        """Forget the answers of a stage the session has left; whether it is the same
        stage as when last seen."""
        stage = self.session.stage
        if stage != self._stage:
            self._stage, self._answered = stage, set()
            return False
        return True

    def _expects(self, body: Any) -> bool:
        from fedge.secagg.server import SERVER_TRANSITIONS

        expected = SERVER_TRANSITIONS.get(self.session.stage)
        return expected is not None and type(body).__name__ == expected[0]

    def _sent(self, out: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        from fedge.secagg.messages import UnmaskRequest

        for site, body in out:
            if isinstance(body, UnmaskRequest):
                self._unmask_asked.add(site)
                self._unmask_survivors = list(body.survivors)
                self._unmask_dropped = list(body.dropped)
        self._follow_stage()
        return out

    def _unmask_impossible(self) -> str | None:
        """Why the unmasking cannot complete with the sites still able to answer, or
        None. A site asked to unmask sends shares of itself and of its neighbours
        (survivors' self-mask seeds, dropped sites' mask keys); each secret needs t."""
        s = self.session
        t = s.config.threshold
        able = self._unmask_asked - self._refused - set(s.dropped)
        survivors = set(self._unmask_survivors)
        secrets = [(owner, "self-mask seed") for owner in sorted(survivors)]
        secrets += [(owner, "mask key") for owner in sorted(self._unmask_dropped)
                    if s.neighbours[owner] & survivors]
        for owner, what in secrets:
            holders = [h for h in able if h == owner or owner in s.neighbours[h]]
            if len(holders) < t:
                return (f"unmasking cannot complete: {len(self._refused)} site(s) refused "
                        f"({', '.join(sorted(self._refused))}), so {len(holders)} of the "
                        f"sites holding a share of {owner!r}'s {what} remain, threshold {t}")
        return None

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
