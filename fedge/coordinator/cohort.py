"""Cohort selection: which appliances may take part in a round.

A site is a candidate when it is enrolled (not revoked), connected (heard from
within the heartbeat timeout), has sent this coordinator process a heartbeat since
it connected (until then what it declares is unknown: after a restart, an agent's
first message may be another), eligible by its own health policy, holds the job's
data set, and is not busy with another job. For a DP job (``privacy.dp`` or
``privacy.client_dp``) it must also run fedge 0.2 or later: earlier agents report ε
for adding or removing one record, lower than today's replace-one figure
(fedge.update.version.reports_replace_one_epsilon). So must it for a SCAFFOLD job:
earlier agents move their control variate when the EvalTask arrives and drop the
ControlCommit, so their c_i would drift from the server's c. Every exclusion has a
reason, so an operator can see why a site sat a round out.

A site *sidelined* by the coordinator is left out too: an earlier attempt at the
round failed with the site's own refusal or loss in it (it could not train, could not
save its state, dropped out), and no heartbeat of its own has said it is eligible
since (fedge.coordinator.service). One broken site then cannot spend every attempt a
plan allows while the others could commit without it; once it says it is eligible it
is a candidate again. An attempt that failed with no site's refusal or loss in it (a
cohort that never formed) sidelines nobody. Both sites of a tampered-share accusation
(one site refused the aggregation saying another's share to it was tampered with) are
sidelined for the rest of the job, whatever their heartbeats say: going on without
the accuser would let a tamperer shrink the sum, and a false accuser loses itself and
one other from one job (fedge.coordinator.rounds, ``Round._accusation``).

A site whose privacy ledger was rolled back is left out of every new cohort, of
every job (DP or not: a run without DP spends the site's budget too). Its
heartbeats' health report carries the number of released runs in its ledger
(``LEDGER_RELEASED``); entries are only ever added, so a count below the most it
reported before means its ledger (and its secure-aggregation reveal log, on the same
disk) went back to an older copy, and its ``max_epsilon_total`` cannot be trusted
(fedge.coordinator.store, ``note_ledger_released``). It is a candidate again once it
reports that many again (the newer ledger restored) or once the coordinator's
operator accepts the lower count (``fedge console ledger-ack SITE``).

Privacy floors. A site refuses to send its masked input into, or unmask, a secure sum
of fewer sites than its ``min_cohort`` ([privacy] of its agent.toml; a sum of k lets
the other k - 1 recover its update), but it can tell only once it has trained. Its
heartbeats' health report carries that floor (``MIN_COHORT``; agents before it send
none, and are taken to have none), and for a secure job a candidate whose floor is
above the sites the round would have is left out before anyone trains, saying so.
Leaving it out shrinks the round, so this repeats until every floor left is met: the
largest cohort whose every site accepts it (a retry pinned to its survivors has those
sites, never more). It is judged once the candidates make ``min_clients`` (before, the
round waits for more anyway, and more may come). A round left below ``min_clients``
waits and fails with that reason, as for any site left out; the agent's own check
stays the guarantee.

Class order. An image data set's label is the position of its class in the site's
``classes`` list (agent.toml): two sites that list them in another order would have
their labels summed flipped. Sites send their lists (DatasetClasses, just before
each heartbeat, when any of its data sets declares one) and no cohort ever holds two
orders for the job's data set:

* with ``job.classes`` in the plan, a site is a candidate only if it declares
  exactly that list; one declaring another list, or none for this data set (no
  lists at all: none declared there, or an agent before DatasetClasses, which cannot
  be checked and would refuse the plan's unknown key anyway) is left out, naming
  both lists;
* without it, if the candidates that declare a list do not all declare the same
  one, every one of them is left out, each reason naming every list in use and
  telling the engineer to set ``job.classes``: the coordinator cannot tell which
  order is the intended one, and picking the majority would silently drop the
  others. The round then waits for a cohort and fails with those reasons. When
  they agree, a candidate that sent no lists (an older agent) is left out: its
  order cannot be checked against theirs. When no candidate declares a list (a
  tabular data set, or a fleet of older agents only) nothing is checked, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedge.coordinator.store import Appliance
from fedge.update.version import reports_replace_one_epsilon
from fedge.wire.messages import HEALTH_LEDGER_RELEASED, HEALTH_MIN_COHORT

LEDGER_RELEASED = HEALTH_LEDGER_RELEASED  # fedge.wire.messages: the wire's own name
MIN_COHORT = HEALTH_MIN_COHORT


def privacy_floor(health: Mapping[str, Any]) -> int | None:
    """The fewest sites ``health``'s site lets a secure sum hold (its ``min_cohort``,
    the report's MIN_COHORT), or None when the report does not say: an agent before
    the key, or a value that is not an integer (nothing is assumed of it then)."""
    floor = health.get(MIN_COHORT)
    if isinstance(floor, bool) or not isinstance(floor, int):
        return None
    return floor


def over_floor(floors: Mapping[str, int | None], sites: Iterable[str], *,
               others: int = 0) -> dict[str, tuple[int, int]]:
    """The sites of ``sites`` that would refuse a secure sum over them (module doc,
    "Privacy floors"): site -> (its floor, the sites the sum held when it was left
    out). ``others``: sites that could be in the sum too, of floors not known (not
    heard from yet). Sites with no floor in ``floors`` are never left out."""
    pool = set(sites)
    out: dict[str, tuple[int, int]] = {}
    while True:
        held = len(pool) + others
        over = {s: f for s in pool if (f := floors.get(s)) is not None and f > held}
        if not over:
            return out
        out.update({s: (f, held) for s, f in over.items()})
        pool -= over.keys()


def floor_reason(floor: int, held: int) -> str:
    """Why a site is left out of a round of ``held`` sites under its privacy floor."""
    return (f"its privacy floor min_cohort {floor} exceeds this round's {held} site(s): "
            "it would train, then refuse the secure sum; lower min_cohort in [privacy] of "
            "its agent.toml or add sites")


def ledger_rollback_notice(site: str, now: int, was: int) -> str:
    """What the site is told (a Rejected; an agent's journal shows 300 characters of
    it) when its privacy ledger holds ``now`` released runs, fewer than the ``was`` it
    reported before."""
    return (f"{site}'s privacy ledger holds {now} released runs, fewer than the {was} it "
            "reported (restored from a backup?): left out of every job until the newer "
            "privacy/ and secagg/ are restored or the coordinator's operator runs "
            f"`fedge console ledger-ack {site}`")


EXPLAIN_SITES = 5  # sites named in a cohort shortfall; the rest are counted
WAITING_FOR_HEARTBEAT = "connected, waiting for its first heartbeat"
OLD_EPSILON_ACCOUNTING = ("reports epsilon under the accounting of fedge <0.2 (add-or-remove, "
                          "lower than today's replace-one): update the appliance")
OLD_CONTROL_RULE = ("moves its SCAFFOLD control variate by the rule of fedge <0.2 (at the "
                    "EvalTask, not on a ControlCommit), which lets it drift from the "
                    "server's: update the appliance")


def _listed(classes: tuple[str, ...] | None) -> str:
    if classes is None:
        return "no class lists (none declared there, or an agent before DatasetClasses)"
    if not classes:
        return "no class list"
    shown = ", ".join(repr(c) for c in classes[:20])
    return f"[{shown}{', ...' if len(classes) > 20 else ''}]"


# why a candidate is not in a retried round's cohort (Round.pinned_cohort)
PINNED_OUT = ("not in this retry's cohort: an attempt at a round whose sum was unmasked "
              "is retried over the same survivors only")
# why a candidate is not in the cohort of an attempt that failed before one formed
NO_COHORT = ("a candidate, but no cohort formed: the attempt failed while waiting for its "
             "cohort (its failure says why)")


@dataclass(frozen=True)
class Selection:
    candidates: list[str]
    excluded: dict[str, str]
    enrolled: int = 0  # sites enrolled (not revoked), candidates or not
    inactive: frozenset[str] = frozenset()  # excluded for their status (revoked)
    # the sites of a retry pinned to them (select_cohort's ``pinned``); None: not pinned
    pinned: tuple[str, ...] | None = None

    def left_out(self, cohort: list[str]) -> dict[str, str]:
        """Each enrolled site not in ``cohort`` and why: the excluded ones with their
        reasons, candidates a pinned retry did not take (PINNED_OUT) and, when the
        attempt failed before a cohort formed (``cohort`` empty), the other candidates
        (NO_COHORT).

        A round takes every candidate unless it is pinned (Round.offer), so a candidate
        outside a cohort that formed was left out by a pinned retry. Outside an empty
        one it was left out by nothing but the failure, unless a pinned retry would not
        have taken it either (not among ``pinned``)."""
        out = {s: r for s, r in self.excluded.items()
               if s not in cohort and s not in self.inactive}
        for s in self.candidates:
            if s in cohort:
                continue
            pinned_out = bool(cohort) or (self.pinned is not None and s not in self.pinned)
            out[s] = PINNED_OUT if pinned_out else NO_COHORT
        return out

    def excluded_first(self, limit: int = EXPLAIN_SITES) -> dict[str, str]:
        """The first ``limit`` excluded sites (by name) with their reasons."""
        return {s: self.excluded[s] for s in sorted(self.excluded)[:limit]}

    def explain(self, min_clients: int, limit: int = EXPLAIN_SITES) -> str:
        """Why this selection makes no cohort of ``min_clients``, bounded: the counts,
        and at most ``limit`` candidates and ``limit`` excluded sites by name."""
        names = ", ".join(self.candidates[:limit])
        if len(self.candidates) > limit:
            names += f" and {len(self.candidates) - limit} more"
        text = f"{len(self.candidates)} candidate site(s)"
        if names:
            text += f" ({names})"
        text += f" of {self.enrolled} enrolled, min_clients {min_clients}"
        if self.excluded:
            first = self.excluded_first(limit)
            text += "; excluded: " + "; ".join(f"{s}: {r}" for s, r in first.items())
            if len(self.excluded) > len(first):
                text += f"; and {len(self.excluded) - len(first)} more"
        return text


    def explain_missing(self, sites: list[str], limit: int = EXPLAIN_SITES) -> str:
        """Why each of ``sites`` that is not a candidate is not, bounded: "site-3 (not
        connected), ..." (a site the registry does not hold: "not enrolled")."""
        missing = [s for s in sites if s not in self.candidates]
        text = ", ".join(f"{s} ({self.excluded.get(s, 'not enrolled')})"
                         for s in missing[:limit])
        if len(missing) > limit:
            text += f" and {len(missing) - limit} more"
        return text


