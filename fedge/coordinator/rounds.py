"""One federated round as a sans-I/O state machine.

Theory of operation: a :class:`Round` never touches a socket, a clock or a
file. The coordinator feeds it the fleet view (:meth:`Round.offer`), every
message addressed to the round (:meth:`Round.receive`) and the time
(:meth:`Round.tick`: a clock that never steps, such as ``time.monotonic``, since
every deadline is a reading of it plus a span; ``started_at`` alone is a time of
day, for the records); each call returns the messages to send, as
``(site, body)`` pairs. When ``phase`` is ``DONE`` the round holds the next
global model, the strategy's new state and the metrics; the caller writes the
checkpoint and commits. When ``phase`` is ``FAILED`` the global model is
untouched and ``failure`` says why.

Everything that changes the phase is in ``TRANSITIONS`` below.

The last round of a job whose plan evaluates on another split than ``test`` also
has the new model evaluated once on each survivor's ``test`` split (the *final
test*: held out from every round's evaluation, so no choice made while training
saw it). Its EvalTask goes with the round's own, under its own task id
(``test_task_id``), and its rows are stored with the round's under split
``test``; a site without a test split refuses it as it refuses any missing split
(``test_missing`` keeps why).

A round whose unmasking was already asked for (an earlier attempt, before a
coordinator crash or a failure) is *pinned* to that attempt's survivor set S
(``pinned_cohort``): the sites logged their reveal over S and refuse to reveal
the same update over any other set, since two sums over different sets give
the coordinator their difference. A pinned round starts only with exactly S,
fails at once when a site of S will not train, and never sends a consistency
check or unmask request listing other survivors. The first unmask request of
every attempt is held until the driver has made S durable
(:attr:`Round.unmask_pending`, :meth:`Round.unmask_recorded`).

Secure aggregation input (documented here because both ends rely on it): each
agent i sends concat(w_i·Δ_i, [w_i]) with Δ_i = w(local) − w(global) clipped
coordinate-wise to [−c, c] (c = plan ``secagg.clip``) and
w_i = weight_scale · n_i, weight_scale = min(1, c) / max_j n_j over the
aggregation cohort. Hence every coordinate lies in [−c, c], the quantiser's
range; the coordinator divides Σ w_i·Δ_i by Σ w_i (the last coordinate) and
obtains the example-weighted mean update, whatever the common scale.
Under DP-FedAvg (plan ``privacy.client_dp``) every agent sends w_i = min(1, c)
instead, so the result is the unweighted mean its noise shares are sized for.

What a site says of itself is checked where the coordinator can check it. Its
TrainDone count weighs its input, and nothing can check the count: a false one lets
the site's update dominate the mean, as an offset on its masked input can. A masked
input can carry any offset unseen: the unmasked sum must hold the total weight the
counts give, and no coordinate beyond the clip (:func:`sum_problem`), or the attempt
fails; that bound is what a false count cannot pass either, so a count is never a
reason to leave a site out. One more than MAX_EXAMPLES_OVER_MEDIAN times the median
of its round's is audited ("example_count_outlier"; not under DP-FedAvg, where counts
weigh nothing) and summed. In the size-weighted evaluation metric (site "*") such a
count is capped at that multiple of the median (:func:`eval_weights`). A site that
refuses the aggregation because a peer's share to it was tampered with fails the
attempt (:meth:`Round._accusation`), if it says so while its own input can still be
summed; later the same words are a plain refusal (:meth:`Round._accused`). A
survivor's unmasking share that SecAgg+ found false (left out of a sum that still
commits, ``AggregationResult.false_shares``) is audited as "false_unmask_share",
naming its sender and whose secret it was a share of
(:meth:`Round._false_share_findings`).

SCAFFOLD (plan strategy ``scaffold``): the task carries the server control
variate c, and each input is concat(w_i·Δ_i, w_i·Δc_i, [w_i]) (2d + 1 values,
Δc_i clipped like Δ_i), so c's update is also learnt from sums alone. c stays the
example-weighted mean of the sites' c_i (fedge.coordinator.strategies) only if a
site's c_i moves by exactly the Δc_i that committed rounds summed: each TrainTask
is preceded by a ``ControlCommit`` naming the last committed round whose sum held
that site's Δc_i (the strategy's table, checkpointed with c), and the agent applies
the Δc_i it kept for that round and drops any other. An EvalTask moves nothing: it
comes before the commit (an attempt can still fail), and a site that dropped out
after its masked input was summed never gets one.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
import secrets
import statistics
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedge.coordinator.checkpoint import model_digest
from fedge.coordinator.plan import Plan
from fedge.coordinator.strategies import Strategy, StrategyError, mean_update
from fedge.secagg.keys import length_prefixed
from fedge.text import by_reason, printable
from fedge.wire import messages as m
from fedge.wire.codec import short

Outgoing = list[tuple[str, Any]]


class Phase(enum.Enum):
    WAITING_COHORT = "waiting_cohort"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


# phase -> {event: next phase}. The methods below implement exactly these edges.
TRANSITIONS: dict[Phase, dict[str, Phase]] = {
    Phase.WAITING_COHORT: {
        "cohort >= min_clients (pinned: every site of S a candidate)": Phase.TRAINING,
        "cohort deadline passed": Phase.FAILED,
    },
    Phase.TRAINING: {
        "all answered or train deadline, >= min_clients trained (pinned: all of S)":
            Phase.AGGREGATING,
        "all answered or train deadline, < min_clients trained": Phase.FAILED,
        "pinned: a site of S refused or was lost": Phase.FAILED,
    },
    Phase.AGGREGATING: {
        "aggregation result": Phase.EVALUATING,
        "aggregation aborted / strategy rejected update": Phase.FAILED,
        "the sum's total weight or a coordinate is out of its honest bounds": Phase.FAILED,
        "a site refused: a peer's share to it was tampered with": Phase.FAILED,
        "the sites whose input is or may still be summed are fewer than min_clients":
            Phase.FAILED,
        "refusals leave the unmasking impossible": Phase.FAILED,
        "pinned: the survivors asked to sign or unmask are not S": Phase.FAILED,
    },
    Phase.EVALUATING: {
        "all evaluated (last round: on the eval split and on test) or eval deadline":
            Phase.DONE,
    },
    Phase.DONE: {},
    Phase.FAILED: {},
}


def derive_seed(job_seed: int, rnd: int, site: str, purpose: str) -> bytes:
    """16 bytes determined by (job seed, round, site, purpose) alone.

    Training and quantisation randomness come from here, never from the
    secure-aggregation keys, so a round restarted with fresh keys after a
    coordinator crash produces the same sum.
    """
    h = hashlib.sha256(f"fedge/{purpose}/{job_seed}/{rnd}/{site}".encode())
    return h.digest()[:16]


# The secure-aggregation protocol this code speaks: what keys the masks and the share
# encryption (the round context below). Sites speaking another are left out of secure
# cohorts (fedge.coordinator.cohort); raise it whenever that derivation changes.
# 1: the model digest alone; 2: context_digest.
SECAGG_PROTOCOL = 2


def context_digest(model_digest: bytes, plan_text: str, weight_scale: float,
                   cohort: list[str], server_control: np.ndarray | None) -> bytes:
    """What every site of one secure aggregation must have been given alike, hashed:
    the global model (its digest, which each agent checks against the weights it
    got), the plan, the weight scale, the aggregation cohort and SCAFFOLD's c.

    It is the round context's digest that keys every pairwise mask, so a coordinator
    that gives one site other weights, another plan (a learning rate of 0) or another
    weight scale (0: the sum would be one site's update) gets noise, not a sum.
    """
    h = hashlib.sha256(f"fedge/round-context/v{SECAGG_PROTOCOL}".encode())
    control = (b"" if server_control is None
               else np.ascontiguousarray(server_control, dtype="<f4").tobytes())
    for part in (bytes(model_digest), plan_text, struct.pack("<d", weight_scale),
                 "\n".join(sorted(cohort)), control):
        h.update(length_prefixed(part))
    return h.digest()


def train_seed(job_seed: int, rnd: int, site: str) -> int:
    return int.from_bytes(derive_seed(job_seed, rnd, site, "train")[:8], "little") >> 1


def weight_scale(clip: float, n_max: int) -> float:
    """The factor turning an example count into the aggregation weight (see module doc)."""
    return min(1.0, clip) / float(n_max)


MAX_METRICS = 64


# A site's own words (TaskRefused.reason) are kept to their first and last this many
# characters: they are joined into the round's failure, which every cohort site is sent
# and SQLite keeps, and stored as the reason a site was dropped. The end is kept as well
# as the start because that is where a reason says what to do about it (the agent's
# "... a job re-run over other sites needs another seed").
PEER_REASON_HEAD = PEER_REASON_TAIL = 160
PEER_REASON_CHARS = PEER_REASON_HEAD + 1 + PEER_REASON_TAIL


def peer_reason(reason: str) -> str:
    """A site's reason as the coordinator keeps it: control characters escaped
    (:func:`printable`), then whole when it fits in PEER_REASON_CHARS, else its start
    and its end around "…"."""
    reason = printable(reason)
    if len(reason) <= PEER_REASON_CHARS:
        return reason
    return reason[:PEER_REASON_HEAD] + "…" + reason[-PEER_REASON_TAIL:]


def grouped_reasons(reasons: dict[str, str]) -> str:
    """``{site: reason}`` as one text, the sites that gave the same reason together:
    "a, b: reason; c: other", in the order of each reason's first site by name, so a
    reason every site of a large cohort gave is said once, not once per site
    (:func:`fedge.text.by_reason`, which the console shows a status's reasons with)."""
    return "; ".join(f"{', '.join(sites)}: {why}" for sites, why in by_reason(reasons))


# A site's example count (TrainDone's, EvalResult's) is its own word, and it decides
# its weight. In training nothing the coordinator could do with it adds protection:
# the weight is computed by the agent (w_i = weight_scale·n_i), and a false count
# (up to the wire's 2**40) lets one site's update dominate the mean, yet still within
# the clip on every coordinate (sum_problem), where an offset on its masked input can
# move the mean anyway. Leaving such a site out would only cost honest federations
# their largest site (a university hospital beside small clinics; under DP-FedAvg a
# cohort below client_dp.cohort_size). So a TrainDone count more than this many times
# the median of its round's is audited and logged ("example_count_outlier"), and summed.
# In evaluation the coordinator does the weighing itself: a count above this multiple
# of the median of the counts weighed is weighed as that multiple (eval_weights), so an
# honest site at 150x still counts, at 100x, and one claiming 2**40 cannot decide the
# federation's figure.
# Why 100: the federations fedge serves differ by one order of magnitude at most
# (Fed-TCGA-BRCA's centres: 51 to 311; Fed-Heart-Disease's: 30 to 199), so 100x leaves
# an honest site room before it is audited or capped.
# A median is that of the round's own sites: of two, it is their mean, which neither
# can exceed 100-fold, so a pair is never flagged nor capped.
MAX_EXAMPLES_OVER_MEDIAN = 100


def count_median(counts: Mapping[str, int]) -> float | None:
    """The median of ``counts`` that MAX_EXAMPLES_OVER_MEDIAN multiplies, or None for
    fewer than two (a lone count is judged against nothing)."""
    if len(counts) < 2:
        return None
    return float(statistics.median(counts.values()))


def _shown(median: float) -> str:
    return str(int(median)) if median == int(median) else f"{median:g}"


def example_count_outliers(counts: Mapping[str, int]) -> dict[str, str]:
    """The sites whose count is more than MAX_EXAMPLES_OVER_MEDIAN times the median of
    ``counts``, each with why (naming its count and the median)."""
    median = count_median(counts)
    if median is None:
        return {}
    return {site: (f"reported {n} examples, more than {MAX_EXAMPLES_OVER_MEDIAN}x the "
                   f"median {_shown(median)} of this round's sites")
            for site, n in sorted(counts.items()) if n > MAX_EXAMPLES_OVER_MEDIAN * median}


# how an agent's refusal starts when a peer's share to it did not authenticate
# (fedge.secagg.errors.TamperedShare, as fedge.agent.runtime words a SecAggAbort)
TAMPERED_SHARE = "TamperedShare: "

FINAL_TEST_SPLIT = "test"  # the split of the last round's final test (module doc)


def _weighed_counts(evals: Mapping[str, Any]) -> dict[str, int]:
    """The counts one split's size-weighted metric weighs: results with metrics."""
    return {site: ev.n_examples for site, ev in evals.items()
            if ev.metrics and ev.n_examples > 0}


def eval_weights(evals: Mapping[str, Any]) -> dict[str, int]:
    """Each weighed result's weight in its split's size-weighted metric (site "*"):
    its count, capped at MAX_EXAMPLES_OVER_MEDIAN times the median of the counts
    weighed (a median of two or more is a whole number or a half, so the cap is
    whole). One site claiming 2**40 examples would otherwise be the federation's
    figure."""
    counts = _weighed_counts(evals)
    median = count_median(counts)
    if median is None:
        return counts
    cap = round(MAX_EXAMPLES_OVER_MEDIAN * median)
    return {site: min(n, cap) for site, n in counts.items()}


def eval_count_outliers(evals: Mapping[str, Any]) -> dict[str, str]:
    """The results of one split's evaluation whose weight in the size-weighted metric
    :func:`eval_weights` capped, each with why and the weight it got. Their own rows
    keep their count as sent."""
    weights = eval_weights(evals)
    return {site: f"{why}: weighed as {weights[site]}"
            for site, why in example_count_outliers(_weighed_counts(evals)).items()}


def _eval_rows(evals: dict[str, Any], split: str) -> list[tuple[str, str, str, float, int]]:
    """Metric rows of one split's evaluations: each site's (its count as sent), then
    each metric's size-weighted aggregate as site "*", weighed by :func:`eval_weights`
    (its count the sum of those weights)."""
    rows = []
    sums: dict[str, tuple[float, int]] = {}
    weights = eval_weights(evals)
    for site, ev in sorted(evals.items()):
        for name, value in sorted(ev.metrics.items()):
            rows.append((site, split, name, float(value), ev.n_examples))
            w = weights.get(site, 0)
            s, n = sums.get(name, (0.0, 0))
            sums[name] = (s + float(value) * w, n + w)
    for name, (s, n) in sorted(sums.items()):
        if n > 0:
            rows.append(("*", split, name, s / n, n))
    return rows

# Why a survivor is not in its round's evaluation (``Round.eval_missing``) when it did
# answer: a result whose every metric is undefined on its data (a one-class split's
# AUC, an all-censored split's C-index and loss) is left out, never counted as a value.
EVAL_EMPTY = "returned no metrics (each undefined on its data)"

# Why a site is missing from a committed round's survivors when it said nothing.
SILENT_IN_TRAINING = "did not answer before the train deadline"
# (the aggregation names why, with its stage: this is for one that does not)
SILENT_IN_AGGREGATION = "trained but left out of the aggregation"


def already_unmasked(rnd: int, survivors: list[str]) -> str:
    """Why a pinned round (module docstring) waits for, or fails without, a site."""
    return (f"round {rnd}'s update was already unmasked over {sorted(survivors)}; a sum "
            "over another set would reveal a difference")


def metric_name_ok(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isalnum() or c in "_-./" for c in name)


def metrics_problem(metrics: dict[str, float], epsilon: float) -> str | None:
    """Why a site's reported metrics cannot be stored, or None.

    Metrics are stored and plotted as numbers: a NaN, an infinity, a strange name or
    an endless dictionary from a site is refused with its name, never persisted. An ε
    (``epsilon`` and metrics named ``epsilon…``) may be +inf: a site's accountant says
    so of noise too small to bound anything, and the site has already charged the run
    (refusing its update would lose the round, not the spend).
    """
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, more than {MAX_METRICS}"
    for name, value in metrics.items():
        if not metric_name_ok(name):
            return f"metric name {name[:80]!r} is not 1-64 letters, digits or _-./"
        if not math.isfinite(value) and not (name.startswith("epsilon") and value == math.inf):
            return f"metric {name} = {value} is not a finite number"
    if not (epsilon >= 0 and not math.isnan(epsilon)):
        return f"epsilon = {epsilon} is not a number >= 0"
    return None


# Relative error of one input's weight w_i (and of w_i·Δ_i) as the sum holds it:
# Agent.input_vector writes float32 (2^-24), of a float64 weight_scale·n_i that was
# rounded once already; 2^-22 bounds both with room.
INPUT_RELATIVE_ERROR = 2.0 ** -22


def quantisation_step(clip: float, cohort: int) -> float:
    """The largest error secure aggregation's quantiser adds to one coordinate of one
    site's input, for an aggregation cohort of ``cohort`` sites: it rounds
    stochastically (floor(y + u), u in [0, 1): less than one step away) to
    b = quant_bits(cohort) bits over [−clip, clip] (SecAggConfig.bits), one step
    being 2·clip/(2^b − 1)."""
    from fedge.core import quant_bits

    return 2.0 * clip / ((1 << quant_bits(cohort)) - 1)


def sum_problem(total: np.ndarray, *, expected_weight: float, summands: int, clip: float,
                step: float) -> str | None:
    """Why ``total`` (concat(Σ w_i·Δ_i, [Σ w_i]), as unmasked) cannot be the sum of
    ``summands`` honest inputs whose weights add up to ``expected_weight``, or None.

    An honest sum's last coordinate is Σ w_i, which the coordinator knows (each w_i
    comes from the site's TrainDone count and the weight scale it sent); and every
    other coordinate is within clip·Σ w_i, since each agent clips Δ_i coordinate-wise
    to [−clip, clip] (``Agent.clipped_update``): no honest weighted mean exceeds the
    clip. Each bound allows for rounding exactly, so an honest sum is never refused:
    ``step`` per coordinate and site (:func:`quantisation_step`; 0 for a plain sum),
    INPUT_RELATIVE_ERROR on each weight, and float64 summing and dequantising (below
    summands·clip·2^-51, counted as clip·2^-40 a site).

    A masked input looks uniform, and a site can add any offset to it unseen: these
    bounds are what an offset cannot pass. Within them a site can still move the mean
    anywhere inside [−clip, clip] on every coordinate, and nothing here says which
    site did.
    """
    per_site = step + clip * 2.0 ** -40
    total_weight = float(total[-1])
    slack = summands * per_site + expected_weight * INPUT_RELATIVE_ERROR
    if not abs(total_weight - expected_weight) <= slack:
        return (f"the sum's total weight is {total_weight:.9g}, not the {expected_weight:.9g} "
                f"the survivors' example counts give (rounding allows {slack:.3g}): a "
                "site's masked input was altered")
    values = np.abs(np.asarray(total[:-1], dtype=np.float64))
    if not values.size:
        return None
    bound = clip * expected_weight * (1.0 + INPUT_RELATIVE_ERROR) + summands * per_site
    worst = int(np.argmax(values))
    if not float(values[worst]) <= bound:  # (NaN: refused too)
        mean = float(total[worst]) / total_weight if total_weight > 0 else math.inf
        return (f"the mean update's coordinate {worst} is {mean:.6g}, beyond the clip "
                f"{clip:g} that bounds every site's update (the sum's "
                f"{float(values[worst]):.6g} is above the {bound:.6g} its total weight and "
                "rounding allow): a site's masked input was altered")
    return None


@dataclass
class AggregationResult:
    total: np.ndarray  # float64[d+1]: Σ w_i·Δ_i, Σ w_i (SCAFFOLD [2d+1]: then Σ w_i·Δc_i)
    survivors: list[str]
    dropped: list[str]
    # survivor -> the secrets ("<site>'s self-mask seed") it sent a false unmasking
    # share of, which the sum was recovered without (SecAgg+ only)
    false_shares: dict[str, list[str]] = field(default_factory=dict)
    # each of those -> the secrets recovered after it was found false, whose share
    # from it was left out unchecked (one decoding per liar, fedge.secagg.server)
    unused_shares: dict[str, list[str]] = field(default_factory=dict)


# Round.rejected's kinds for the round's own refusals (an aggregation's come with its
# Refusal): fixed codes, by which the coordinator counts a site's repeated refusals
REJECTION_KINDS = (
    "not_in_cohort",   # the sender is not in the cohort of the round, or of its phase
    "withdrawn",       # the sender was taken out of the round
    "other_task",      # the message names a task other than the current attempt's
    "duplicate",       # a second answer to the same task
    "invalid_result",  # a result whose figures are refused
    "wrong_phase",     # a message the round's phase does not take
)


@dataclass(frozen=True)
class Refusal:
    """An aggregation's refusal of a site's message, among what it sends: the round
    notes it in ``Round.rejected`` and sends the site ``m.Rejected(reason)`` in its
    place (a Refusal never goes on the wire). ``kind`` is a fixed code for what was
    wrong ("wrong_shape", a SecAgg discard's ``Discard.kind``): the coordinator counts
    repeats by it, never by the reason, which may quote what the site sent."""

    kind: str
    reason: str


class Aggregation(Protocol):
    """What the round needs from an aggregation protocol (plain or SecAgg+)."""

    def start(self, now: float) -> Outgoing: ...
    def receive(self, sender: str, body: Any, now: float) -> Outgoing:
        """Take ``sender``'s message. One it refuses (a plain update of the wrong shape,
        a SecAgg message no honest site sends) is answered with a :class:`Refusal`,
        which the round notes in ``rejected`` for the coordinator to audit and sends
        as ``m.Rejected``."""
        ...
    def tick(self, now: float) -> Outgoing: ...
    def refused(self, sender: str, now: float) -> Outgoing:
        """``sender`` gave up its part (TaskRefused): it will send nothing more. The
        aggregation goes on without it when it can, and fails at once when it cannot."""
        ...
    def awaits_input(self, sender: str) -> bool:
        """Whether ``sender``'s input (its masked input, its plain update) has not come
        and can still come into the sum: a refusal that says a peer's share was
        tampered with is an accusation only then (``Round._accused``)."""
        ...
    def postpone(self, seconds: float) -> None:
        """The coordinator took no message for ``seconds``: its deadline moves on."""
        ...
    @property
    def left_out(self) -> dict[str, str]:
        """Each cohort site the aggregation went on (or failed) without, and why (a
        refusal included): what the attempt's record tells the operator."""
        ...
    @property
    def answered(self) -> list[str]:
        """The cohort sites whose answer to the aggregation's current step is in: their
        plain update; in secure aggregation, their message of the session's current
        stage (``jobs status``: the others not left out are still awaited)."""
        ...
    @property
    def threshold(self) -> int:
        """t, as AggregateBegin tells the sites (1 for a plain sum)."""
        ...
    @property
    def result(self) -> AggregationResult | None: ...
    @property
    def failure(self) -> str | None: ...


# (plan, round context, cohort, dimension d+1) -> Aggregation
AggregationFactory = Callable[[Plan, "RoundInfo", list[str], int], Aggregation]


@dataclass(frozen=True)
class RoundInfo:
    job_id: str
    round: int
    model_digest: bytes


class PlainAggregation:
    """Sum of plain input vectors (secure aggregation disabled in the plan).

    Sums in sorted site order in float64, so the result is deterministic. A sum of
    fewer than ``min_clients`` updates (the plan's ``job.min_clients``, capped at the
    cohort) is not made: the attempt fails, as a secure one does, and is retried.
    """

    def __init__(self, cohort: list[str], dim: int, deadline_s: float,
                 min_clients: int = 1) -> None:
        self._cohort = sorted(cohort)
        self._dim = dim
        self._deadline_s = deadline_s
        self._deadline = 0.0
        self._vectors: dict[str, np.ndarray] = {}
        self._refused: set[str] = set()
        self._result: AggregationResult | None = None
        self._failure: str | None = None
        self._min = max(1, min(min_clients, len(cohort)))

    def start(self, now: float) -> Outgoing:
        self._deadline = now + self._deadline_s
        return []

    def receive(self, sender: str, body: Any, now: float) -> Outgoing:
        if not isinstance(body, m.PlainUpdate) or sender not in self._cohort:
            return []
        vec = np.asarray(body.vector)
        if vec.shape != (self._dim,) or not np.all(np.isfinite(vec)):
            self._vectors.pop(sender, None)
            return [(sender, Refusal("wrong_shape",
                                     f"plain update of shape {vec.shape} or non-finite; "
                                     f"expected finite float32[{self._dim}]"))]
        self._vectors.setdefault(sender, vec.astype(np.float64))
        self._close_if_answered()
        return []

    def refused(self, sender: str, now: float) -> Outgoing:
        if sender in self._cohort and sender not in self._vectors:
            self._refused.add(sender)
            self._close_if_answered()
        return []

    def awaits_input(self, sender: str) -> bool:
        return (sender in self._cohort and sender not in self._vectors
                and sender not in self._refused
                and self._result is None and self._failure is None)

    def postpone(self, seconds: float) -> None:
        self._deadline += seconds

    @property
    def deadline(self) -> float:
        """When (the round's clock) the plain updates not in by then are gone without."""
        return self._deadline

    @property
    def answered(self) -> list[str]:
        return sorted(self._vectors)

    @property
    def threshold(self) -> int:
        return 1

    @property
    def left_out(self) -> dict[str, str]:
        closed = self._result is not None or self._failure is not None
        return {s: "refused to send its plain update" if s in self._refused else
                "sent no plain update before the aggregation deadline"
                for s in self._cohort if s not in self._vectors
                and (closed or s in self._refused)}

    def _close_if_answered(self) -> None:
        if self._result is not None or self._failure is not None:
            return
        if len(self._vectors) + len(self._refused) == len(self._cohort):
            if len(self._vectors) >= self._min:
                self._finish()
            else:
                self._failure = self._short("every other site refused to send its plain "
                                            "update")

    def tick(self, now: float) -> Outgoing:
        if self._result is None and self._failure is None and now >= self._deadline:
            if len(self._vectors) >= self._min:
                self._finish()
            else:
                self._failure = self._short("no other plain update arrived before the "
                                            "aggregation deadline")
        return []

    def _short(self, why: str) -> str:
        if not self._vectors:
            return why.replace(" other", "")
        return (f"{len(self._vectors)} plain update(s), fewer than the plan's min_clients "
                f"{self._min}: {why}; no sum is made")

    def _finish(self) -> None:
        total = np.zeros(self._dim, dtype=np.float64)
        for site in sorted(self._vectors):
            total += self._vectors[site]
        self._result = AggregationResult(
            total, sorted(self._vectors), [s for s in self._cohort if s not in self._vectors]
        )

    @property
    def result(self) -> AggregationResult | None:
        return self._result

    @property
    def failure(self) -> str | None:
        return self._failure


def plain_factory(plan: Plan, info: RoundInfo, cohort: list[str], dim: int) -> Aggregation:
    return PlainAggregation(cohort, dim, plan.deadlines.secagg_stage_s,
                            min_clients=plan.min_clients)


@dataclass(frozen=True)
class RoundProgress:
    """Where a round in flight stands (:meth:`Round.progress`)."""

    phase: str
    stage: str  # the secure aggregation's stage while aggregating ("": none)
    cohort: list[str]
    reported: list[str]  # answered the phase (while aggregating: its current stage)
    waiting_for: list[str]  # cohort sites still awaited in the phase (or stage)
    dropped: dict[str, str]  # cohort sites that will send nothing more, and why
    deadline: float | None  # when the phase ends, on the round's clock


@dataclass
class Round:
    """Round ``round`` of job ``job_id``, starting from ``weights``.

    ``strategy`` is a private copy; the caller keeps the old one until commit.
    """

    job_id: str
    round: int
    plan: Plan
    weights: np.ndarray
    strategy: Strategy
    started_at: float  # the time of day it started, as recorded (the driver's wall clock)
    aggregation_factory: AggregationFactory = plain_factory
    # when it opened on the clock that ``offer``, ``receive`` and ``tick`` are given
    # (the driver's monotonic clock), from which its cohort deadline counts; None:
    # ``started_at`` (one clock for both)
    opened_at: float | None = None
    phase: Phase = Phase.WAITING_COHORT
    failure: str = ""
    waiting_for: str = ""  # while WAITING_COHORT: why the candidates fall short
    cohort: list[str] = field(default_factory=list)
    trained: dict[str, m.TrainDone] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)
    # the sites whose updates the unmasked sum held, once the aggregation gave it: the
    # coordinator learned that sum even if it then rejected it (out of bounds, the
    # strategy's refusal) or the attempt failed later, so each released its update in
    # it (report.client_privacy counts one release per attempt); [] before the sum
    summed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    new_weights: np.ndarray | None = None
    evals: dict[str, m.EvalResult] = field(default_factory=dict)
    # each survivor that is not in the round's evaluation, and why: its refusal (in its
    # own words, cut as peer_reason), an empty or refused result, a lost connection or
    # the deadline. A refused or lost one still has its empty result in ``evals``
    eval_missing: dict[str, str] = field(default_factory=dict)
    # enrolled sites the cohort left out, and why (the coordinator's selection, set
    # when the cohort forms; committed with the round)
    left_out: dict[str, str] = field(default_factory=dict)
    # sites a failed aggregation went without that neither refused nor were lost
    # themselves: dropped as the protocol's consequence of others (fewer than t left)
    lost_by_aggregation: set[str] = field(default_factory=set)
    # the final test (module doc): survivors' test-split results, and why any is missing
    test_evals: dict[str, m.EvalResult] = field(default_factory=dict)
    test_missing: dict[str, str] = field(default_factory=dict)
    # (site, reason, kind) of each message refused, for the coordinator to audit; kind
    # is a fixed code (REJECTION_KINDS, or an aggregation's Refusal.kind), never the
    # site's text, so that repeats are counted by it
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    # cohort sites the driver took out of the round (:meth:`withdraw`), and why
    withdrawn: dict[str, str] = field(default_factory=dict)
    task_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # (phase, time entered) as observed by the driver; for logs and benchmarks
    phase_log: list[tuple[str, float]] = field(default_factory=list)
    _deadline: float = 0.0
    _aggregation: Aggregation | None = None
    _agg_cohort: list[str] = field(default_factory=list)
    _control: np.ndarray | None = None  # SCAFFOLD's c as sent with the tasks
    # S, when an earlier attempt already asked for this round's unmasking (module doc)
    pinned_cohort: list[str] | None = None
    # the unmask requests held until the driver has recorded their survivor set
    _held: Outgoing = field(default_factory=list)
    _held_survivors: list[str] | None = None
    _unmask_recorded: bool = False
    _record_error: str = ""
    _training_since: float = 0.0  # when the TrainTasks were sent
    _weight_scale: float = 0.0  # as AggregateBegin told the aggregation cohort
    # the sites that refused to train (TaskRefused); the others in ``refused`` before
    # the aggregation were lost, withdrawn, or sent a result the round refused
    _declined: set[str] = field(default_factory=set)
    # what the driver audits and acts on, taken as it reads them (:meth:`take_findings`):
    # (action, detail) with detail["site"] the site concerned. "example_count_outlier":
    # a TrainDone's count far above the round's median (summed all the same, see
    # MAX_EXAMPLES_OVER_MEDIAN); "share_accusation": a site
    # refused the aggregation saying a peer's share to it was tampered with (detail
    # "accused"): the attempt failed, and the driver leaves both out of the job's later
    # rounds; "aggregate_out_of_bounds": the unmasked sum no honest inputs can make;
    # "false_unmask_share": a survivor's unmasking share did not fit the others of its
    # secret and was left out of the sum (:meth:`_false_share_findings`)
    findings: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        self.digest = bytes.fromhex(model_digest(self.weights))
        if self.opened_at is None:
            self.opened_at = self.started_at
        self._deadline = self.opened_at + self.plan.deadlines.cohort_s
        if self.pinned_cohort is not None:
            self.pinned_cohort = sorted(self.pinned_cohort)
        self.test_task_id = f"{self.task_id}-test"

    @property
    def final_test(self) -> bool:
        """Whether this round ends with the final test (module doc)."""
        return self.round == self.plan.rounds and self.plan.eval_split != FINAL_TEST_SPLIT

    def dropped_reasons(self) -> dict[str, str]:
        """Why each site left out is left out, in its own words where it said any (cut
        as :func:`peer_reason`): once aggregated (EVALUATING, DONE) each dropped site
        (the cohort less the survivors), with the aggregation's reason for a site
        that trained; before that (FAILED) each site that refused or was lost, and
        those a failed aggregation went without (``Aggregation.left_out``)."""
        if self.phase not in (Phase.EVALUATING, Phase.DONE):
            return dict(sorted(self.refused.items()))
        left = self._aggregation.left_out if self._aggregation is not None else {}
        return {s: self.refused.get(s) or (left.get(s, SILENT_IN_AGGREGATION)
                                           if s in self.trained else SILENT_IN_TRAINING)
                for s in self.dropped}

    @property
    def unanimous_refusal(self) -> str | None:
        """The reason, when this failed attempt failed because every site of its cohort
        refused to train it (TaskRefused) in the same words: none trained, none was
        lost, withdrawn or refused a result; None otherwise. The driver fails the job at
        once when the attempt before it at the round ended the same way (service
        module doc): a plan every site refuses alike is not retried for nothing."""
        if self.phase is not Phase.FAILED or not self.cohort or self.trained \
                or self.withdrawn or self._declined != set(self.cohort) \
                or set(self.refused) != set(self.cohort):
            return None
        reasons = {self.refused[s] for s in self.cohort}
        return reasons.pop() if len(reasons) == 1 else None

    @property
    def info(self) -> RoundInfo:
        return RoundInfo(self.job_id, self.round, self.digest)

    @property
    def input_length(self) -> int:
        """Length of each aggregation input: d + 1, or 2d + 1 for SCAFFOLD."""
        d = self.weights.size
        return 2 * d + 1 if self.plan.scaffold else d + 1

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.FAILED)

    @property
    def participants(self) -> list[str]:
        return list(self.cohort)

    @property
    def unmask_pending(self) -> list[str] | None:
        """The survivor set of unmask requests held until the driver records it durably
        (then :meth:`unmask_recorded`); None when nothing waits for a record."""
        if self.phase is Phase.AGGREGATING and self._held and not self._unmask_recorded:
            return self._held_survivors
        return None

    def unmask_recorded(self) -> Outgoing:
        """The driver recorded :attr:`unmask_pending` durably: the held unmask requests."""
        self._record_error = ""
        if self.phase is not Phase.AGGREGATING or self._unmask_recorded:
            return []
        self._unmask_recorded = True
        held, self._held = self._held, []
        return held

    def take_findings(self) -> list[tuple[str, dict[str, Any]]]:
        """The :attr:`findings` not taken yet (each is handed out once)."""
        found, self.findings = self.findings, []
        return found

    def unmask_not_recorded(self, why: str) -> None:
        """Recording :attr:`unmask_pending` failed for now (``why``): the requests stay
        held, the driver tries again; if the stage deadline passes first, the failure
        says why nobody was asked."""
        self._record_error = why

    def progress(self) -> RoundProgress:
        """Where the round in flight stands (``jobs status``): in training, who sent its
        update; in aggregation, who answered its current step (a secure aggregation's
        stage, named, with that stage's deadline); in evaluation, who answered
        everything asked (the final test too, in the last round); each cohort site
        that will send nothing more with why; the phase's deadline on the round's
        clock (None: none known). Before the cohort forms, nobody is reported or
        waited for: the deadline is the cohort's."""
        phase = self.phase
        cohort = list(self.cohort)
        gone = {s: why for s, why in self.dropped_reasons().items() if s in cohort}
        gone.update(self.withdrawn)
        reported: list[str] = []
        stage = ""
        deadline: float | None = self._deadline
        if phase is Phase.TRAINING:
            reported = sorted(s for s in self.trained if s not in gone)
        elif phase is Phase.AGGREGATING:
            agg = self._aggregation
            session = getattr(agg, "session", None)  # SecureAggregation's ServerSession
            stage = str(getattr(session, "stage", ""))
            deadline = getattr(session if session is not None else agg, "deadline", None)
            gone.update(agg.left_out if agg is not None else {})
            # who answered the current step (a secure aggregation's stage: its masked
            # input, then its consistency signature, then its unmasking shares)
            reported = sorted(s for s in (agg.answered if agg is not None else ())
                              if s in self._agg_cohort and s not in gone)
        elif phase is Phase.EVALUATING:
            # a survivor refused, lost or invalid in evaluation has its empty result in
            # ``evals``: it is gone, not reported
            gone.update({s: f"in evaluation: {why}" for s, why in self.eval_missing.items()
                         if why != EVAL_EMPTY})
            answered = [s for s in self._eval_cohort() if s in self.evals
                        and (not self.final_test or s in self.test_evals
                             or s in self.test_missing)]
            reported = sorted(s for s in answered if s not in gone)
        elif phase is not Phase.WAITING_COHORT:  # DONE, FAILED: nothing is awaited
            deadline = None
        pool = {Phase.TRAINING: cohort, Phase.AGGREGATING: self._agg_cohort,
                Phase.EVALUATING: self._eval_cohort()}.get(phase, [])
        waiting = sorted(s for s in pool if s not in reported and s not in gone)
        if deadline is not None and not math.isfinite(deadline):
            deadline = None
        return RoundProgress(phase.value, stage, cohort, reported, waiting,
                             dict(sorted(gone.items())), deadline)

    # -- inputs ----------------------------------------------------------------------

    def offer(self, candidates: list[str], now: float, why: str = "") -> Outgoing:
        """The sites now eligible (enrolled, connected, healthy, holding the data set).

        ``why`` says why the others are not (bounded); while the round waits it is
        kept in ``waiting_for`` and becomes part of the failure if the deadline passes.
        A pinned round (module docstring) starts with exactly its survivor set S once
        every site of S is a candidate, whatever else is; ``why`` then says why the
        missing sites of S are not.
        """
        if self.phase is not Phase.WAITING_COHORT:
            return []
        pinned = self.pinned_cohort
        if pinned is None:
            ready = len(candidates) >= self.plan.min_clients
            self.waiting_for = why
        else:
            missing = [s for s in pinned if s not in candidates]
            ready = not missing
            self.waiting_for = (f"{already_unmasked(self.round, pinned)}; waiting for "
                                f"{why or ', '.join(missing)}")
        if ready:
            self.waiting_for = ""
            self.cohort = list(pinned) if pinned is not None else sorted(candidates)
            self.phase = Phase.TRAINING
            self._deadline = now + self.plan.deadlines.train_s
            self._training_since = now
            control = (self.strategy.server_control(self.weights.size) if self.plan.scaffold
                       else None)
            self._control = control
            out: Outgoing = []
            for site in self.cohort:
                if self.plan.scaffold:  # which of its Δc_i c holds: before it trains
                    out.append((site, m.ControlCommit(
                        task_id=self.task_id, summed_round=self.strategy.summed_round(site))))
                out.append((site, m.TrainTask(
                    task_id=self.task_id, plan=self.plan.text, weights=self.weights,
                    model_digest=self.digest,
                    train_seed=train_seed(self.plan.seed, self.round, site),
                    quant_seed=derive_seed(self.plan.seed, self.round, site, "quantise"),
                    server_control=control,
                )))
            return out
        return self.tick(now)

    def receive(self, sender: str, body: Any, now: float) -> Outgoing:
        """A message from ``sender`` for this round.

        Messages that do not fit the phase or the sender are not errors of the
        round: they are noted in ``rejected`` (site, reason) and answered with
        :class:`~fedge.wire.messages.Rejected`; the round goes on.
        """
        if sender not in self.cohort:
            return self._reject(sender, "not_in_cohort",
                                f"{sender} is not in the cohort of round {self.round}")
        if sender in self.withdrawn:
            return self._reject(sender, "withdrawn",
                                f"{sender} was dropped from round {self.round}: "
                                f"{self.withdrawn[sender]}")
        task_id = getattr(body, "task_id", self.task_id)
        if task_id == self.test_task_id and self.final_test \
                and self.phase is Phase.EVALUATING:
            return self._receive_test(sender, body)
        if task_id != self.task_id:
            return self._reject(sender, "other_task",
                                f"{type(body).__name__} for task {short(task_id)}, "
                                f"not the current attempt {self.task_id}")
        if self.phase is Phase.TRAINING:
            if isinstance(body, m.TrainDone):
                if sender in self.trained or sender in self.refused:
                    return self._reject(sender, "duplicate", "duplicate train result")
                if body.n_examples <= 0:
                    self.refused[sender] = f"reported {body.n_examples} training examples"
                    return (self._reject(sender, "invalid_result",
                                         "train result with no examples")
                            + self._answered_training(now))
                problem = metrics_problem(body.metrics, body.epsilon)
                if problem is not None:
                    self.refused[sender] = f"invalid train result: {problem}"
                    return (self._reject(sender, "invalid_result",
                                         f"train result refused: {problem}")
                            + self._answered_training(now))
                self.trained[sender] = body
            elif isinstance(body, m.TaskRefused):
                if sender in self.trained:
                    # counted once, as trained: a site must not stand for two answers
                    # and end training before an honest site still at work
                    return self._reject(sender, "duplicate",
                                        "task refused after its train result; "
                                        "the train result stands")
                self.refused.setdefault(sender, peer_reason(body.reason))
                self._declined.add(sender)
            else:
                return self._reject(sender, "wrong_phase",
                                    f"{type(body).__name__} during training")
            return self._answered_training(now)
        if self.phase is Phase.AGGREGATING:
            assert self._aggregation is not None
            if sender not in self._agg_cohort:
                return self._reject(sender, "not_in_cohort",
                                    f"{sender} is not in the aggregation cohort")
            if isinstance(body, m.TaskRefused):
                # The agent gave up on its part: a dropout the aggregation learns of now,
                # not at its stage deadline, so a refusal that leaves the unmasking
                # impossible fails the attempt at once (naming the refusal).
                self.refused.setdefault(sender, peer_reason(body.reason))
                accused = self._accused(sender, body.reason)
                if accused is not None:
                    return self._accusation(sender, accused, now)
                return self._aggregated(self._aggregation.refused(sender, now), now)
            return self._aggregated(self._aggregation.receive(sender, body, now), now)
        if self.phase is Phase.EVALUATING:
            if m.is_secagg(body):
                # a share that arrived after the unmask stage closed is harmless and not
                # answered; the finished session still refuses, by name, one that names
                # another site, job or round (fedge.coordinator.secure)
                assert self._aggregation is not None
                return self._from_aggregation(
                    [(s, b) for s, b in self._aggregation.receive(sender, body, now)
                     if isinstance(b, Refusal)])
            if sender not in self._eval_cohort():
                if isinstance(body, m.TaskRefused):
                    return []  # a dropped site giving up late: it is out already
                # only survivors were sent the new model: anything else would be counted
                # in place of a survivor's result and weighted into the round's metrics
                return self._reject(sender, "not_in_cohort",
                                    f"{type(body).__name__} from {sender}, which is "
                                    f"not in the evaluation cohort of round {self.round}")
            if isinstance(body, m.EvalResult):
                if sender in self.evals:
                    return self._reject(sender, "duplicate", "duplicate evaluation result")
                problem = metrics_problem(body.metrics, 0.0)
                if problem is None and body.n_examples < 0:
                    problem = f"n_examples = {body.n_examples} is negative"
                self.evals[sender] = body if problem is None else \
                    m.EvalResult(self.task_id, 0, {})
                if problem is not None:
                    self.eval_missing[sender] = f"invalid result: {problem}"
                elif not body.metrics:
                    self.eval_missing[sender] = EVAL_EMPTY
                self._done_if_evaluated()
                if problem is not None:
                    return self._reject(sender, "invalid_result",
                                        f"evaluation result refused: {problem}")
            elif isinstance(body, m.TaskRefused):
                self.evals[sender] = m.EvalResult(self.task_id, 0, {})
                self.eval_missing[sender] = peer_reason(body.reason)
                self._done_if_evaluated()
            else:
                return self._reject(sender, "wrong_phase",
                                    f"{type(body).__name__} during evaluation")
            return []
        return self._reject(sender, "wrong_phase",
                            f"{type(body).__name__} in phase {self.phase.value}")

    def tick(self, now: float) -> Outgoing:
        """Advance deadlines."""
        if self.phase is Phase.WAITING_COHORT and now >= self._deadline:
            if self.pinned_cohort is not None:
                return self._fail(f"the cohort deadline ({self.plan.deadlines.cohort_s:g} s) "
                                  f"passed: {self.waiting_for}")
            return self._fail(
                f"cohort below min_clients {self.plan.min_clients} when the cohort deadline "
                f"({self.plan.deadlines.cohort_s:g} s) passed"
                + (f": {self.waiting_for}" if self.waiting_for else "")
            )
        if self.phase is Phase.TRAINING and now >= self._deadline:
            return self._end_training(now)
        if self.phase is Phase.AGGREGATING:
            assert self._aggregation is not None
            out: Outgoing = []
            for site in self.withdrawn:
                # one that had answered the stage it was withdrawn in stays out of the next
                if site in self._agg_cohort and self.phase is Phase.AGGREGATING:
                    out += self._aggregated(self._aggregation.refused(site, now), now)
            if self.phase is not Phase.AGGREGATING:
                return out
            return out + self._aggregated(self._aggregation.tick(now), now)
        if self.phase is Phase.EVALUATING and now >= self._deadline:
            for s in self._eval_cohort():
                if s not in self.evals:
                    self.eval_missing.setdefault(
                        s, "no evaluation result before the evaluation deadline")
            if self.final_test:
                for s in self._eval_cohort():
                    if s not in self.test_evals:
                        self.test_missing.setdefault(
                            s, "no final test result before the evaluation deadline")
            self.phase = Phase.DONE
        return []

    def postpone(self, seconds: float) -> None:
        """The coordinator took no message for ``seconds`` (its loop did not run, or a
        locked database held the messages back): the phase's deadline, and the
        aggregation's, move that much later, so the sites' silence meanwhile, the
        coordinator's own deafness, is not counted against them."""
        self._deadline += seconds
        if self.phase is Phase.AGGREGATING and self._aggregation is not None:
            self._aggregation.postpone(seconds)

    def lost(self, site: str, now: float, reason: str | None = None) -> Outgoing:
        """``site``'s connection is gone (the transport closed it, a send found it not
        connected, or its heartbeats stopped): it will not answer. In training and
        evaluation it is no longer waited for; in secure aggregation it is dropped at
        its current stage at once (one that already answered that stage, at the next:
        the driver calls this each tick while the site stays away), as a refusal is,
        not at the stage deadline; the round goes on where the threshold t and
        min_clients allow. ``reason``, when the connection was closed on purpose
        (the operator revoked the site), is recorded in place of "connection lost
        during <stage>"."""
        if site not in self.cohort:
            return []
        if self.phase is Phase.AGGREGATING:
            assert self._aggregation is not None
            if site not in self._agg_cohort or site in self.withdrawn:
                return []
            self.refused.setdefault(site, reason or (
                "connection lost during secure aggregation" if self.plan.secagg.enabled
                else "connection lost during aggregation"))
            return self._aggregated(self._aggregation.refused(site, now), now)
        if self.phase is Phase.TRAINING and site not in self.trained:
            # Say how long after the TrainTask left and how big it was: a site
            # whose link cannot carry the model is lost at the same point every
            # round, and "connection lost" alone sends its IT after the wrong fault.
            self.refused.setdefault(
                site, reason or f"connection lost during training, "
                f"{now - self._training_since:.0f} s after its TrainTask "
                f"({self.weights.nbytes / 1e6:.1f} MB of weights) was sent")
            return self._answered_training(now)
        # Only the evaluation cohort counts towards DONE: a site dropped before
        # aggregation (lost() is called each tick while it stays away) was sent no
        # EvalTask and must not take the place of a survivor still evaluating.
        if self.phase is Phase.EVALUATING and site in self._eval_cohort():
            if site not in self.evals:
                self.evals[site] = m.EvalResult(self.task_id, 0, {})
                self.eval_missing.setdefault(site, reason or "connection lost during "
                                             "evaluation")
            if self.final_test and site not in self.test_evals:
                self.test_missing.setdefault(site, reason or "connection lost during the "
                                             "final test")
            self._done_if_evaluated()
        return []

    def withdraw(self, site: str, reason: str, now: float) -> Outgoing:
        """Take cohort site ``site`` out of the round now, as lost, for ``reason`` (its
        connection is contested: two machines answer for it, and neither can be counted
        on): the round goes on with the others at once, not at a deadline, where
        ``min_clients`` (training) or the threshold t (secure aggregation) allows. Its
        messages are refused from now on; a train result it already gave is not used;
        in secure aggregation it is dropped at its current stage (one that answered
        that stage, at the next); a survivor is no longer waited for in evaluation."""
        if site not in self.cohort or self.finished or site in self.withdrawn:
            return []
        self.withdrawn[site] = reason
        out: Outgoing = [(site, m.RoundAbort(f"dropped from round {self.round}: {reason}"))]
        if self.phase is Phase.TRAINING:
            self.trained.pop(site, None)
            self.refused[site] = reason
            return out + self._answered_training(now)
        if self.phase is Phase.AGGREGATING:
            assert self._aggregation is not None
            if site not in self._agg_cohort:
                return out
            self.refused.setdefault(site, reason)
            return out + self._aggregated(self._aggregation.refused(site, now), now)
        if self.phase is Phase.EVALUATING and site in self._eval_cohort():
            if site not in self.evals:
                self.evals[site] = m.EvalResult(self.task_id, 0, {})
                self.eval_missing.setdefault(site, reason)
            if self.final_test and site not in self.test_evals:
                self.test_missing.setdefault(site, reason)
            self._done_if_evaluated()
        return out

    def abort(self, reason: str) -> Outgoing:
        """Abandon the round (job cancelled, coordinator stopping)."""
        if self.finished:
            return []
        return self._fail(reason)

    def discard(self, reason: str) -> Outgoing:
        """The round cannot be carried on or committed (its commit raised): FAILED
        with ``reason`` whatever its phase, DONE included, so that the coordinator
        records a failed attempt and starts the round again instead of retrying the
        same failure for ever."""
        if self.phase is Phase.FAILED:
            return []
        return self._fail(reason)

    # -- transitions -------------------------------------------------------------------

    def _end_training(self, now: float) -> Outgoing:
        self._flag_count_outliers()
        done = sorted(self.trained)
        if self.pinned_cohort is not None and done != self.pinned_cohort:
            for s in self.pinned_cohort:
                if s not in self.trained:
                    self.refused.setdefault(s, "did not train before the train deadline")
            return self._fail_pinned()
        if self.pinned_cohort is None and len(done) < self.plan.min_clients:
            for s in self.cohort:
                if s not in self.trained:
                    self.refused.setdefault(s, SILENT_IN_TRAINING)
            reasons = grouped_reasons(self.refused)
            return self._fail(
                f"{len(done)} of {len(self.cohort)} sites trained, below min_clients "
                f"{self.plan.min_clients}" + (f" ({reasons})" if reasons else "")
            )
        self._agg_cohort = done
        n_max = max(self.trained[s].n_examples for s in done)
        scale = weight_scale(self.plan.secagg.clip, n_max)
        self._weight_scale = scale
        self.phase = Phase.AGGREGATING
        bound = RoundInfo(self.job_id, self.round, context_digest(
            self.digest, self.plan.text, scale, done, self._control))
        self._aggregation = self.aggregation_factory(self.plan, bound, done, self.input_length)
        out: Outgoing = [
            (s, m.AggregateBegin(task_id=self.task_id, cohort=done, weight_scale=scale,
                                 secure=self.plan.secagg.enabled,
                                 threshold=self._aggregation.threshold))
            for s in done
        ]
        # Sites that did not finish training are told to drop the round.
        out += [(s, m.RoundAbort("not in the aggregation cohort"
                                 + (f": {self.refused[s]}" if s in self.refused else "")))
                for s in self.cohort if s not in done]
        return out + self._aggregated(self._aggregation.start(now), now)

    def _flag_count_outliers(self) -> None:
        """An "example_count_outlier" finding for each trained site whose count is more
        than MAX_EXAMPLES_OVER_MEDIAN times the median of the round's: audited, and
        summed all the same (the comment above MAX_EXAMPLES_OVER_MEDIAN says why).
        Under DP-FedAvg a count weighs nothing (w_i = min(1, c)): nothing to flag."""
        if self.plan.privacy.get("client_dp") is not None:
            return
        counts = {s: t.n_examples for s, t in self.trained.items()}
        median = count_median(counts)
        for site, why in example_count_outliers(counts).items():
            self.findings.append(("example_count_outlier", {
                "job": self.job_id, "round": self.round, "site": site,
                "count": counts[site],
                "median": int(median) if median == int(median) else median,
                "reason": f"{why}: summed, its update weighing that much in the mean"}))

    def _aggregated(self, out: Outgoing, now: float) -> Outgoing:
        """What the aggregation sends, checked (:meth:`_from_aggregation`), then the
        aggregation's outcome, if it has one."""
        out = self._from_aggregation(out)
        if self.phase is not Phase.AGGREGATING:
            return out
        return out + self._check_aggregation(now)

    def _from_aggregation(self, out: Outgoing) -> Outgoing:
        """The aggregation's messages as they may go: a pinned round's consistency check
        or unmask request listing survivors other than S fails the attempt instead (and
        none of them goes); unmask requests are held until the driver has recorded
        their survivor set (:attr:`unmask_pending`). A message of the site's that the
        aggregation refused (its :class:`Refusal`, sent before anything else) is noted
        in ``rejected``, as the round's own refusals are, so the coordinator audits it,
        and goes as ``m.Rejected``."""
        from fedge.secagg.messages import ConsistencyRequest, UnmaskRequest

        passed: Outgoing = []
        for site, body in out:
            if isinstance(body, Refusal):
                reason = m.clip_reason(body.reason)
                self.rejected.append((site, reason, body.kind))
                body = m.Rejected(reason)
            if isinstance(body, ConsistencyRequest | UnmaskRequest):
                survivors = sorted(body.survivors)
                if self.pinned_cohort is not None and survivors != self.pinned_cohort:
                    gone = [s for s in self.pinned_cohort if s not in survivors]
                    said = grouped_reasons({s: self.refused[s] for s in gone
                                            if s in self.refused})
                    refusals = [(s, b) for s, b in passed if isinstance(b, m.Rejected)]
                    return refusals + self._fail(
                        f"{already_unmasked(self.round, self.pinned_cohort)}; this attempt's "
                        f"survivors are {survivors} ({', '.join(gone)} dropped out of secure "
                        f"aggregation{': ' + said if said else ''}): not asked "
                        "to unmask")
                if isinstance(body, UnmaskRequest) and not self._unmask_recorded:
                    self._held_survivors = survivors
                    self._held.append((site, body))
                    continue
            passed.append((site, body))
        return passed

    def _check_aggregation(self, now: float) -> Outgoing:
        agg = self._aggregation
        assert agg is not None
        if agg.failure is not None:
            # what the sites said when they gave up is the reason an operator needs
            # (an agent refusing to reveal), not the protocol's consequence of it
            # (those that refused to train first: often the first cause, and their
            # remedy, e.g. a missing column, is what the operator can act on)
            # (the words "refused" only for what a site said: a lost connection, a
            # withdrawal or a train result the round refused is not the site's refusal)
            said = {s: self.refused[s] for s in self._agg_cohort if s in self.refused}
            before = [s for s in sorted(self.refused) if s not in self._agg_cohort]
            declined = {s: self.refused[s] for s in before if s in self._declined}
            missing = {s: self.refused[s] for s in before if s not in self._declined}
            why = (f" ({len(said)} site(s) of the aggregation refused or were lost: "
                   f"{grouped_reasons(said)})" if said else "")
            if declined:
                why += (f" ({len(declined)} site(s) had refused to train: "
                        f"{grouped_reasons(declined)})")
            if missing:
                why += (f" ({len(missing)} other site(s) were not in the aggregation: "
                        f"{grouped_reasons(missing)})")
            if self._held and not self._unmask_recorded:
                why += (" (no site was asked to unmask: the survivor set could not be "
                        f"recorded: {self._record_error or 'not yet written'})")
            for s, left in agg.left_out.items():  # who it lost, for the attempt's record
                if s not in self.refused:
                    self.refused[s] = left
                    self.lost_by_aggregation.add(s)
            return self._fail(f"aggregation failed: {agg.failure}{why}")
        res = agg.result
        if res is None:
            return []
        self.summed = sorted(res.survivors)  # learned now, whatever is made of it
        self._false_share_findings(res)
        d = self.weights.size
        total_weight = float(res.total[-1])
        problem = self._sum_problem(res)
        if problem is not None:
            self.findings.append(("aggregate_out_of_bounds", {
                "job": self.job_id, "round": self.round, "site": "",
                "survivors": sorted(res.survivors), "reason": problem}))
            return self._fail(f"aggregate rejected: {problem}")
        try:
            avg = mean_update(res.total[:d], total_weight)
            if self.plan.scaffold:
                self.new_weights = self.strategy.step(
                    self.weights, avg, mean_control=mean_update(res.total[d:2 * d], total_weight),
                    examples={s: t.n_examples for s, t in self.trained.items()},
                    survivors=res.survivors, round=self.round)
            else:
                self.new_weights = self.strategy.step(self.weights, avg)
        except StrategyError as exc:
            return self._fail(f"aggregate rejected: {exc}")
        self.survivors = sorted(res.survivors)
        self.dropped = sorted(set(self.cohort) - set(self.survivors))
        self.phase = Phase.EVALUATING
        self._deadline = now + self.plan.deadlines.eval_s
        out: Outgoing = [(s, m.EvalTask(task_id=self.task_id, plan=self.plan.text,
                                        weights=self.new_weights, split=self.plan.eval_split))
                         for s in self._eval_cohort()]
        # A site of the aggregation that the sum went without (its update late or
        # refused) gets no EvalTask: told now, or it would hold the round until its next
        # task, and a software update staged there waits its whole restart bound.
        left = agg.left_out
        for s in self._agg_cohort:
            if s not in self.survivors and s not in self.withdrawn:  # (withdrawn: told)
                why = self.refused.get(s) or left.get(s) or SILENT_IN_AGGREGATION
                out.append((s, m.RoundAbort(m.clip_reason(
                    f"not summed in round {self.round} of job {self.job_id}: "
                    f"{peer_reason(why)}"))))
        if self.final_test:
            out += [(s, m.EvalTask(task_id=self.test_task_id, plan=self.plan.text,
                                   weights=self.new_weights, split=FINAL_TEST_SPLIT))
                    for s in self._eval_cohort()]
        return out

    def _false_share_findings(self, res: AggregationResult) -> None:
        """A "false_unmask_share" finding for each survivor the aggregation found
        sending a false unmasking share: "site" the sender, "secrets" what it was a
        share of, "owners" whose. The sum is right without it, so the round goes on;
        the finding is not proof against the sender alone (shares are not verifiable:
        the secret's owner may have dealt it a false one), so nobody is left out."""
        for sender, secrets_of in sorted(res.false_shares.items()):
            owners = sorted({s for s in self._agg_cohort for what in secrets_of
                             if what.startswith(f"{s}'s ")})
            n_unused = len(res.unused_shares.get(sender, ()))
            unused = (f"; its shares of the {n_unused} secret(s) recovered after that were "
                      "not used" if n_unused else "")
            self.findings.append(("false_unmask_share", {
                "job": self.job_id, "round": self.round, "site": sender,
                "secrets": list(secrets_of), "owners": owners,
                "reason": (f"{sender}'s unmasking share of {', '.join(secrets_of)} did not "
                           "fit the other shares and was left out of the sum: "
                           f"{sender} altered it, or {' or '.join(owners) or 'its owner'} "
                           "dealt it a false one" + unused)}))

    def _sum_problem(self, res: AggregationResult) -> str | None:
        """Why the unmasked sum ``res`` cannot be the survivors' honest inputs, or None
        (:func:`sum_problem`, with the total weight their TrainDone counts give)."""
        k = len(res.survivors)
        if k == 0:
            return None  # mean_update refuses the empty sum by its weight
        c = float(self.plan.secagg.clip)
        if self.plan.privacy.get("client_dp") is not None:
            expected = k * min(1.0, c)  # DP-FedAvg: w_i = min(1, c) (module doc)
        else:
            expected = sum(self._weight_scale * self.trained[s].n_examples
                           for s in res.survivors)
        step = (quantisation_step(c, len(self._agg_cohort)) if self.plan.secagg.enabled
                else 0.0)
        return sum_problem(res.total, expected_weight=expected, summands=k, clip=c,
                           step=step)

    def _accused(self, sender: str, reason: str) -> str | None:
        """The site of the aggregation cohort that ``sender``'s refusal says sent it a
        tampered share (the agent's SecAggAbort ``TamperedShare: share ... from
        'site' ...``), or None.

        Only while ``sender``'s masked input has not come and can still be summed
        (``Aggregation.awaits_input``): an honest agent finds a tampered share when it
        opens the shares relayed to it, before its masked input leaves. Later (at the
        consistency check, at unmasking, after its input or after the input stage
        closed without it) the text is not an accusation, and the refusal is a plain
        one: once unmasking was asked for, the survivors are pinned, and an accusation
        would fail every retry, and the job, with one message, naming an honest site."""
        if not reason.startswith(TAMPERED_SHARE):
            return None
        assert self._aggregation is not None
        if not self._aggregation.awaits_input(sender):
            return None
        for site in self._agg_cohort:
            if site != sender and re.match(
                    rf"{TAMPERED_SHARE}share (ciphertext |plaintext )?from {re.escape(repr(site))}"
                    r"[ ,:]", reason):
                return site
        return None

    def _accusation(self, accuser: str, accused: str, now: float) -> Outgoing:
        """``accuser`` refused the aggregation saying ``accused`` sent it a tampered
        share. Going on without the accuser is what the tampering buys (a sum over
        fewer sites: of three, the tamperer could cancel its own input and read the
        third site's update), so the attempt fails; the driver leaves both out of the
        job's later rounds (``findings``). A false accuser loses itself and one other
        from one job; it cannot make a sum smaller."""
        self.refused.setdefault(accused, f"accused by {accuser} of sending it a tampered "
                                "share")
        self.findings.append(("share_accusation", {
            "job": self.job_id, "round": self.round, "site": accuser, "accused": accused,
            "reason": self.refused[accuser]}))
        return self._fail(
            f"{accuser} refused the aggregation: a share {accused} sent it was tampered "
            f"with ({self.refused[accuser]}); the attempt fails rather than sum without "
            f"{accuser}, and both are left out of this job's later rounds")

    def _eval_cohort(self) -> list[str]:
        return self.survivors

    def _receive_test(self, sender: str, body: Any) -> Outgoing:
        """A survivor's answer to the final test's EvalTask (module doc)."""
        if sender not in self._eval_cohort():
            if isinstance(body, m.TaskRefused):
                return []
            return self._reject(sender, "not_in_cohort",
                                f"{type(body).__name__} from {sender}, which is "
                                f"not in the final test of round {self.round}")
        if sender in self.test_evals or sender in self.test_missing:
            return self._reject(sender, "duplicate", "duplicate final test result")
        out: Outgoing = []
        if isinstance(body, m.EvalResult):
            problem = metrics_problem(body.metrics, 0.0)
            if problem is None:
                self.test_evals[sender] = body
            else:
                self.test_missing[sender] = f"invalid result: {problem}"
                out = self._reject(sender, "invalid_result",
                                   f"final test result refused: {problem}")
        elif isinstance(body, m.TaskRefused):
            self.test_missing[sender] = peer_reason(body.reason)
        else:
            return self._reject(sender, "wrong_phase",
                                f"{type(body).__name__} during the final test")
        self._done_if_evaluated()
        return out

    def _done_if_evaluated(self) -> None:
        """DONE once every survivor answered the round's evaluation and, in a final
        test round, the final test too."""
        cohort = self._eval_cohort()
        if len(self.evals) < len(cohort):
            return
        if self.final_test and len(self.test_evals) + len(self.test_missing) < len(cohort):
            return
        self.phase = Phase.DONE

    def _answered_training(self, now: float) -> Outgoing:
        """A cohort site has just trained, refused or been lost: a pinned round that lost
        a site of S fails at once, and once every site answered training ends without
        waiting for its deadline."""
        if self._pinned_short():
            return self._fail_pinned()
        if self._all_answered():
            return self._end_training(now)
        return []

    def _pinned_short(self) -> list[str]:
        """The sites of a pinned round's S that will not train it (refused, lost)."""
        if self.pinned_cohort is None or self.phase is not Phase.TRAINING:
            return []
        return [s for s in self.pinned_cohort if s in self.refused]

    def _fail_pinned(self) -> Outgoing:
        assert self.pinned_cohort is not None
        short = [s for s in self.pinned_cohort if s in self.refused]
        said = "; ".join(f"{s}: {self.refused[s]}" for s in short)
        return self._fail(f"{already_unmasked(self.round, self.pinned_cohort)}; without "
                          f"{', '.join(short)} it cannot be summed again ({said})")

    def _all_answered(self) -> bool:
        """Every cohort site trained, refused or was lost (each counted once)."""
        return len(self.trained.keys() | self.refused.keys()) == len(self.cohort)

    def _fail(self, reason: str) -> Outgoing:
        reason = m.clip_reason(reason)
        self.phase = Phase.FAILED
        self.failure = reason
        self.new_weights = None
        return [(s, m.RoundAbort(reason)) for s in self.cohort]

    def _reject(self, sender: str, kind: str, reason: str) -> Outgoing:
        """``sender``'s message refused: noted in ``rejected`` (``kind``, one of
        REJECTION_KINDS) and answered ``m.Rejected(reason)``."""
        assert kind in REJECTION_KINDS, kind
        reason = m.clip_reason(reason)
        self.rejected.append((sender, reason, kind))
        return [(sender, m.Rejected(reason))]

    # -- results ----------------------------------------------------------------------

    def metric_rows(self) -> list[tuple[str, str, str, float, int]]:
        """(site, split, name, value, n_examples) for the store, plus the weighted mean."""
        rows: list[tuple[str, str, str, float, int]] = []
        for site, done in sorted(self.trained.items()):
            for name, value in sorted(done.metrics.items()):
                rows.append((site, "train", name, float(value), done.n_examples))
            if done.epsilon > 0:  # the site's cumulative DP-SGD spend in this job
                rows.append((site, "privacy", "epsilon_job", float(done.epsilon),
                             done.n_examples))
        rows += _eval_rows(self.evals, self.plan.eval_split)
        rows += _eval_rows(self.test_evals, FINAL_TEST_SPLIT)
        return rows
