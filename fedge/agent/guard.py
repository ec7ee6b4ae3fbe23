"""What an appliance will not do for a coordinator, whatever the coordinator asks.

Secure aggregation hides one hospital's update only if the appliance itself holds
the line; the coordinator chooses the plan, the cohort, the weights, the seeds and
whether a round is secure, so none of those can be trusted to protect the site:

- `PrivacyPolicy` (agent.toml ``[privacy]``): the hospital's own floor. By default a
  plan without secure aggregation is refused, and so is an aggregation cohort
  smaller than ``min_cohort``.
- The DP floor: under ``require_dp`` a plan needs DP noise, and a run whose ε would
  be unbounded never leaves; ``min_noise_multiplier``, ``max_epsilon`` (per job) and
  ``max_epsilon_total`` (the whole ledger) are the hospital's own numbers. The plan
  is checked when its task comes (`PrivacyPolicy.refuse_plan`, to spare the site a
  training it would not release), and the site's own privacy ledger when the run is
  charged, just before its update can leave (`PrivacyPolicy.refuse_release`): the
  coordinator writes the plan's noise and target, the ledger is the site's. A cap the
  ledger meets already, before the run, refuses the task before it trains
  (`PrivacyPolicy.refuse_spent`), and a spent ``max_epsilon_total`` makes the site not
  eligible (`PrivacyPolicy.budget_spent`).
- `RevealLog`: an update is summed for the coordinator over one survivor set only.
  Training is deterministic under the coordinator's seeds, so a coordinator could
  ask for the same update twice (the same task again, the same round re-sent, the
  same model in another round or job) and sum it with and without one site: the
  difference is that site's update. Before this appliance reveals the shares that
  unmask a sum, it records the update's digest with the survivor set it signed; a
  later session over the same update and another survivor set is refused.
- Evaluation: metrics leave without noise, on weights the coordinator chooses, so an
  EvalTask's plan meets the same floor as a TrainTask's (`PrivacyPolicy.refuse_evaluation`),
  and the agent evaluates a job it trained for only under that job's plan
  (`plan_digest`): otherwise a coordinator could send a plan of its own, without DP,
  naming the training split, and read the loss of chosen weights on the very records
  DP protects (finite differences of it are the site's training gradient).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.secagg.errors import UpdateAlreadySummed
from fedge.update.files import write_atomic

log = logging.getLogger("fedge.agent")

__all__ = ["PrivacyPolicy", "PrivacyPolicyError", "RevealLog", "RevealLogError",
           "has_dp_noise", "plain_client_dp_refusal", "plan_digest", "plan_epsilon",
           "refuse_eval",
           "refuse_threshold", "update_digest"]


class PrivacyPolicyError(ValueError):
    """An agent.toml ``[privacy]`` value breaks its rule (named)."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The hospital's floor, checked on every task whatever the plan says.

    ``require_secure_aggregation``: refuse a plan with ``[secagg] enabled = false``
    and any plain (unmasked) aggregation. ``require_dp``: refuse a plan without
    DP-SGD or DP-FedAvg with a noise multiplier > 0 (across rounds, only DP bounds
    what a malicious coordinator learns of one site). ``min_cohort``: refuse to send a masked
    update to a secure aggregation over fewer sites than this, and to reveal the shares
    that unmask a sum of fewer survivors (`min_cohort_refusal`). In a sum of k inputs,
    k - 1 peers that pool their own inputs (or one that subtracts its own) recover this
    site's update from the sum the coordinator publishes: the default 3 keeps at least
    one other site's update in any sum this site is part of, against one malicious
    peer; 2 (the least: a sum over one site is that site's update) must be set
    explicitly. A plain update, where a policy allows one, is seen by the coordinator
    alone whatever the cohort.

    ``max_colluders``: how many enrolled sites this hospital assumes could collude
    with the coordinator (0: none, the default threat model). The coordinator can
    tell two groups of sites different survivor lists, one with a site alive, one
    with it dropped; each honest site signs one list and reveals one kind of share,
    but a colluder signs both, and with 2t - m <= colluders in that site's
    neighbourhood of m (t the threshold) the coordinator holds t shares of both of
    its secrets and unmasks its update. A threshold with 2t - m <= max_colluders is
    refused. (min_cohort does not stop this: both lists are long.) The plan's
    ``[secagg] alpha`` sets 2t - m > alpha * m.

    Whatever the policy, DP-FedAvg noise sized for a cohort (``client_dp.cohort_size``
    > 1) never goes to a plain aggregation (`plain_client_dp_refusal`).

    The DP floor beyond ``require_dp`` ("some noise"): ``min_noise_multiplier``
    (default 0): refuse a plan whose DP-SGD noise multiplier (or, without DP-SGD,
    DP-FedAvg's) is below it. ``max_epsilon``: refuse to release an update that
    would take its job's ε at this site above it; ``max_epsilon_total``: likewise for
    the ε of every job this site's ledger holds. Both are measured at δ =
    ``budget_delta`` (default 1e-5), from the site's own ledger when the run is
    charged, and a plan without DP noise is refused under either (its ε is
    unbounded). Under ``require_dp`` a run whose job ε would be unbounded is never
    released, caps or not.
    """

    require_secure_aggregation: bool = True
    min_cohort: int = 3
    require_dp: bool = False
    max_colluders: int = 0
    min_noise_multiplier: float = 0.0
    max_epsilon: float | None = None
    max_epsilon_total: float | None = None
    budget_delta: float = 1e-5

    KEYS = ("require_secure_aggregation", "min_cohort", "require_dp", "max_colluders",
            "min_noise_multiplier", "max_epsilon", "max_epsilon_total", "budget_delta")

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
        f = self.max_colluders
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise PrivacyPolicyError(f"privacy.max_colluders = {f!r} must be an integer >= 0")
        z = self.min_noise_multiplier
        if not _number(z) or z < 0:
            raise PrivacyPolicyError(f"privacy.min_noise_multiplier = {z!r} must be a "
                                     "number >= 0")
        object.__setattr__(self, "min_noise_multiplier", float(z))
        for name in ("max_epsilon", "max_epsilon_total"):
            cap = getattr(self, name)
            if cap is None:
                continue
            if not _number(cap) or cap <= 0:
                raise PrivacyPolicyError(f"privacy.{name} = {cap!r} must be a number > 0 "
                                         "(or left out: no cap)")
            object.__setattr__(self, name, float(cap))
        d = self.budget_delta
        if not _number(d) or not 0 < d < 1:
            raise PrivacyPolicyError(f"privacy.budget_delta = {d!r} must be a number in "
                                     "(0, 1)")
        object.__setattr__(self, "budget_delta", float(d))

    @property
    def caps(self) -> list[tuple[str, float]]:
        """The ε caps set, as (setting, value)."""
        return [(name, cap) for name, cap in (("max_epsilon", self.max_epsilon),
                                              ("max_epsilon_total", self.max_epsilon_total))
                if cap is not None]

    @property
    def checks_release(self) -> bool:
        """Whether a DP run is checked against the ledger before it is charged."""
        return self.require_dp or bool(self.caps)

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

    def refuse_plan(self, secure: bool, privacy: Mapping[str, Any] | None = None, *,
                    rounds: int | None = None) -> str | None:
        """Why a plan is refused, or None. ``secure``: the plan's ``[secagg] enabled``;
        ``privacy``: its ``[privacy]`` table; ``rounds``: its ``job.rounds``.

        ``require_dp`` counts a ``dp`` or ``client_dp`` table as DP only when its
        ``noise_multiplier`` is a number > 0 (`has_dp_noise`). The DP floor
        (`_refuse_plan_budget`): the noise against ``min_noise_multiplier``, and the ε
        the plan itself allows or implies against the caps. Whatever the policy, a
        plan without secure aggregation whose ``client_dp`` noise is sized for a
        cohort (cohort_size > 1) is refused (`plain_client_dp_refusal`)."""
        privacy = {} if privacy is None else privacy
        if not isinstance(privacy, Mapping):
            raise TypeError(f"refuse_plan: privacy must be the plan's [privacy] table, "
                            f"not {type(privacy).__name__}")
        if self.require_secure_aggregation and not secure:
            return ("this appliance requires secure aggregation ([privacy] "
                    "require_secure_aggregation in its agent.toml) and the plan disables it")
        if self.require_dp and not has_dp_noise(privacy):
            return ("this appliance requires differential privacy ([privacy] require_dp in "
                    "its agent.toml) and the plan has neither privacy.dp nor "
                    "privacy.client_dp with a noise_multiplier > 0")
        refused = self._refuse_plan_budget(privacy, rounds)
        if refused:
            return refused
        if not secure:
            return plain_client_dp_refusal(client_dp_cohort(privacy))
        return None

    def _refuse_plan_budget(self, privacy: Mapping[str, Any],
                            rounds: int | None) -> str | None:
        """Why a plan breaks the DP floor, as far as the plan alone tells, or None:
        its noise below ``min_noise_multiplier``; no DP noise under an ε cap; or the
        ε it allows (DP-SGD's ``target_epsilon``, when measured at a δ no smaller
        than ``budget_delta``) or implies (DP-FedAvg over its ``rounds``) above a cap,
        or unbounded under ``require_dp``. DP-SGD's ε depends on this site's data,
        and the ledger holds other runs: both are checked when the run is charged
        (`refuse_release`)."""
        table = "dp" if isinstance(privacy.get("dp"), Mapping) else (
            "client_dp" if isinstance(privacy.get("client_dp"), Mapping) else None)
        if table is not None and self.min_noise_multiplier > 0:
            z = privacy[table].get("noise_multiplier")
            if not _number(z) or not z >= self.min_noise_multiplier:
                return (f"the plan's privacy.{table}.noise_multiplier {z!r} is below this "
                        f"appliance's [privacy] min_noise_multiplier = "
                        f"{self.min_noise_multiplier:g}")
        if not self.checks_release:
            return None
        if self.caps and not has_dp_noise(privacy):
            name, cap = self.caps[0]
            return (f"this appliance caps epsilon ([privacy] {name} = {cap:g} in its "
                    "agent.toml) and the plan has no DP noise (neither privacy.dp nor "
                    "privacy.client_dp with a noise_multiplier > 0): its epsilon is "
                    "unbounded")
        expected = plan_epsilon(privacy, rounds=rounds, delta=self.budget_delta)
        if expected is None:
            return None
        epsilon, what = expected
        if self.require_dp and not math.isfinite(epsilon):
            return (f"this appliance requires differential privacy ([privacy] require_dp "
                    f"in its agent.toml) and the plan's {what} is unbounded at delta "
                    f"{self.budget_delta:g}: its noise is too small to bound anything")
        for name, cap in self.caps:
            if epsilon > cap:
                return (f"the plan's {what} is {epsilon:.4g} (delta "
                        f"{self.budget_delta:g}), above this appliance's [privacy] "
                        f"{name} = {cap:g}")
        return None

    def refuse_release(self, *, job: str, job_epsilon: float,
                       total_epsilon: float | None = None) -> str | None:
        """Why a DP run may not be charged and its update released, or None:
        ``job_epsilon`` and ``total_epsilon`` are the ε (at ``budget_delta``) this
        site's ledger would hold with the run, for its job ``job`` and for every job
        (None: not computed, when ``max_epsilon_total`` is not set)."""
        delta = self.budget_delta
        if self.require_dp and not math.isfinite(job_epsilon):
            return (f"this appliance requires differential privacy ([privacy] require_dp "
                    f"in its agent.toml) and releasing this update would leave job "
                    f"{job!r}'s epsilon unbounded (delta {delta:g}): its noise is too "
                    "small to bound anything")
        if self.max_epsilon is not None and job_epsilon > self.max_epsilon:
            return (f"releasing this update would take job {job!r}'s epsilon at this site "
                    f"to {job_epsilon:.4g} (delta {delta:g}), above this appliance's "
                    f"[privacy] max_epsilon = {self.max_epsilon:g}")
        cap = self.max_epsilon_total
        if cap is not None and (total_epsilon is None or total_epsilon > cap):
            shown = "unknown" if total_epsilon is None else f"{total_epsilon:.4g}"
            return (f"releasing this update would take this site's epsilon over every job "
                    f"in its privacy ledger to {shown} (delta {delta:g}), above this "
                    f"appliance's [privacy] max_epsilon_total = {cap:g}")
        return None

    def refuse_spent(self, *, job: str, job_epsilon: float,
                     total_epsilon: float | None = None,
                     without_dp: Sequence[str] = ()) -> str | None:
        """Why a TrainTask of ``job`` is refused before it trains, its budget being spent
        already, or None: ``job_epsilon`` and ``total_epsilon`` are the ε (at
        ``budget_delta``) this site's ledger holds now, before the run (``total_epsilon``
        None: not computed, when ``max_epsilon_total`` is not set); ``without_dp``: the
        jobs whose released runs had no DP (they make the total unbounded). Any DP run
        adds ε, so a cap the ledger meets already would refuse the release anyway
        (`refuse_release`): the site is spared the training, and the round its place in
        the cohort."""
        delta = self.budget_delta
        if self.max_epsilon is not None and job_epsilon >= self.max_epsilon:
            return (f"privacy budget spent: job {job!r}'s epsilon at this site is already "
                    f"{job_epsilon:.4g} (delta {delta:g}), at or above this appliance's "
                    f"[privacy] max_epsilon = {self.max_epsilon:g}; not training")
        spent = self.budget_spent(total_epsilon, without_dp)
        return f"{spent}; not training" if spent else None

    def budget_spent(self, total_epsilon: float | None,
                     without_dp: Sequence[str] = ()) -> str:
        """'privacy budget spent: ...' when the ε of every job in this site's ledger
        (``total_epsilon``, at ``budget_delta``, before any new run) is at or above
        ``max_epsilon_total``: no DP job can release here any more, so the site is not
        eligible for any; '' otherwise (no such cap, or ε not computed)."""
        cap = self.max_epsilon_total
        if cap is None or total_epsilon is None or total_epsilon < cap:
            return ""
        text = (f"privacy budget spent: epsilon {total_epsilon:.4g} >= max_epsilon_total "
                f"{cap:g} ([privacy] in agent.toml, over every job in this site's privacy "
                f"ledger, delta {self.budget_delta:g})")
        if not math.isfinite(total_epsilon) and without_dp:
            shown = ", ".join(repr(j) for j in list(without_dp)[:3])
            more = f" and {len(without_dp) - 3} more" if len(without_dp) > 3 else ""
            text += (f": the ledger holds a released run without DP (job {shown}{more}), "
                     "whose epsilon is unbounded, so no later run fits under this cap")
        return text

    def refuse_evaluation(self, split: str, *, plan_split: str, secure: bool,
                          privacy: Mapping[str, Any], rounds: int | None = None) -> str | None:
        """Why an EvalTask on ``split`` is refused under a plan (its ``job.eval_split``
        ``plan_split``, ``[secagg] enabled`` ``secure``, ``[privacy]`` table
        ``privacy``), or None.

        The plan comes with the EvalTask, from the coordinator, and need not be a plan
        this site ever trained under: it meets the floor a TrainTask's plan meets
        (`refuse_plan`). Under ``require_dp`` the training split is never evaluated,
        whatever the plan says: its metrics would leave without noise, outside any ε,
        about the very records DP protects. Then `refuse_eval`'s rules."""
        refused = self.refuse_plan(secure, privacy, rounds=rounds)
        if refused:
            return f"evaluation under this plan refused: {refused}"
        if self.require_dp and split == "train":
            return ("an evaluation on the training split was asked for, but this appliance "
                    "requires differential privacy ([privacy] require_dp in its "
                    "agent.toml): the metrics would leave without noise, outside any "
                    "epsilon, about the very records DP protects")
        return refuse_eval(split, plan_split=plan_split, privacy=privacy)

    def min_cohort_refusal(self, sites: int, what: str = "a sum") -> str | None:
        """Why ``what`` over ``sites`` sites is refused under ``min_cohort``, or None:
        the reason says what the floor protects and how a hospital lowers it."""
        if sites >= self.min_cohort:
            return None
        if sites < 2:
            return (f"{what} over {sites} site(s) is below this appliance's min_cohort "
                    f"{self.min_cohort}: a sum over one site is that site's update")
        return (f"{what} over {sites} site(s) is below this appliance's min_cohort "
                f"{self.min_cohort}: in a sum of {sites}, the other {sites - 1} site(s) "
                f"together can recover this site's update from it; to accept that, set "
                f"min_cohort = {sites} in [privacy] of this appliance's agent.toml")

    def refuse_aggregation(self, *, plan_secure: bool, secure: bool, cohort: int,
                           weight_scale: float, client_dp_cohort: int | None) -> str | None:
        """Why an AggregateBegin is refused, or None. ``client_dp_cohort``: the plan's
        ``privacy.client_dp.cohort_size`` (None without client_dp); a plain aggregation
        of noise sized for more than one site is refused whatever the policy."""
        if not secure and (plan_secure or self.require_secure_aggregation):
            why = "the plan enables it" if plan_secure else "this appliance requires it"
            return f"a plain (unmasked) aggregation was asked for, but {why}"
        if not secure:
            refused = plain_client_dp_refusal(client_dp_cohort)
            if refused:
                return refused
        if secure and cohort < self.min_cohort:  # a plain update is seen alone anyway
            return self.min_cohort_refusal(cohort, "an aggregation")
        if not (np.isfinite(weight_scale) and 0.0 < weight_scale <= 1.0):
            return f"weight_scale {weight_scale!r} must lie in (0, 1]"
        if client_dp_cohort is not None and client_dp_cohort > cohort:
            return (f"DP-FedAvg noise was drawn for a cohort of {client_dp_cohort} but the "
                    f"aggregation has {cohort} sites: the sum would carry less noise than "
                    "the plan's epsilon assumes")
        return None


def _number(x: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def plan_epsilon(privacy: Mapping[str, Any], *, rounds: int | None,
                 delta: float) -> tuple[float, str] | None:
    """The ε a plan's ``[privacy]`` table lets its job spend at a site, at ``delta``,
    as far as the plan alone tells, with what it is; None when it does not tell.

    DP-SGD (``dp``): its ``target_epsilon``, when the plan measures it at a δ no
    smaller than ``delta`` (then ε at ``delta`` may reach it); its actual ε depends on
    the site's record count. DP-FedAvg (``client_dp`` alone): the client-level ε of
    ``rounds`` releases (`fedge.train.accounting.client_epsilon_for`), unbounded
    without noise."""
    dp = privacy.get("dp")
    if isinstance(dp, Mapping):
        target, plan_delta = dp.get("target_epsilon"), dp.get("delta", 1e-5)
        if _number(target) and _number(plan_delta) and delta <= plan_delta:
            return float(target), (f"privacy.dp.target_epsilon (at its delta "
                                   f"{plan_delta:g})")
        return None
    client_dp = privacy.get("client_dp")
    if not isinstance(client_dp, Mapping) or isinstance(rounds, bool) \
            or not isinstance(rounds, int) or rounds < 1:
        return None
    z = client_dp.get("noise_multiplier")
    what = f"DP-FedAvg epsilon over its {rounds} round(s)"
    if not _number(z) or z <= 0:
        return math.inf, what
    from fedge.train.accounting import client_epsilon_for

    return client_epsilon_for(noise_multiplier=float(z), rounds=rounds, delta=delta), what


def has_dp_noise(privacy: Mapping[str, Any]) -> bool:
    """Whether a plan's ``[privacy]`` table asks for DP that adds noise: a ``dp`` or
    ``client_dp`` table whose ``noise_multiplier`` is a finite number > 0. A table
    without one, or with 0 (DP-FedAvg then only clips), is no DP."""
    for key in ("dp", "client_dp"):
        table = privacy.get(key)
        if not isinstance(table, Mapping):
            continue
        z = table.get("noise_multiplier")
        if _number(z) and z > 0:
            return True
    return False


def client_dp_cohort(privacy: Mapping[str, Any]) -> int | None:
    """The ``cohort_size`` a plan's ``privacy.client_dp`` sized its noise for, or None."""
    table = privacy.get("client_dp")
    if not isinstance(table, Mapping):
        return None
    k = table.get("cohort_size")
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def plain_client_dp_refusal(client_dp_cohort: int | None) -> str | None:
    """Why a plain (unmasked) aggregation of a DP-FedAvg update whose noise was sized
    for ``client_dp_cohort`` sites is refused, or None (no client_dp, or a cohort of
    1). Each site adds N(0, (zS)²/K) so that the sum of K carries (zS)²: an update
    the coordinator sees alone carries 1/√K of the plan's noise."""
    k = client_dp_cohort
    if k is None or k <= 1:
        return None
    return (f"a plain (unmasked) aggregation of a DP-FedAvg update was asked for, but "
            f"the plan's privacy.client_dp.cohort_size is {k}: this site's noise is "
            f"sized for the sum of {k} sites, so its update seen alone would carry "
            f"1/√{k} of the plan's noise; DP-FedAvg over a cohort needs secure "
            "aggregation")


def refuse_eval(split: str, *, plan_split: str, privacy: Mapping[str, Any]) -> str | None:
    """Why an EvalTask on ``split`` is refused under a plan whose ``job.eval_split`` is
    ``plan_split`` and whose ``[privacy]`` table is ``privacy``, or None.

    Evaluation metrics leave the site without noise. Under ``privacy.dp`` or
    ``privacy.client_dp`` the training split is never evaluated: its metrics are about
    the very records the ε protects, on whatever weights the coordinator sends. And
    the coordinator evaluates only the split the plan names, or ``test`` (the last
    round's final test): it cannot pick another one."""
    if split == "train" and (privacy.get("dp") is not None
                             or privacy.get("client_dp") is not None):
        return ("an evaluation on the training split was asked for under a DP plan "
                "(privacy.dp or privacy.client_dp): its metrics would leave this site "
                "without noise, outside the plan's epsilon, about the very records "
                "epsilon protects")
    if split not in (plan_split, "test"):
        return (f"an evaluation on split {split!r} was asked for, but the plan's "
                f"job.eval_split is {plan_split!r} (and the last round's final test is "
                "'test'); a coordinator cannot choose a split the plan does not name")
    return None


def plan_digest(text: str) -> bytes:
    """SHA-256 of a plan's content, whatever its layout: its TOML parsed and written
    back in one canonical form (keys sorted), so comments, spacing and key order do
    not count and every value does. What an EvalTask's plan is compared by with the
    plan of the job this site trained for.

    Raises: tomllib.TOMLDecodeError: ``text`` is not TOML."""
    import tomllib

    canonical = json.dumps(tomllib.loads(text), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False, default=str)
    return hashlib.sha256(b"fedge/plan/v1\n" + canonical.encode()).digest()


def refuse_threshold(policy: PrivacyPolicy, threshold: int, neighbourhood: int) -> str | None:
    """Why a secure aggregation's threshold ``threshold`` over neighbourhoods of
    ``neighbourhood`` sites (this one included) is refused under ``policy``, or None."""
    t, m, f = threshold, neighbourhood, policy.max_colluders
    if 2 * t - m > f:
        return None
    return (f"secure aggregation threshold t={t} over neighbourhoods of m={m} sites: a "
            f"coordinator colluding with {f} enrolled site(s) could tell sites different "
            f"survivor lists and unmask one site's update (this appliance's [privacy] "
            f"max_colluders = {f} needs 2t - m > {f}); raise the plan's [secagg] alpha "
            f"above {f}/{m}")


def task_digest(*, job: str, round: int, plan: str | bytes, model_digest: bytes,
                train_seed: int, server_control: np.ndarray | None = None) -> bytes:
    """SHA-256 of what a round's update is trained from at this site (the job, its
    round, the plan text, the global model's digest, the training seed, SCAFFOLD's c):
    the key of RevealLog's task rule. Training is deterministic on one machine, but
    not across thread counts, CPUs or library builds, so the update's own bytes do
    not always tell a replayed task."""
    h = hashlib.sha256(b"fedge/task/v1")
    for part in (job.encode(), int(round).to_bytes(8, "big", signed=True),
                 plan.encode() if isinstance(plan, str) else bytes(plan), model_digest,
                 int(train_seed).to_bytes(8, "big", signed=True)):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    if server_control is not None:
        h.update(np.ascontiguousarray(server_control, dtype="<f4").tobytes())
    return h.digest()


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
    given: an append-only JSON Lines file (0600), one fsynced line per reveal, so a
    reveal costs the same on an appliance's first round and its ten-thousandth.

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
    refused, naming the file, until it is restored or moved aside by hand. Only a
    torn last line (no newline: a crash inside the append, before the reveal it
    would have allowed) is dropped. ``legacy``: the whole-file JSON log of earlier
    releases, taken over once when ``path`` does not exist yet; it is copied to
    ``<name>.migrated`` and replaced by a stub that those releases read as corrupt
    (so one rolled back to refuses every reveal rather than start with no record).

    A row may also carry the ``job`` and ``round`` of the update (given to
    :meth:`check_and_record`): kept through compaction, read by ``fedge agent privacy``
    to name reveals its privacy ledger lacks. Both are optional (rows of earlier
    releases have neither) and earlier releases of this format ignore them.
    """

    FORMAT = "fedge-reveal-log"
    VERSION = 1

    def __init__(self, path: Path | None = None, *, sketches: int = 1024,
                 legacy: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.sketches = sketches
        self._lock = threading.Lock()
        self._entries: dict[str, list[str]] = {}
        self._times: dict[str, float] = {}
        self._runs: dict[str, dict[str, Any]] = {}  # digest: its job and round, if known
        self._inputs: dict[str, list[str]] = {}  # task_digest: the survivors it went to
        self._sketch_rows = np.zeros((0, SKETCH_BUCKETS))
        self._sketch_norms = np.zeros(0)
        self._sketch_sites: list[list[str]] = []
        self._key = secrets.token_bytes(16)
        self._end = 0  # bytes of complete lines in the file
        self.error: str | None = None
        if self.path is None:
            return
        if self.path.exists():
            self._load(self.path)
        elif legacy is not None and Path(legacy).exists():
            self._migrate(Path(legacy))

    # -- reading -----------------------------------------------------------------------

    def _fail(self, path: Path, why: str) -> None:
        self._entries, self._times, self._runs = {}, {}, {}
        self._keep_sketches([], [], [])
        self.error = (f"secure aggregation reveal log {path} {why}; nothing is revealed "
                      "until it is restored, or moved aside by hand (which forgets what "
                      "this site revealed)")
        log.error("%s", self.error)

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as exc:
            self.error = (f"secure aggregation reveal log {path} cannot be read ({exc}); "
                          "nothing is revealed until it can")
            log.error("%s", self.error)
            return None

    def _load(self, path: Path) -> None:
        data = self._read(path)
        if data is None:
            return
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning("reveal log %s: a torn last line (%d bytes, a crash while "
                        "recording) is dropped; its reveal never happened",
                        path, len(data) - complete)
        lines = data[:complete].decode("utf-8", "replace").splitlines()
        sketches: list[np.ndarray] = []
        norms: list[float] = []
        sites: list[list[str]] = []
        try:
            if not lines:
                raise ValueError("no header line")
            head = json.loads(lines[0])
            if not isinstance(head, dict) or head.get("format") != self.FORMAT:
                raise ValueError(f"line 1 is not a {self.FORMAT} header")
            if head.get("version") != self.VERSION:
                raise ValueError(f"version {head.get('version')!r}, this agent reads "
                                 f"{self.VERSION}")
            self._key = bytes.fromhex(head["key"])
            # sketches made another way compare with nothing: dropped (digests kept)
            same_scheme = head.get("sketch_scheme") == SKETCH_SCHEME
            for number, line in enumerate(lines[1:], start=2):
                try:
                    self._take_row(json.loads(line), same_scheme, sketches, norms, sites)
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"line {number}: {exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            self._fail(path, f"is corrupt ({exc})")
            return
        self._keep_sketches(sketches, norms, sites)
        self._end = complete
        if not same_scheme or len(sketches) > 2 * self.sketches:
            # compacted: digests all kept, sketches only the newest (what is compared)
            self._rewrite_or_fail(path)

    def _take_row(self, row: Any, same_scheme: bool, sketches: list[np.ndarray],
                  norms: list[float], sites: list[list[str]]) -> None:
        survivors = row["survivors"]
        if not (isinstance(survivors, list) and all(isinstance(s, str) for s in survivors)):
            raise ValueError(f"bad survivors {survivors!r:.80}")
        digest = row.get("digest")
        if digest is not None:
            if not isinstance(digest, str):
                raise ValueError(f"bad digest {digest!r:.80}")
            self._entries[digest] = survivors
            self._times[digest] = float(row.get("at", 0.0))
            run = reveal_run_fields(row.get("job"), row.get("round"))
            if run:
                self._runs[digest] = run
        inputs = row.get("inputs")
        if inputs is not None:
            if not isinstance(inputs, str):
                raise ValueError(f"bad inputs {inputs!r:.80}")
            self._inputs[inputs] = survivors
        if "sketch" in row and same_scheme:
            sketch = np.frombuffer(base64.b64decode(row["sketch"], validate=True), dtype="<f4")
            if sketch.size != SKETCH_BUCKETS:
                raise ValueError(f"sketch of {sketch.size} buckets")
            sketches.append(sketch.astype(np.float64))
            norms.append(float(row["norm"]))
            sites.append(survivors)

    def _keep_sketches(self, sketches: Sequence[np.ndarray], norms: Sequence[float],
                       sites: Sequence[list[str]]) -> None:
        keep = slice(max(0, len(sketches) - self.sketches), None)
        self._sketch_rows = (np.stack(sketches[keep]) if len(sketches[keep])
                             else np.zeros((0, SKETCH_BUCKETS)))
        self._sketch_norms = np.asarray(norms[keep], dtype=np.float64)
        self._sketch_sites = list(sites[keep])

    def _migrate(self, legacy: Path) -> None:
        """Take over the whole-file log of earlier releases (fails closed like a
        corrupt log when it cannot be read or the new log cannot be written)."""
        data = self._read(legacy)
        if data is None:
            return
        sketches: list[np.ndarray] = []
        norms: list[float] = []
        sites: list[list[str]] = []
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "moved_to" in doc:  # our own stub: the log is gone
                self.error = (f"secure aggregation reveal log {self.path} is missing, and "
                              f"{legacy} says the log was moved there; nothing is revealed "
                              f"until it is restored (to start afresh, which forgets what "
                              f"this site revealed, move {legacy} aside as well)")
                log.error("%s", self.error)
                return
            self._key = bytes.fromhex(doc["key"])
            for row in doc["entries"]:
                self._take_row(row, True, [], [], [])
            if doc.get("sketch_scheme") == SKETCH_SCHEME:
                for row in doc.get("sketches", []):
                    self._take_row({"survivors": row["survivors"], "sketch": row["sketch"],
                                    "norm": row["norm"]}, True, sketches, norms, sites)
        except (ValueError, KeyError, TypeError) as exc:
            self._fail(legacy, f"is corrupt ({exc})")
            return
        self._keep_sketches(sketches, norms, sites)
        assert self.path is not None
        if self._rewrite_or_fail(self.path):
            # The old file is kept as <name>.migrated, and in its place goes a stub
            # that the earlier release reads as corrupt: rolled back to it (an update
            # that never confirms), it then refuses every reveal instead of finding
            # no file and starting with an empty log.
            try:
                write_atomic(legacy.with_name(legacy.name + ".migrated"), data)
                write_atomic(legacy, (json.dumps({
                    "moved_to": self.path.name,
                    "note": "this release keeps its reveal log in the file above; this "
                            "stub makes an earlier release refuse to reveal rather than "
                            "forget"}) + "\n").encode())
            except OSError as exc:  # the new log is read first; an old release is not
                log.warning("reveal log %s taken over but not replaced by a stub (an "
                            "earlier release rolled back to would read it): %s",
                            legacy, exc)
            log.info("reveal log %s taken over into %s (%d updates)", legacy, self.path,
                     len(self._entries))

    # -- writing -----------------------------------------------------------------------

    def _header(self) -> bytes:
        return _line({"format": self.FORMAT, "version": self.VERSION,
                      "key": self._key.hex(), "sketch_scheme": SKETCH_SCHEME})

    def _sketch_fields(self, i: int) -> dict[str, Any]:
        raw = self._sketch_rows[i].astype("<f4").tobytes()
        return {"sketch": base64.b64encode(raw).decode(), "norm": float(self._sketch_norms[i])}

    def _rewrite_or_fail(self, path: Path) -> bool:
        """Write the whole log afresh (atomically): the header, every digest, the
        kept sketches. False, with every reveal refused, when it cannot be written."""
        lines = [self._header()]
        lines += [_line({"digest": d, "survivors": s, "at": self._times.get(d, 0.0),
                         **self._runs.get(d, {})})
                  for d, s in self._entries.items()]
        lines += [_line({"inputs": t, "survivors": s}) for t, s in self._inputs.items()]
        lines += [_line({"survivors": s, **self._sketch_fields(i)})
                  for i, s in enumerate(self._sketch_sites)]
        data = b"".join(lines)
        try:
            write_atomic(path, data)
        except OSError as exc:
            self._fail(path, f"cannot be written ({exc})")
            return False
        self._end = len(data)
        return True

    def _append(self, row: dict[str, Any]) -> None:
        """One line at the end of the log, fsynced; a torn or failed write is cut off
        again so the next line starts clean. Raises: OSError."""
        assert self.path is not None
        data = _line(row)
        if self._end == 0:  # a new log: header and first line in one atomic write
            data = self._header() + data
            write_atomic(self.path, data)
            self._end = len(data)
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != self._end:
                os.ftruncate(fd, self._end)  # a torn line from an earlier crash or failure
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            # if this fails too, the next append cuts it (size != _end), or a load drops it
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._end)
            raise
        finally:
            os.close(fd)
        self._end += len(data)

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
                         update: np.ndarray | None = None, *, job: str | None = None,
                         round: int | None = None, inputs: bytes | None = None) -> None:
        """Allow revealing the unmasking shares of a sum over ``survivors`` that holds the
        update ``digest`` (values ``update``): recorded on disk before returning, with
        the ``job`` and ``round`` the update was trained for where given (recorded only,
        never compared: the rules are the digest's and the sketch's).

        ``inputs`` (`task_digest`: what the update was trained from) is a third rule:
        an update trained from the same task is summed over one survivor set only,
        whatever its bytes. The digest and sketch rules assume a task trains to the
        same update every time, which holds on one machine but not across thread
        counts, CPUs or library builds (a resnet with Adam moved 2 % between 1 and 2
        threads, past NEAR): a coordinator replaying a task after such a change would
        otherwise get two sums whose difference is the site's update.

        Raises:
            ValueError: ``job`` is not a string or ``round`` not an integer.
            UpdateAlreadySummed: this update, or one within NEAR of it, was summed over
                another survivor set.
            RevealLogError: the log could not be read.
            OSError: the record cannot be written (nothing may then be revealed).
        """
        key, now = digest.hex(), sorted(survivors)
        run = reveal_run_fields(job, round)
        task = inputs.hex() if inputs is not None else None
        with self._lock:
            if self.error is not None:
                raise RevealLogError(self.error)
            asked = self._inputs.get(task) if task is not None else None
            if asked is not None and asked != now:
                raise UpdateAlreadySummed(
                    f"an update trained from this same task (model, seed, plan) was already "
                    f"summed over {len(asked)} sites {asked}; a second sum over {now} would "
                    "give the coordinator the difference, whatever this machine's training "
                    "now computes (a job re-run over other sites needs another seed)")
            earlier = self._entries.get(key)
            if earlier is not None:
                if earlier != now:
                    raise UpdateAlreadySummed(
                        f"this update was already summed over {len(earlier)} sites "
                        f"{earlier}; a second sum over {now} would give the coordinator "
                        "the difference (a job re-run over other sites needs another seed)")
                if task is None or task in self._inputs:
                    return
            row: dict[str, Any] = {"digest": key, "survivors": now, "at": time.time(), **run}
            if task is not None:
                row["inputs"] = task
            sketch, norm = None, 0.0
            if update is not None:
                norm = float(np.linalg.norm(np.asarray(update, dtype=np.float64)))
                sketch = self.sketch(update)
                if norm > 0.0 and len(self._sketch_sites):
                    far = np.linalg.norm(self._sketch_rows - sketch, axis=1)
                    near = far <= NEAR * np.maximum(norm, self._sketch_norms)
                    for i in np.flatnonzero(near):
                        sites = self._sketch_sites[i]
                        if sites != now:
                            raise UpdateAlreadySummed(
                                f"an update within {NEAR:.0%} of this one was already "
                                f"summed over {len(sites)} sites {sites}; a second sum "
                                f"over {now} would give the coordinator the difference")
                row["sketch"] = base64.b64encode(sketch.astype("<f4").tobytes()).decode()
                row["norm"] = norm
            if self.path is not None:
                self._append(row)  # OSError: nothing recorded, nothing revealed
            self._entries[key] = now
            self._times[key] = row["at"]
            if task is not None:
                self._inputs[task] = now
            if run:
                self._runs[key] = run
            if sketch is not None:
                self._sketch_rows = np.vstack([self._sketch_rows, sketch])[-self.sketches:]
                self._sketch_norms = np.append(self._sketch_norms, norm)[-self.sketches:]
                self._sketch_sites = [*self._sketch_sites, now][-self.sketches:]


def reveal_run_fields(job: Any, round: Any) -> dict[str, Any]:
    """The optional ``job`` and ``round`` of a reveal log row, those that are given.
    Raises: ValueError naming the bad one."""
    run: dict[str, Any] = {}
    if job is not None:
        if not isinstance(job, str):
            raise ValueError(f"bad job {job!r:.80} (a string)")
        run["job"] = job
    if round is not None:
        if isinstance(round, bool) or not isinstance(round, int):
            raise ValueError(f"bad round {round!r:.80} (an integer)")
        run["round"] = round
    return run


def _line(row: Mapping[str, Any]) -> bytes:
    return (json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n").encode()