def select_cohort(appliances: Iterable[Appliance], *, connected: set[str], dataset: str,
                  busy: set[str] | None = None,
                  protocols: Mapping[str, int | None] | None = None,
                  secure_protocol: int | None = None, dp: bool = False,
                  scaffold: bool = False,
                  versions: Mapping[str, str] | None = None,
                  classes: Mapping[str, Mapping[str, Sequence[str]] | None] | None = None,
                  job_classes: Sequence[str] = (),
                  sidelined: Mapping[str, str] | None = None,
                  pinned: Sequence[str] | None = None, min_clients: int = 0) -> Selection:
    """Split the fleet into candidates and excluded sites (with the reason).

    ``protocols``: each connected site's secure-aggregation protocol from its
    heartbeats, None for a site not heard from by heartbeat yet (it is left out,
    "waiting for its first heartbeat", for any job: its eligibility and data sets are
    as it last declared them, perhaps before a restart). A site missing from
    ``protocols`` speaks protocol 1 (an agent from before the field existed).
    ``secure_protocol``: for a secure job, the secure-aggregation protocol the
    coordinator speaks; a site whose protocol differs is left out, as its masks would
    not cancel with the others'. It also leaves out a site whose privacy floor (its
    heartbeats' MIN_COHORT) the round cannot meet: ``pinned``, the sites of a retry
    pinned to them, or else every candidate, once they make ``min_clients`` (until
    then the round waits for more sites anyway; module doc, "Privacy floors").
    ``dp``: the job is DP (``privacy.dp`` or ``privacy.client_dp``); a site whose
    version is before fedge 0.2 is left out (module doc); so it is for ``scaffold``, a
    SCAFFOLD job. ``versions``: each site's
    version from its heartbeats on this connection; a site missing from it is taken
    at the version its registry record holds.

    ``classes``: each site's class lists by data set from the DatasetClasses before
    its last heartbeat (None or missing: none came); ``job_classes``: the plan's
    ``job.classes`` (() when none). The rule is the module doc's "Class order".

    ``sidelined``: site -> why the coordinator leaves it out of the round's next
    attempts (module doc); the reason is the exclusion's."""
    busy = busy or set()
    sidelined = sidelined or {}
    protocols = protocols or {}
    versions = versions or {}
    appliances = list(appliances)
    candidates: list[str] = []
    excluded: dict[str, str] = {}
    for a in appliances:
        if a.status != "enrolled":
            excluded[a.site_id] = f"status {a.status}"
        elif a.site_id not in connected:
            excluded[a.site_id] = "not connected"
        elif a.site_id in protocols and protocols[a.site_id] is None:
            excluded[a.site_id] = WAITING_FOR_HEARTBEAT
        elif a.ledger_rollback:
            excluded[a.site_id] = a.ledger_rollback
        elif not a.eligible:
            excluded[a.site_id] = f"not eligible: {a.eligibility_reason or 'no reason given'}"
        elif dataset not in a.datasets:
            excluded[a.site_id] = f"does not hold data set {dataset!r}"
        elif a.site_id in busy:
            excluded[a.site_id] = "busy with another task"
        elif secure_protocol is not None and protocols.get(a.site_id, 1) != secure_protocol:
            excluded[a.site_id] = (
                f"speaks secure-aggregation protocol {protocols.get(a.site_id, 1)}, this "
                f"coordinator {secure_protocol}: update the appliance")
        elif (dp or scaffold) and not reports_replace_one_epsilon(
                versions.get(a.site_id, a.version)):  # the same release brought both
            excluded[a.site_id] = OLD_EPSILON_ACCOUNTING if dp else OLD_CONTROL_RULE
        elif a.site_id in sidelined:
            excluded[a.site_id] = sidelined[a.site_id]
        else:
            candidates.append(a.site_id)
    for site, reason in _class_order(candidates, dataset, classes or {},
                                     tuple(job_classes)).items():
        candidates.remove(site)
        excluded[site] = reason
    if secure_protocol is not None:
        floors = {a.site_id: privacy_floor(a.health) for a in appliances}
        if pinned is None:
            below = over_floor(floors, candidates) if len(candidates) >= min_clients else {}
        else:  # the retry has exactly these sites, so a floor above them is not met
            below = {s: (f, len(pinned)) for s in candidates if s in pinned
                     and (f := floors.get(s)) is not None and f > len(pinned)}
        for site, (floor, held) in below.items():
            candidates.remove(site)
            excluded[site] = floor_reason(floor, held)
    enrolled = sum(1 for a in appliances if a.status == "enrolled")
    inactive = frozenset(a.site_id for a in appliances if a.status != "enrolled")
    return Selection(sorted(candidates), excluded, enrolled, inactive,
                     None if pinned is None else tuple(pinned))


def _class_order(candidates: list[str], dataset: str,
                 classes: Mapping[str, Mapping[str, Sequence[str]] | None],
                 job_classes: tuple[str, ...]) -> dict[str, str]:
    """The candidates left out so that no cohort mixes class orders for ``dataset``,
    each with its reason (module doc, "Class order")."""
    declared: dict[str, tuple[str, ...] | None] = {}
    for site in candidates:
        lists = classes.get(site)
        declared[site] = None if lists is None else tuple(lists.get(dataset, ()))
    if job_classes:
        return {site: (f"declares {_listed(own)} for data set {dataset!r}, the plan's "
                       f"job.classes is {_listed(job_classes)}: fix the order in this "
                       "site's agent.toml (datasets.classes) or in the plan"
                       if own is not None else
                       f"sent {_listed(own)}: its order for data set {dataset!r} cannot be "
                       f"checked against the plan's job.classes {_listed(job_classes)}; "
                       "declare them in its agent.toml (datasets.classes) or update the "
                       "appliance")
                for site, own in declared.items() if own != job_classes}
    orders = {own for own in declared.values() if own}
    if not orders:
        return {}
    if len(orders) == 1:
        (order,) = orders
        return {site: (f"sent {_listed(own)}: its class order for data set {dataset!r} "
                       f"cannot be checked against the {_listed(order)} the other sites "
                       "declare; declare them in its agent.toml (datasets.classes) or "
                       "update the appliance")
                for site, own in declared.items() if own is None}
    by_order: dict[tuple[str, ...], list[str]] = {}
    for site, own in sorted(declared.items()):
        if own:
            by_order.setdefault(own, []).append(site)
    summary = "; ".join(f"{_listed(order)} at {', '.join(sites[:EXPLAIN_SITES])}"
                        + (f" and {len(sites) - EXPLAIN_SITES} more"
                           if len(sites) > EXPLAIN_SITES else "")
                        for order, sites in sorted(by_order.items()))
    return {site: (f"declares {_listed(own)} for data set {dataset!r}, and the sites "
                   f"disagree on its class order ({summary}): their labels would be "
                   "summed mixed up; set job.classes in the plan to the intended order "
                   "(sites declaring another are then left out) or make the sites' "
                   "agent.toml datasets.classes agree")
            for site, own in declared.items() if own}
