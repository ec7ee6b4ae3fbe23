"""The coordinator's logic: fleet, jobs, rounds, commit — everything but sockets.

:class:`Coordinator` owns the store, the active job and its current
:class:`~fedge.coordinator.rounds.Round`. The process wrapper
(:mod:`fedge.coordinator.process`) feeds it decoded frames from the ROUTER
socket (:meth:`Coordinator.handle_frames`), calls :meth:`Coordinator.tick`
periodically, and sends whatever lands in :attr:`Coordinator.outbox`. The admin
channel calls the public methods (``fleet``, ``submit_job``, ``enrol`` ...).

Crash safety: a round is committed by (1) writing ``round-<r>.safetensors``
atomically (weights + strategy state), then (2) one SQLite transaction that
records the round and moves ``jobs.committed_round``; only then (3) are the
round checkpoints before it removed (fedge.coordinator.checkpoint: a job keeps
round 0, its last committed round and its final model), so the last committed
round's file is never removed before its successor is committed, and a crash
between (2) and (3) leaves files the next commit or the job's end removes. A
coordinator killed at any instant restarts at the last committed round: a
checkpoint written but not committed is simply overwritten, and a round in
flight is started again from scratch — new cohort, new secure-aggregation keys —
never resumed. Training and quantisation seeds depend only on (job seed, round,
site), so a restarted round with the same cohort yields the same sum and, on the
CPU, the same model bit for bit (not under DP, whose noise is fresh at each site
by design). The cohort may differ: the round starts once ``min_clients`` sites
are back, so with ``min_clients`` below the fleet the first sites to return train it —
unless an earlier attempt at the round already asked for its unmasking. Then
the sites have logged their reveal over that attempt's survivor set S and
refuse to reveal over another set (a second sum would give the difference), so
the survivor set is recorded in SQLite before the first unmask request leaves
(``Store.record_unmask_set``) and every later attempt at the round is pinned to
exactly S (:mod:`fedge.coordinator.rounds`): it waits, up to the plan's cohort
deadline, for every site of S, and fails naming the ones missing rather than
start with another set.

A failed attempt at a round is followed by the next no sooner than RETRY_BACKOFF_S,
doubled for each failed attempt of the round up to RETRY_BACKOFF_MAX_S, after it
opened, measured on ``clock`` (an attempt that waited out its cohort deadline is
followed at once, as before); ``jobs status`` shows the pause as the phase "retrying",
and its ``retry`` says when the next attempt opens and why the last failed. The count of
failed attempts is the database's (``jobs.failed_attempts``), so a coordinator
restarted during the pause keeps it, and takes the pause again in full. Each site
whose own refusal or loss is in a failed attempt is left out of the round's next
attempts until its next heartbeat that says it is eligible
(:mod:`fedge.coordinator.cohort`, "sidelined"). One exception to the count: an attempt
that failed because every site of its cohort refused to train it in the same words,
after the attempt before it at the round ended alike (same cohort, same words), fails
the job at once (:meth:`Coordinator._refused_twice`), in the transaction that records
the attempt: such a plan (a data set no site holds, a policy every site applies) is
refused again at every retry. A partial refusal, or reasons that differ between
attempts, keep the retries.

A job that ends failed or cancelled after committing at least one round keeps its
last committed global model as its result: ``final.safetensors`` is written from
that round's checkpoint (weights only, as for a completed job; the round's file
keeps the strategy state) and ``on_job_completed`` is called as for a completed job
(the process exports it and writes the report, which says which round it is and why
the job ended). The sites spent training time and privacy budget on it.

Two clocks (:class:`Coordinator`'s ``clock`` and ``wall``): everything that
measures time — stage and round deadlines, the heartbeat timeout behind "connected",
postponing them (:meth:`Coordinator.not_listening`, fed by the process loop's own
``time.monotonic`` readings), retry and throttle timers, phase durations — reads
``clock``, ``time.monotonic`` in production, which an NTP step or a VM's resumed
clock does not move. Only what is written down as a time of day reads ``wall``
(``time.time``): the SQLite timestamps (``started_at``, ``ended_at``, ``last_seen``,
``submitted_at``, the audit log's), job ids and HeartbeatAck's time. Nothing written
to disk is compared with a ``clock`` reading, so none from an earlier boot is either
(a round started again after a restart gets its deadlines anew; the audit throttles
measure their intervals on ``clock`` and read the "since" they write from ``wall``).

A write the database refuses because another process holds its lock (an
operator's sqlite3 shell) waits at most ``SERVICE_BUSY_TIMEOUT_S``
(fedge.coordinator.store). A message whose handling met it before taking any
effect is handed back whole (:class:`DatabaseLocked`; the process loop retries
it); one that had taken effect keeps it, and only its record is lost (logged).
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge import __version__
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.auditlimit import AuditThrottle
from fedge.coordinator.cohort import (
    LEDGER_RELEASED,
    Selection,
    ledger_rollback_notice,
    over_floor,
    privacy_floor,
    select_cohort,
)
from fedge.coordinator.plan import (
    Plan,
    PlanError,
    check_required_model_params,
    parse_plan,
    plan_labels,
    with_seed,
)
from fedge.coordinator.rounds import (
    SECAGG_PROTOCOL,
    AggregationFactory,
    Phase,
    Round,
    eval_count_outliers,
    peer_reason,
    plain_factory,
    printable,
)
from fedge.coordinator.store import (
    LEDGER_ROLLED_BACK,
    SERVICE_BUSY_TIMEOUT_S,
    CancelledAttempt,
    InterruptedAttempt,
    Store,
    StoreError,
    database_error,
    is_locked,
    ledger_rollback_reason,
)
from fedge.coordinator.strategies import Strategy
from fedge.update.files import write_atomic
from fedge.wire import codec
from fedge.wire import messages as m

log = logging.getLogger("fedge.coordinator")

# The roster the console installed last (set_roster), kept in the state directory.
ROSTER_FILE = "roster.json"

SYSTEM = "coordinator"
REPLAY_WINDOW = 4096  # message ids remembered per site
# the last sentence of a submission check's refusal at submit; at a queued job's start
# the job was submitted, and the coordinator says instead that it did not start it
NOTHING_SUBMITTED = "Nothing was submitted"
NOT_STARTED = "The job was not started"
FINISH_RETRY_S = 10.0  # a job whose final checkpoint could not be written is retried this often
LOCKED_RETRY_S = 1.0  # ... a round commit the database's lock refused, this often
# An attempt at a round that failed is followed by the next one no sooner than this
# after it opened, doubled with each failed attempt of the round (5, 10, 20, 40, 60,
# 60 ... s): a fault
# at one site (a state dir gone read-only, a full disk) would otherwise spend every
# attempt the plan allows within milliseconds, before anyone could react to it.
RETRY_BACKOFF_S = 5.0
RETRY_BACKOFF_MAX_S = 60.0
# what one heartbeat may put in the appliances table (a message may be 1 MiB, and the
# fleet view reads every row): a health report of a few GPUs is a few KiB
HEALTH_JSON_MAX = 64 << 10
HEARTBEAT_TEXT_MAX = 1000  # reason, current task: characters
# A site whose privacy ledger stays rolled back is told again this often (clock seconds)
LEDGER_NOTICE_S = 600.0
# the most released runs a heartbeat may report (exact in a float64, fits INTEGER)
LEDGER_COUNT_MAX = 1 << 53
STATUS_TEXT_MAX = 400  # Coordinator.status_text: characters of systemd's STATUS=
DATASETS_MAX = 256  # data set names kept per appliance, each cut to HEARTBEAT_TEXT_MAX
DEFAULT_MAX_BYTES = 64 << 20
# A key the transport refuses again and again, or an enrolled site whose messages
# are rejected again and again, must not turn into an fsync'd audit row each time
# (fedge.coordinator.auditlimit): per (key, reason) or (site, kind of rejection) the
# first is audited, then at most one row per REFUSAL_SUMMARY_S counting the rest,
# for the REFUSAL_KEYS most recent pairs.
REFUSAL_SUMMARY_S = 60.0
REFUSAL_KEYS = 1024
# A key that replaced its own connection this many times within the window is shown
# as contested in the fleet view (two machines holding one appliance's keys).
SUPERSEDED_WINDOW_S = 600.0
CONTESTED_TIMES = 3
# A contested site is taken out of the round in flight at once (as lost) and kept out
# of new cohorts until its key has not replaced its own connection for this long: the
# two machines answering for it fight many times a second, and one agent restarting
# reconnects once.
CONTEST_QUIET_S = 60.0
# ... but only when the contest is plain: its replacements came from two addresses
# (two machines), or this many came within the window from one (two machines behind
# one NAT fight many times a second). Three from one address can be one agent on a
# flaky link replacing its own socket: shown as contested, not taken out.
CONTEST_WITHDRAW_TIMES = 10
# A site's connection is logged at INFO when it changes (connected; lost by the
# transport; silent past the heartbeat timeout; revoked), at once for the first
# LINK_LOG_BURST changes in a window of LINK_LOG_WINDOW_S (clock seconds). A site whose
# link flaps faster has the rest counted and said in one line, with the state it is
# in, when the window ends: LINK_LOG_BURST lines a minute per site at most, whatever
# it does (a restart is two changes, a lost connection and its return two more).
LINK_LOG_WINDOW_S = 60.0
LINK_LOG_BURST = 4
# How often (clock seconds) tick looks for connected sites gone silent past the
# heartbeat timeout (a pass over every site it has logged as connected).
LINK_CHECK_S = 1.0
# A site's answers to a task that may arrive after the task's attempt ended (its round
# failed, was aborted, or moved on): logged at INFO and dropped, not rejected
# (Coordinator._late_answer). Masked inputs and evaluation results already are.
LATE_ANSWERS = (m.TaskRefused, m.TrainDone, m.PlainUpdate)
# Sites named, each with why, in the INFO line of who a cohort left out; the rest are
# counted (``jobs status`` and the report name them all).
LEFT_OUT_LOGGED = 10


def contest_withdraws(contest: dict[str, Any] | None) -> bool:
    """Whether a contest (`Coordinator.contested`) takes its site out of rounds."""
    return contest is not None and (len(contest["addresses"]) >= 2
                                    or contest["times"] >= CONTEST_WITHDRAW_TIMES)


class CoordinatorError(Exception):
    """An admin request that cannot be carried out (unknown job, bad plan, ...)."""


class DatabaseLocked(Exception):
    """A message from ``site`` could not be handled because another process holds the
    database's lock, before it took any effect: its message id is forgotten, so the
    same frames may be handled again later (fedge.coordinator.process does)."""

    def __init__(self, site: str, kind: str, error: Exception) -> None:
        super().__init__(f"{kind} from {site}: {error}")
        self.site = site
        self.kind = kind
        self.error = error


InitialWeights = Callable[[Plan], np.ndarray]


def torch_initial_weights(plan: Plan) -> np.ndarray:
    """The job's starting model, built by ``fedge.train`` from the job's seed (or from
    ``model.params.seed`` where the plan sets one): two jobs differing only in
    ``job.seed`` start from different weights.

    Raises:
        PlanError: the model name or parameters are not known to fedge.train.
    """
    from fedge.train.api import ModelSpec, build_model, flatten

    try:
        model = build_model(ModelSpec(plan.model_name,
                                      {"seed": plan.seed, **plan.model_params}))
    except (KeyError, ValueError, TypeError) as exc:
        raise PlanError("model", plan.model_name, f"cannot be built: {exc}") from exc
    return np.ascontiguousarray(flatten(model), dtype=np.float32)


@dataclass
class Outgoing:
    site: str
    body: Any
    job: str = ""
    round: int = 0
    close_after: bool = False  # drop the site's connection once this has had time to go


@dataclass
class _Conn:
    last_seen: float
    seen_ids: collections.deque[str] = field(default_factory=collections.deque)
    seen_set: set[str] = field(default_factory=set)
    last_heartbeat: tuple[Any, ...] = ()
    # from its heartbeats (fedge.coordinator.rounds); None until this process has had
    # one: after a restart an agent's first message may be another (a late answer),
    # and the site is then "connected, waiting for its first heartbeat" (cohort.py)
    secagg_protocol: int | None = None
    # the data sets its last heartbeat declared (None: no heartbeat since this process
    # started); what submit_job checks a plan's job.dataset against
    datasets: tuple[str, ...] | None = None
    # the class lists by data set that came just before its last heartbeat (None: none
    # did: its data sets declare none, or an agent before DatasetClasses); cohort.py
    # keeps class orders from mixing with them. ``classes_next``: a DatasetClasses
    # waiting for the heartbeat it precedes.
    classes: dict[str, tuple[str, ...]] | None = None
    classes_next: dict[str, tuple[str, ...]] | None = None
    # what the same DatasetClasses said of each data set's task, input shape and
    # standardisation (empty: nothing, or no DatasetClasses); submission_warnings checks
    # plans against them. ``inputs_next``: them, waiting for the heartbeat they precede.
    tasks: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    standardise: dict[str, str] = field(default_factory=dict)
    inputs_next: tuple[dict[str, str], dict[str, tuple[int, ...]], dict[str, str]] | None = None
    # when (clock) the site was last told its privacy ledger was rolled back; -inf:
    # not on this connection (Coordinator._ledger_count)
    ledger_told_at: float = float("-inf")

    def seen(self, msg_id: str) -> bool:
        if msg_id in self.seen_set:
            return True
        self.seen_ids.append(msg_id)
        self.seen_set.add(msg_id)
        if len(self.seen_ids) > REPLAY_WINDOW:
            self.seen_set.discard(self.seen_ids.popleft())
        return False

    def forget(self, msg_id: str) -> None:
        """Un-see a message handed back unhandled (DatabaseLocked), so it may come again."""
        if msg_id in self.seen_set:
            self.seen_set.discard(msg_id)
            self.seen_ids.remove(msg_id)


@dataclass
class _Link:
    """What the journal was told of one site's connection (LINK_LOG_WINDOW_S)."""
    up: bool  # connected, as last noted
    why: str  # the last change, as a line says it ("connected from 10.0.0.7")
    window_at: float = float("-inf")  # when (clock) the window of its lines opened
    said: int = 0  # lines in that window
    unsaid: int = 0  # changes in it not logged one by one


class JobRunner:
    """Runs one job round after round from its last committed checkpoint."""

    def __init__(self, coord: Coordinator, job_id: str, plan: Plan, weights: np.ndarray,
                 strategy: Strategy, committed: int) -> None:
        self.coord = coord
        self.job_id = job_id
        self.plan = plan
        self.weights = weights
        self.strategy = strategy
        self.committed = committed
        self.round: Round | None = None
        # The last committed round's checkpoint, which becomes final.safetensors once
        # every planned round is committed (None before round 1 commits).
        self.last_checkpoint: ck.Checkpoint | None = None
        # When finishing the job (final checkpoint, status) last failed; it is retried
        # every FINISH_RETRY_S, never followed by a round past plan.rounds.
        self.finish_failed_at = float("-inf")
        self.finish_error = ""
        # When committing the finished round (its checkpoint, its SQLite row) last
        # failed (disk full): the round is kept, not trained again, and the commit is
        # retried every FINISH_RETRY_S (LOCKED_RETRY_S when the database was locked).
        self.commit_failed_at = float("-inf")
        self.commit_retry_s = FINISH_RETRY_S
        self.commit_error = ""
        # The fleet as the last cohort offer saw it (job_status explains a wait with it).
        self.selection: Selection | None = None
        # After a failed attempt: the next one opens at ``retry_at`` (``clock``), which
        # was ``retry_s`` away when it failed; ``retry_after`` is the failed attempt's
        # reason, ``retry_attempt`` its number (job_status shows them).
        self.retry_at = float("-inf")
        self.retry_s = 0.0
        self.retry_after = ""
        self.retry_attempt = 0
        # Sites left out of the round's next attempts because an attempt failed with their
        # own refusal or loss in it (site -> why, as the cohort shows it), each until a
        # heartbeat of its own says it is eligible again (module docstring of
        # fedge.coordinator.cohort): one broken site must not spend every attempt.
        self.sidelined: dict[str, str] = {}
        # Sites left out of every later round of this job, whatever their heartbeats
        # say (site -> why): both ends of a tampered-share accusation (Round's
        # "share_accusation" finding), rebuilt from the audit log when the job resumes.
        self.excluded: dict[str, str] = {}
        # Sites already audited as "example_count_outlier" in this job: an honest large
        # site is one every round, and once (per coordinator run) says it.
        self.count_outliers: set[str] = set()

    def retry_later(self, attempts: int, reason: str, now: float,
                    opened_at: float | None = None) -> None:
        """The round's attempt number ``attempts``, opened at ``opened_at`` (None: now),
        failed at ``now`` with ``reason``: the next opens retry_backoff_s(attempts) after
        it opened, so an attempt that already lasted as long (a cohort deadline) is
        followed at once, as before there was a pause, and one that failed within
        milliseconds waits."""
        start = now if opened_at is None else min(opened_at, now)
        self.retry_attempt = attempts
        self.retry_at = start + retry_backoff_s(attempts)
        self.retry_s = max(0.0, self.retry_at - now)
        self.retry_after = reason

    @property
    def finished(self) -> bool:
        return self.committed >= self.plan.rounds

    def new_round(self, now: float) -> Round:
        """The next round, opened at ``now`` (the coordinator's ``clock``: its deadlines
        count from it); its recorded ``started_at`` is the wall clock's time."""
        state = {k: v.copy() for k, v in self.strategy.state.items()}
        number = self.committed + 1
        self.round = Round(
            job_id=self.job_id, round=number, plan=self.plan, weights=self.weights,
            strategy=Strategy(self.plan.strategy, state), started_at=self.coord.wall(),
            opened_at=now,
            aggregation_factory=self.coord.aggregation_factory(self.plan),
            pinned_cohort=self.coord.store.unmask_set(self.job_id, number),
        )
        if self.round.pinned_cohort is not None:
            log.warning("job %s round %d: an earlier attempt asked for its unmasking over "
                        "%s; this one waits for exactly those sites", self.job_id, number,
                        self.round.pinned_cohort)
        try:
            self.coord.store.audit(SYSTEM, "round_started",
                                   {"job": self.job_id, "round": self.round.round})
        except (StoreError, sqlite3.Error) as exc:  # a full disk: the round runs unrecorded
            self.coord._not_written(f"round_started of job {self.job_id}", exc)
        return self.round


def retry_backoff_s(failed_attempts: int) -> float:
    """The pause before the next attempt at a round after ``failed_attempts`` failed:
    RETRY_BACKOFF_S doubled for each failed attempt after the first, at most
    RETRY_BACKOFF_MAX_S."""
    doublings = min(max(failed_attempts, 1) - 1, 16)
    return min(RETRY_BACKOFF_S * 2.0 ** doublings, RETRY_BACKOFF_MAX_S)


def coordinator_clocks(clock: Callable[[], float] | None,
                       wall: Callable[[], float] | None
                       ) -> tuple[Callable[[], float], Callable[[], float]]:
    """(the clock deadlines are measured on, the clock records are dated by): by
    default time.monotonic and time.time; a ``clock`` given alone serves as both (a
    test's one fake clock)."""
    if clock is None:
        return time.monotonic, wall or time.time
    return clock, wall or clock


class Coordinator:
    """The coordinator: registry, job queue, round driver (see module docstring).

    ``aggregation`` picks the aggregation protocol for a plan (default: SecAgg+
    when the plan enables it, else plain sums); ``initial_weights`` builds a
    job's starting model.

    ``clock`` measures time (deadlines, the heartbeat timeout, retry and throttle
    timers): it must never step, ``time.monotonic`` by default. ``wall`` dates what is
    written down (SQLite, the audit log, job ids): ``time.time`` by default, or
    ``clock`` itself when only ``clock`` is given (a test's one fake clock then stands
    for both; a test of a stepping wall clock passes both). Module docstring.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        roster: bytes = b"",
        roster_public_key: bytes = b"",
        heartbeat_timeout_s: float = 10.0,
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        initial_weights: InitialWeights = torch_initial_weights,
        aggregation: Callable[[Plan], AggregationFactory] | None = None,
        update_handler: Callable[[Any], Any] | None = None,
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        busy_timeout_s: float = SERVICE_BUSY_TIMEOUT_S,
    ) -> None:
        clock, wall = coordinator_clocks(clock, wall)
        self.state_dir = Path(state_dir)
        self.store = Store(self.state_dir, clock=wall, busy_timeout_s=busy_timeout_s,
                           monotonic=clock)
        self.clock: Callable[[], float] = clock
        self.wall: Callable[[], float] = wall
        self.heartbeat_timeout_s = heartbeat_timeout_s
        # the config file heartbeat_timeout_s came from, named where a site is counted
        # disconnected for it (fedge.coordinator.process.serve sets it); None: unnamed
        self.config_path: Path | None = None
        self.max_message_bytes = max_message_bytes
        self.initial_weights = initial_weights
        self._aggregation = aggregation
        self.update_handler = update_handler
        self.roster_public_key = roster_public_key
        self.roster = self._roster_at_start(roster)
        self.outbox: list[Outgoing] = []
        self.conns: dict[str, _Conn] = {}
        self.runner: JobRunner | None = None
        # The audit throttles measure their intervals on ``clock`` (the ``now`` they are
        # given) and read the "since" of their summary rows from ``wall``.
        self._refusals = AuditThrottle(self.store.audit, verb="refused",
                                       every_s=REFUSAL_SUMMARY_S, max_keys=REFUSAL_KEYS,
                                       wall=wall)
        self._rejections = AuditThrottle(self.store.audit, verb="rejected",
                                         every_s=REFUSAL_SUMMARY_S, max_keys=REFUSAL_KEYS,
                                         wall=wall)
        self._write_failed_at = float("-inf")  # when a record last failed (_not_written)
        # whether the message being handled has taken effect (handle_frames): a locked
        # database met before it did hands the message back, after it loses a record
        self._took_effect = False
        # site -> (times, addresses) of connections its key superseded lately: one
        # appliance's keys on two machines (a copied enrolment) fight this way
        self._superseded: dict[str, tuple[collections.deque[float], set[str]]] = {}
        # (job, error, when) of the last start of a job that failed on its checkpoint
        self._resume_failure: tuple[str, str, float] | None = None
        # (job, why) of the next job whose starting model the disk could not take: it
        # waits, queued (fedge.coordinator.process sets and clears it); jobs_list and
        # jobs_status show why as ``start_wait``
        self.start_wait: tuple[str, str] | None = None
        # the round whose unmasking's survivor set the database refused to record, and
        # why: its unmask requests wait, and a failure meanwhile is recorded led by that
        # (_record_unmask, _end_round)
        self._unmask_unrecorded: tuple[Round, str] | None = None
        # site -> what the journal was told of its connection (:meth:`_link_changed`),
        # for each site that connected since this process started
        self._links: dict[str, _Link] = {}
        self._links_checked_at = float("-inf")  # (clock) the last look for silent sites
        # Called with the new allow-list whenever enrolment changes (transport hook).
        self.on_allow_list: Callable[[set[str]], None] = lambda keys: None
        # Called with a site whose connection must be dropped at once (revocation).
        self.on_disconnect: Callable[[str], None] = lambda site: None
        # Receives agents' update-install outcomes (the admin channel's roll-outs).
        self.on_update_outcome: Callable[[str, Any], None] | None = None
        # Called with a site whose message arrives while it counted as not connected
        # (first contact since this process started, or after a lost connection):
        # the admin channel asks it again for an update outcome it may have lost.
        self.on_site_returned: Callable[[str], None] = lambda site: None
        # Called whenever a round's attempt ends (committed, failed, cancelled): the
        # admin channel sends the roll-out asks it held back for the round's sites.
        self.on_round_ended: Callable[[], None] = lambda: None
        # site -> why it is left out of new cohorts while it installs a software update
        # that restarts its agent (kept by the admin channel's roll-outs)
        self.updating: dict[str, str] = {}
        # Called with a job id once its final checkpoint is written: a completed job's,
        # or a failed or cancelled job's last committed model (module docstring). The
        # process exports it to ONNX in a child process, then writes the report.
        self.on_job_completed: Callable[[str], None] = lambda job_id: None

    def _roster_at_start(self, given: bytes) -> bytes:
        """The roster to hold at start: of ``given`` (the configured roster) and the one
        the last :meth:`set_roster` saved (state_dir/roster.json), the newer by serial
        (the saved one on a tie) among those that verify under the roster key. One
        that does not verify (a copy torn by a crash under a release that wrote it in
        place, a damaged disk) is passed over with an error naming it: held, it would
        be sent to every agent, which refuse it, and every later roster install would
        fail on it. Without a roster key nothing can be checked, and the saved roster
        is held as it is, as before."""
        saved_path = self.state_dir / ROSTER_FILE
        try:
            saved = saved_path.read_bytes()
        except FileNotFoundError:
            saved = None
        except OSError as exc:
            log.error("saved roster %s cannot be read (%s): passed over", saved_path, exc)
            saved = None
        if not self.roster_public_key:
            return saved if saved else given
        from fedge.secagg.keys import Roster, RosterSignatureError

        best: tuple[int, bytes] | None = None
        for where, data in (("the configured roster", given), (str(saved_path), saved)):
            if data is None or (not data and where != str(saved_path)):
                continue  # no file / no roster configured
            try:
                serial = Roster.from_bytes(data, self.roster_public_key).serial
            except RosterSignatureError as exc:
                log.error("%s is not a valid console-signed roster (%s, %d bytes): passed "
                          "over; the roster in force is the other one, if valid, until "
                          "the console installs a new one", where, exc, len(data))
                continue
            if best is None or serial >= best[0]:
                best = (serial, bytes(data))
        return best[1] if best is not None else b""

    # -- admin API ------------------------------------------------------------------

    def fleet(self) -> list[dict[str, Any]]:
        """Every appliance with its registry record and whether it is connected now."""
        now = self.clock()
        out = []
        for a in self.store.appliances():
            d = a.to_dict()
            d["connected"] = self._connected(a.site_id, now)
            contested = self.contested(a.site_id, now)
            if contested is not None:
                d["contested"] = contested
            out.append(d)
        return out

    def status_text(self, activity: str = "") -> str:
        """One line saying what this coordinator does now, for systemd's STATUS=
        (fedge.coordinator.process sends it each time it changes): the job, round and
        stage in progress and what the stage waits for, or "idle" (``activity``, when
        given, in their place: what the process does outside this class); then how
        many sites are connected and jobs queued. Cut to STATUS_TEXT_MAX characters.

        Raises: sqlite3.Error: the jobs cannot be counted."""
        connected, queued = len(self.connected_sites()), self.store.job_count("queued")
        text = (f"{activity or self._activity()}; {connected} site"
                f"{'' if connected == 1 else 's'} connected, {queued} job"
                f"{'' if queued == 1 else 's'} queued")
        return text if len(text) <= STATUS_TEXT_MAX else text[:STATUS_TEXT_MAX - 3] + "..."

    def _activity(self) -> str:
        runner = self.runner
        if runner is None:
            return "idle"
        job = f"job {runner.job_id}"
        if runner.finished:
            return (f"{job}: all {runner.plan.rounds} rounds committed, keeping its "
                    "final model" + (f" (failed: {runner.finish_error})"
                                     if runner.finish_error else ""))
        rnd = runner.round
        if rnd is None:
            return (f"{job} round {runner.committed + 1}/{runner.plan.rounds}: attempt "
                    f"{runner.retry_attempt} failed ({runner.retry_after}), waiting to "
                    "retry")
        where = f"{job} round {rnd.round}/{runner.plan.rounds}"
        if rnd.phase is Phase.WAITING_COHORT:
            return f"{where} waiting for a cohort" + (
                f": {rnd.waiting_for}" if rnd.waiting_for else "")
        if rnd.phase is Phase.TRAINING:
            return (f"{where} training: {len(rnd.trained)} of {len(rnd.cohort)} updates "
                    "in")
        if rnd.phase is Phase.EVALUATING:
            return (f"{where} evaluating: {len(rnd.evals)} of {len(rnd.survivors)} "
                    "results in")
        if rnd.finished and runner.commit_error:
            return f"{where} not committed yet: {runner.commit_error}"
        return f"{where} {rnd.phase.value}"

    def superseded(self, site: str, old_address: str, new_address: str) -> None:
        """The transport shut ``site``'s connection from ``old_address`` because its key
        connected again from ``new_address``. Now and then an agent replacing its
        socket; again and again, or from two addresses, two machines holding the
        appliance's keys. Audited once per address pair, then summarised (throttled),
        and shown in the fleet view while it goes on."""
        now = self.clock()
        times, addresses = self._superseded.setdefault(site, (collections.deque(), set()))
        while times and now - times[0] > SUPERSEDED_WINDOW_S:
            times.popleft()
        if not times:
            addresses.clear()
        times.append(now)
        addresses.update((old_address, new_address))
        pair = tuple(sorted((old_address, new_address)))
        try:
            if self._refusals.event((site, "superseded", pair), site, "connection_superseded",
                                    {"site": site, "closed": old_address, "by": new_address},
                                    now):
                log.warning("site %s connected again from %s, closing its connection from "
                            "%s", site, new_address, old_address)
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"connection_superseded of {site}", exc)
        contest = self.contested(site, now)
        rnd = self.runner.round if self.runner is not None else None
        if not contest_withdraws(contest) or rnd is None or site not in rnd.cohort \
                or rnd.finished or site in rnd.withdrawn:
            return
        reason = contest_reason(contest)
        log.warning("job %s round %d: %s is dropped from the round as lost: %s", rnd.job_id,
                    rnd.round, site, reason)
        try:
            self.store.audit(SYSTEM, "contested_site_dropped",
                             {"job": rnd.job_id, "round": rnd.round, "site": site,
                              "reason": reason})
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"contested_site_dropped of {site}", exc)
        self._emit(rnd, rnd.withdraw(site, reason, now))
        try:
            self._after(now)
        except (StoreError, sqlite3.OperationalError) as exc:  # the next tick records it
            self._not_written(f"the end of job {rnd.job_id} round {rnd.round}", exc)

    def round_holding(self, site: str) -> str | None:
        """"round N of job J" while ``site`` is in the cohort of a round in flight (one
        that formed its cohort and has not ended), else None: a site that restarts now
        (a software update) loses that round its work and may fail the attempt."""
        rnd = self.runner.round if self.runner is not None else None
        if rnd is None or rnd.finished or rnd.phase is Phase.WAITING_COHORT \
                or site not in rnd.cohort or site in rnd.withdrawn:
            return None
        return f"round {rnd.round} of job {rnd.job_id}"

    def contested_out(self, now: float) -> dict[str, str]:
        """Each site kept out of new cohorts because its connection is contested and its
        key replaced its own connection within the last CONTEST_QUIET_S, and why."""
        out = {}
        for site, (times, _) in self._superseded.items():
            contest = self.contested(site, now)
            if contest_withdraws(contest) and times and now - times[-1] < CONTEST_QUIET_S:
                out[site] = (f"{contest_reason(contest)}; left out of new rounds until it "
                             f"stops for {CONTEST_QUIET_S:g} s")
        return out

    def contested(self, site: str, now: float) -> dict[str, Any] | None:
        """``{"times", "addresses"}`` when ``site``'s key replaced its own connection at
        least CONTESTED_TIMES times in the last SUPERSEDED_WINDOW_S, else None."""
        entry = self._superseded.get(site)
        if entry is None:
            return None
        times, addresses = entry
        recent = [t for t in times if now - t <= SUPERSEDED_WINDOW_S]
        if len(recent) < CONTESTED_TIMES:
            return None
        return {"times": len(recent), "addresses": sorted(addresses)}

    def submit_job(self, plan_text: str, actor: str = "console",
                   warnings: list[str] | None = None) -> str:
        """Queue a job; returns its id. What the operator should know about a job that
        is queued all the same (:meth:`submission_warnings`) is appended to
        ``warnings``.

        Raises:
            PlanError: the plan is invalid (names the field), or, where this coordinator
                builds the starting model from the plan (``torch_initial_weights``), its
                model leaves out a parameter that has no default
                (plan.check_required_model_params); nothing is stored.
            CoordinatorError: no site declares the plan's data set (a typo), named with
                the data sets the sites do declare; or every site holding it that
                declared its task and input shape would refuse the model, or
                client_dp.cohort_size is above the sites that could hold it
                (:meth:`submission_warnings`); nothing is stored.
        """
        plan_text = with_seed(plan_text)  # parsed; a seed written in if none is named
        plan = parse_plan(plan_text)
        if self.initial_weights is torch_initial_weights:
            # this coordinator builds the starting model from the plan: a parameter the
            # model has no default for is refused now, not when the job starts (one
            # given its starting weights never builds the model, and may leave it out)
            check_required_model_params(plan)
        found = self.submission_warnings(plan)
        job_id = f"job-{time.strftime('%Y%m%d%H%M%S', time.gmtime(self.wall()))}-" \
                 f"{secrets.token_hex(3)}"
        self.store.create_job(job_id, plan_text, actor=actor)
        log.info("job %s queued by %s: data set %r, %d round(s)%s", job_id,
                 printable(actor), plan.dataset, plan.rounds,
                 f" ({len(found)} warning(s) given)" if found else "")
        if warnings is not None:
            warnings.extend(found)
        return job_id

    def submission_warnings(self, plan: Plan) -> list[str]:
        """What submitting ``plan`` now deserves to be told (:func:`submission_warnings`),
        from what the enrolled sites declared in their heartbeats to this process (a
        coordinator just started, not heard from any yet, knows nothing and says
        nothing).

        Raises:
            CoordinatorError: as :func:`submission_warnings`.
        """
        heard = {s: c for s, c in self.conns.items() if c.datasets is not None}
        return submission_warnings(
            self.store, plan, {s: c.datasets for s, c in heard.items()},
            {s: DeclaredInputs(c.tasks, c.input_shapes, c.standardise)
             for s, c in heard.items()})

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job's record, with its plan's ``name``, ``dataset`` and ``model``
        (plan.plan_labels: "" where the plan has none), and, for the job whose starting
        model waits for the disk, why (``start_wait``)."""
        out = []
        for j in self.store.jobs():
            d = {**j.to_dict(), **plan_labels(j.plan_toml)}
            if (why := self._start_wait(j.job_id, j.status)):
                d["start_wait"] = why
            out.append(d)
        return out

    def _start_wait(self, job_id: str, status: str) -> str:
        """Why ``job_id``'s starting model waits for the disk ("" when it does not)."""
        wait = self.start_wait
        if wait is None or wait[0] != job_id or status not in ("queued", "running"):
            return ""
        return wait[1]

    def job_status(self, job_id: str) -> dict[str, Any]:
        """Raises: CoordinatorError: unknown job."""
        try:
            job = self.store.job(job_id)
        except StoreError as exc:
            raise CoordinatorError(str(exc)) from exc
        d = job.to_dict()
        d["rounds"] = [r.__dict__ for r in self.store.rounds(job_id)]
        d["metrics"] = self.store.metrics(job_id)
        plan = parse_plan(job.plan_toml)
        d.update(name=plan.name, dataset=plan.dataset, model=plan.model_name)
        d["rounds_planned"] = plan.rounds
        d["eval_split"] = plan.eval_split
        d["final_test"] = self._final_test(job_id, d["metrics"], job.committed_round,
                                           plan.rounds)
        if self.runner is not None and self.runner.job_id == job_id and self.runner.round:
            d["current_round"] = self.runner.round.round
            d["phase"] = self.runner.round.phase.value
            d.update(self._round_progress(self.runner.round))
            sel = self.runner.selection
            if self.runner.round.phase is Phase.WAITING_COHORT and sel is not None:
                first = sel.excluded_first()
                d["cohort_wait"] = {
                    "candidates": len(sel.candidates), "enrolled": sel.enrolled,
                    "min_clients": self.runner.plan.min_clients, "excluded": first,
                    "more_excluded": len(sel.excluded) - len(first),
                    "summary": self.runner.round.waiting_for}
        runner = self.runner
        if runner is not None and runner.job_id == job_id and runner.round is None \
                and not runner.finished and runner.retry_at > self.clock() \
                and runner.retry_attempt:
            # between two attempts at a round (RETRY_BACKOFF_S): the phase is the word
            # "retrying"; ``retry`` says when the next one opens (``retry_at``, epoch
            # seconds; ``in_s`` from now) and why the last failed
            d["current_round"] = runner.committed + 1
            d["phase"] = "retrying"
            in_s = runner.retry_at - self.clock()
            d["retry"] = {"attempt": runner.retry_attempt,
                          "max_failed_attempts": runner.plan.max_failed_attempts,
                          "backoff_s": runner.retry_s,
                          "in_s": round(in_s, 1),
                          "retry_at": round(self.wall() + in_s, 3),
                          "after": runner.retry_after,
                          "summary": f"next attempt in {in_s:.0f} s after: "
                                     f"{peer_reason(runner.retry_after)}"}
        if runner is not None and runner.job_id == job_id and runner.sidelined:
            d["sidelined"] = dict(sorted(runner.sidelined.items()))
        if runner is not None and runner.job_id == job_id:
            # sites whose keys two machines share: dropped from the round in flight, or
            # kept out of new ones, each with why
            contested = self.contested_out(self.clock())
            if runner.round is not None:
                contested.update({s: f"dropped from round {runner.round.round}: {why}"
                                  for s, why in runner.round.withdrawn.items()})
            if contested:
                d["contested"] = dict(sorted(contested.items()))
        if self.runner is not None and self.runner.job_id == job_id \
                and self.runner.commit_error:
            d["commit_error"] = self.runner.commit_error  # the round is done, not committed
        if self.runner is not None and self.runner.job_id == job_id and self.runner.finished:
            d["phase"] = "finishing"  # all rounds committed; final checkpoint not yet written
            if self.runner.finish_error:
                d["finish_error"] = self.runner.finish_error
        if self._resume_failure is not None and self._resume_failure[0] == job_id:
            d["resume_error"] = self._resume_failure[1]  # retried every FINISH_RETRY_S
        if (why := self._start_wait(job_id, job.status)):
            d["start_wait"] = why  # its starting model waits for the disk (retried)
        final = ck.final_path(self.state_dir, job_id)
        d["final_checkpoint"] = str(final) if final.exists() else ""
        d["results"] = ck.results(self.state_dir, job_id)
        return d

    def _round_progress(self, rnd: Round) -> dict[str, Any]:
        """The round in flight as ``jobs status`` shows it (:meth:`Round.progress`):
        ``cohort``, ``reported`` (answered the phase), ``waiting_for`` (still awaited),
        ``dropped_out`` (cohort sites that will send nothing more: why), ``stage`` (the
        secure aggregation's, while aggregating), ``round_started_at`` and
        ``phase_deadline_at`` (epoch seconds, the wall clock's; None: no deadline
        known). The deadline is measured on ``clock`` and shown as the time of day it
        falls at now."""
        p = rnd.progress()
        deadline = None if p.deadline is None else \
            round(self.wall() + (p.deadline - self.clock()), 3)
        return {"cohort": p.cohort, "reported": p.reported, "waiting_for": p.waiting_for,
                "dropped_out": p.dropped, "stage": p.stage, "round_started_at": rnd.started_at,
                "phase_deadline_at": deadline}

    def _final_test(self, job_id: str, metrics: list[dict[str, Any]], committed: int,
                    planned: int) -> dict[str, Any] | None:
        """The final model's evaluation on the sites' test split (fedge.coordinator.
        rounds, module doc), once the last round is committed: ``{round, metrics:
        {name: {aggregate, sites, n_examples}}, missing: {site: why}}``; else None."""
        from fedge.coordinator.report import by_site
        from fedge.coordinator.rounds import FINAL_TEST_SPLIT

        if committed < planned or committed == 0:
            return None
        rows = [r for r in metrics if r["round"] == committed
                and r["split"] == FINAL_TEST_SPLIT]
        missing: dict[str, str] = {}
        for entry in reversed(self.store.audit_log(action="final_test", job=job_id, limit=50)):
            detail = _json(entry["detail"])
            if detail.get("round") == committed:
                missing = {str(k): str(v) for k, v in dict(detail.get("missing", {})).items()}
                break
        if not rows and not missing:
            return None
        return {"round": committed, "split": FINAL_TEST_SPLIT, "metrics": by_site(rows),
                "missing": missing}

    def job_outcome(self, job_id: str, status: str, error: str = "") -> ck.JobOutcome:
        """How job ``job_id`` ended, for its ``final.safetensors``: ``status``,
        ``error`` and the ε its records give (fedge.coordinator.checkpoint.JobOutcome).

        Raises: StoreError, sqlite3.Error: its records cannot be read."""
        attempts = [r.__dict__ for r in self.store.rounds(job_id)]
        return ck.JobOutcome(status, error, ck.recorded_epsilon(
            self.store.job(job_id).plan_toml, self.store.metrics(job_id), attempts))

    def keep_last_model(self, job_id: str, committed: int,
                        checkpoint: ck.Checkpoint | None = None, *,
                        status: str = "", error: str = "") -> str:
        """Write a failed or cancelled job's last committed model as its
        ``final.safetensors`` (module docstring), saying how it ended (``status`` and
        ``error``; by default the job's in SQLite); returns its digest, or "" when there
        is none (no round committed) or it cannot be written (logged and audited: the
        job ends all the same, and ``jobs fetch`` says it has no results yet; a
        restarted coordinator writes it then, fedge.coordinator.process)."""
        if committed < 1:
            return ""
        try:
            if not status:
                job = self.store.job(job_id)
                status, error = job.status, job.error
            outcome = self.job_outcome(job_id, status, error)
            if checkpoint is None:
                checkpoint = ck.load_checkpoint(ck.round_path(self.state_dir, job_id,
                                                              committed))
            return ck.save_final(self.state_dir, job_id, checkpoint, outcome)
        except (OSError, ck.CheckpointError, StoreError, sqlite3.Error) as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("job %s: its last committed model (round %d) cannot be kept as its "
                      "result: %s", job_id, committed, error)
            try:
                self.store.audit(SYSTEM, "job_results_failed",
                                 {"job": job_id, "round": committed, "error": error[:500]})
            except (StoreError, sqlite3.Error) as audit_exc:
                self._not_written(f"job_results_failed of job {job_id}", audit_exc)
            return ""

    def cancel_job(self, job_id: str, actor: str = "console") -> None:
        """Cancel a queued or running job. One that committed a round keeps its last
        committed model as its result (module docstring). Who cancelled it and when
        (the wall clock, UTC) is the job's ``error``: "cancelled by operator:alice at
        2026-11-30T05:53:19Z", what its owner sees in ``jobs watch``, ``jobs status``
        and report.md; its round's sites are told the same. A round attempt whose
        cohort had been asked to train is recorded as "cancelled" (its cohort, which
        sites had trained): its sites may have released an update, and spent privacy
        budget, in it.

        Raises: CoordinatorError: unknown job or already finished."""
        try:
            job = self.store.job(job_id)
        except StoreError as exc:
            raise CoordinatorError(str(exc)) from exc
        if job.status not in ("queued", "running"):
            raise CoordinatorError(f"job {job_id!r} is {job.status}; only queued or running "
                                   "jobs can be cancelled")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall()))
        reason = f"cancelled by {actor} at {when}"
        last = None
        cut_short = None
        if self.runner is not None and self.runner.job_id == job_id:
            rnd = self.runner.round
            ended = rnd is not None
            if rnd is not None:
                cut_short = _cancelled_attempt(rnd, reason)
                self._emit(rnd, rnd.abort(f"job {reason}"))
            last = self.runner.last_checkpoint
            self.runner = None
            if ended:
                self.on_round_ended()
        digest = self.keep_last_model(job_id, job.committed_round, last,
                                      status="cancelled", error=reason)
        try:
            self.store.set_job_status(job_id, "cancelled", actor=actor, error=reason,
                                      final_digest=digest, cancelled_attempt=cut_short)
        except BaseException:  # still running: no result may stand beside it
            if digest:
                ck.final_path(self.state_dir, job_id).unlink(missing_ok=True)
            raise
        log.info("job %s %s (%s)", job_id, printable(reason),
                 f"its round {job.committed_round} model is kept as its result" if digest
                 else "no model kept: no round committed" if job.committed_round < 1
                 else "its last committed model could not be kept")
        self.forget_rounds(job_id)
        if digest:
            self.on_job_completed(job_id)

    def enrol(self, site: str, curve_public_z85: str, ed25519_public: bytes,
              actor: str = "console") -> None:
        """Raises: StoreError: invalid site or keys (named)."""
        self.store.enrol(site, curve_public_z85, ed25519_public, actor=actor)
        self.on_allow_list(self.store.allowed_keys())

    def revoke(self, site: str, actor: str = "console") -> None:
        """Revoke and drop the site's connection at once.

        Raises:
            StoreError: unknown site.
        """
        self.store.revoke(site, actor=actor)
        self.on_allow_list(self.store.allowed_keys())
        self.conns.pop(site, None)
        self._link_changed(site, False, f"disconnected: revoked by {printable(actor)}",
                           self.clock())
        self.on_disconnect(site)
        if self.runner is not None and self.runner.round is not None:
            self._emit(self.runner.round, self.runner.round.lost(
                site, self.clock(), reason=f"revoked by {actor}"))

    def ledger_ack(self, site: str, actor: str = "console") -> dict[str, Any]:
        """Accept the lower released-run count of ``site``, whose privacy ledger was
        rolled back (fedge.coordinator.cohort): it is a candidate again, and the
        audit log says who accepted it. Returns {"site", "was", "now"}.

        Raises:
            StoreError: unknown site, or its ledger is not flagged as rolled back.
        """
        was, now = self.store.ledger_ack(site, actor=actor)
        log.info("%s accepted %s's privacy ledger at %d released runs (it had reported "
                    "%d): a candidate again", actor, site, now, was)
        return {"site": site, "was": was, "now": now}

    def set_roster(self, roster_bytes: bytes, actor: str = "console") -> None:
        """Install a new console-signed roster (checked against the roster key if known).

        Raises:
            ValueError: the roster's signature does not verify.
        """
        if self.roster_public_key:
            from fedge.secagg.keys import Roster

            new = Roster.from_bytes(roster_bytes, self.roster_public_key)
            if self.roster:
                held = Roster.from_bytes(self.roster, self.roster_public_key).serial
                if new.serial < held:
                    raise ValueError(f"roster serial {new.serial} is older than the one in "
                                     f"force ({held}); refused")
        # atomic: a copy torn by a crash would be what the next start reads back
        write_atomic(self.state_dir / ROSTER_FILE, bytes(roster_bytes))
        self.roster = bytes(roster_bytes)
        self.store.audit(actor, "set_roster", {"bytes": len(roster_bytes)})
        for site in sorted(self.connected_sites()):  # appliances follow at once
            self.outbox.append(Outgoing(site, m.RosterUpdate(self.roster)))

    # -- transport hooks ------------------------------------------------------------

    def refused(self, curve_public_z85: str, reason: str) -> None:
        """The transport refused a connection (unknown or revoked key).

        Audited once per (key, reason), then summarised: at most one row per
        REFUSAL_SUMMARY_S saying how many more times it was refused
        (fedge.coordinator.auditlimit).
        """
        try:
            self._refusals.event((curve_public_z85, reason), "transport", "connection_refused",
                                 {"curve_public": curve_public_z85, "reason": reason},
                                 self.clock())
        except (StoreError, sqlite3.Error) as exc:  # a full disk must not stop the transport
            self._not_written(f"connection_refused of {curve_public_z85}", exc)

    def handle_frames(self, site: str, frames: Sequence[Any], address: str = "") -> None:
        """One multipart message from the authenticated ``site`` (``address``: its
        connection's, as the transport reports it, for the journal's line saying the
        site connected).

        Anything malformed, oversized, replayed, spoofed or out of place is
        refused: logged in the audit trail, answered with ``Rejected``, and
        nothing else changes.
        """
        now = self.clock()
        try:
            env = codec.decode(frames, max_bytes=self.max_message_bytes)
        except codec.WireError as exc:
            self._reject(site, "malformed_message", f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # decode names every refusal a WireError; if one slips
            log.exception("decoding a message from %s failed", site)  # by, drop it alone
            self._reject(site, "malformed_message",
                         f"MalformedFrame: the message could not be decoded "
                         f"({type(exc).__name__})")
            return
        returning = not self._connected(site, now)
        conn = self.conns.get(site)
        if conn is None:
            conn = self.conns[site] = _Conn(now)
        if conn.seen(env.header.msg_id):
            self._reject(site, "replayed_message",
                         f"message id {env.header.msg_id} ({env.header.type}) already received")
            return
        if env.header.sender != site:
            self._reject(site, "spoofed_sender", f"header sender "
                         f"{codec.short(env.header.sender)} is not the authenticated {site!r}")
            return
        if conn.last_seen in (now, float("-inf")):  # new, or lost by the transport
            came = "connected" + (f" from {printable(address)}" if address else "")
        else:
            came = f"heard from again after {now - conn.last_seen:.0f} s of silence"
        conn.last_seen = now
        if returning:  # a site back (restarted, perhaps restored) is told anew
            conn.ledger_told_at = float("-inf")
        self._took_effect = False
        try:
            self.handle(site, env, now)
        except Exception as exc:  # neither a bug reached by one site's message nor a lock
            # held by another process may end the coordinator for every other site
            if is_locked(exc):
                if not self._took_effect:  # nothing happened: it can be handled again later
                    conn.forget(env.header.msg_id)
                    raise DatabaseLocked(site, env.header.type, exc) from exc
                log.error("%s from %s was handled, but a record of it was not written: "
                          "database %s is locked by another process (%s)", env.header.type,
                          site, self.store.path, exc)
                return
            log.exception("internal error handling %s from %s", env.header.type, site)
            self._reject(site, "internal_error",
                         f"{env.header.type} could not be handled: {type(exc).__name__}: "
                         f"{str(exc)[:200]}")
            return
        if returning and self._connected(site, now):  # not refused (version) meanwhile
            self._link_changed(site, True, came, now)
            if self.roster:  # it may have missed roster changes while away
                self.outbox.append(Outgoing(site, m.RosterUpdate(self.roster)))
            self.on_site_returned(site)

    def handle(self, site: str, env: codec.Envelope, now: float) -> None:
        """Act on one authenticated, decoded message. Until it sets ``_took_effect`` it
        has changed nothing, and a locked database (raised) hands the message back;
        after, every write is its own (a failure costs that record, logged)."""
        body = env.body
        if isinstance(body, m.Heartbeat):
            if body.site != site:
                self._reject(site, "spoofed_sender",
                             f"heartbeat names site {codec.short(body.site)}")
                return
            if not self._version_accepted(site, body.version):
                return
            self._took_effect = True
            self._heartbeat(site, body)
            self.outbox.append(Outgoing(site, m.HeartbeatAck(self.wall(), __version__)))
            return
        if isinstance(body, m.DatasetClasses):  # just before each heartbeat; memory only
            self._took_effect = True
            self.conns[site].classes_next = {
                name[:HEARTBEAT_TEXT_MAX]: tuple(classes)
                for name, classes in list(body.classes.items())[:DATASETS_MAX]}
            self.conns[site].inputs_next = (
                {name[:HEARTBEAT_TEXT_MAX]: task
                 for name, task in list(body.tasks.items())[:DATASETS_MAX]},
                {name[:HEARTBEAT_TEXT_MAX]: tuple(shape)
                 for name, shape in list(body.input_shapes.items())[:DATASETS_MAX]},
                {name[:HEARTBEAT_TEXT_MAX]: mode
                 for name, mode in list(body.standardise.items())[:DATASETS_MAX]})
            return
        if type(body).__name__ == "UpdateOutcome":
            if self.on_update_outcome is None:
                self.store.audit(site, "update.outcome", repr(body))  # the only record
            else:  # it writes its audit row first: a locked database hands it back whole
                self.on_update_outcome(site, body)
            return
        if m.is_update_fetch(body):
            self._took_effect = True
            if self.update_handler is None:
                self._reject(site, "unroutable", "this coordinator relays no updates")
            else:
                self.outbox.append(Outgoing(site, self.update_handler(body)))
            return
        rnd = self.runner.round if self.runner is not None else None
        if rnd is None or rnd.finished or env.header.job != rnd.job_id \
                or env.header.round != rnd.round:
            if m.is_secagg(body) or isinstance(body, m.EvalResult):
                # late answers to a round that already closed (stage deadline passed):
                # logged (and audited) once per site, job and round, then counted, as
                # the rejections are; a site naming a new job in each cannot flood the
                # journal either (a job or round never run is one key per site)
                self._late_message(site, env, now)
                return
            if isinstance(body, LATE_ANSWERS) and self._ran(env.header.job,
                                                           env.header.round):
                self._late_answer(site, env, now)
                return
            where = f"job {env.header.job!r} round {env.header.round}"
            self._reject(site, "stale_message", f"{env.header.type} for {where}, "
                         "which is not the round in progress")
            return
        before = len(rnd.rejected)
        if isinstance(body, m.TaskRefused):
            try:  # recorded before the round acts on it; a locked database hands it back
                self.store.audit(site, "task_refused", {
                    "job": rnd.job_id, "round": rnd.round, "task": codec.short(body.task, 40),
                    "reason": m.clip_reason(body.reason)})
            except sqlite3.OperationalError as exc:
                if is_locked(exc):
                    raise
                self._not_written(f"task_refused of {site}", exc)  # a full disk: acted on
        self._took_effect = True
        self._emit(rnd, rnd.receive(site, body, now))
        try:
            # the round's refusals (secure aggregation's discards among them) are logged
            # and audited as the coordinator's own: the first of each kind per site and
            # round in full, then counted (AuditThrottle), so a site repeating a bad
            # message cannot flood the audit log; each is answered all the same. The
            # kind is the round's fixed code for what was wrong (Round.rejected), never
            # the reason's text, which quotes what the site sent: a spoofed client_id
            # is one kind, whatever it names, and not the kind of a second answer
            for rsite, reason, kind in rnd.rejected[before:]:
                key = (rsite, "rejected_message", rnd.job_id, rnd.round, kind)
                if self._rejections.event(key, rsite, "rejected_message",
                                          {"job": rnd.job_id, "round": rnd.round,
                                           "reason": reason}, now):
                    log.warning("rejected message from %s in job %s round %d: %s", rsite,
                                rnd.job_id, rnd.round, printable(reason))
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"rejected_message of {site}", exc)
        del rnd.rejected[before:]  # audited or counted: a flood must not grow the round
        try:
            self._after(now)
        except (StoreError, sqlite3.OperationalError) as exc:  # the next tick records it
            self._not_written(f"the end of job {rnd.job_id} round {rnd.round}", exc)

    def _ran(self, job: str, round: int) -> bool:
        """Whether round ``round`` of job ``job`` has been open: a round of the job
        running, up to the one in progress or next, or of an ended job up to the one
        after its last committed (its failed attempts)."""
        runner = self.runner
        if runner is not None and runner.job_id == job:
            return 1 <= round <= runner.committed + 1
        try:
            ended = self.store.job(job)
        except StoreError:
            return False
        return ended.status in ("completed", "failed", "cancelled") \
            and 1 <= round <= ended.committed_round + 1

    def _late_message(self, site: str, env: codec.Envelope, now: float) -> None:
        """A SecAgg message or an evaluation result for a round that is not in progress
        (its stage deadline passed, or it names no round this coordinator runs): ignored,
        logged at INFO and audited as ``late_message`` the first time for its site, job
        and round, then counted (:class:`AuditThrottle`). A job and round this
        coordinator never ran are one key per site, whatever they name: a site naming a
        new one in each message would otherwise take every new key the throttle audits
        in a minute, and another site's first rejection would only be counted."""
        job, round_ = env.header.job, env.header.round
        try:
            key = (site, "late_message", job, round_) if self._ran(job, round_) \
                else (site, "late_message", None, 0)
            if self._rejections.event(key, site, "late_message",
                                      {"job": env.header.job, "round": env.header.round,
                                       "type": env.header.type}, now):
                log.info("late %s from %s for %s/%d ignored", env.header.type, site,
                         printable(env.header.job), env.header.round)
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"late_message of {site}", exc)

    def _late_answer(self, site: str, env: codec.Envelope, now: float) -> None:
        """A site's answer to a task of an attempt that has ended (its deadline passed,
        the attempt failed or was aborted): a race every federation meets, not a fault.
        Nothing is answered; logged at INFO and audited as ``late_answer`` once per
        site and round (then counted, as the rejections are: a site cannot flood with
        them)."""
        body = env.body
        why = (f": {peer_reason(m.clip_reason(body.reason))}"
               if isinstance(body, m.TaskRefused) else "")
        job = printable(env.header.job)
        try:
            if self._rejections.event((site, "late_answer", env.header.job, env.header.round),
                                      site, "late_answer",
                                      {"job": env.header.job, "round": env.header.round,
                                       "type": env.header.type}, now):
                log.info("late %s from %s for job %s round %d, whose attempt had ended: "
                         "ignored%s", env.header.type, site, job, env.header.round, why)
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"late_answer of {site}", exc)

    def not_listening(self, seconds: float) -> None:
        """The process took no message for ``seconds`` (they waited in ZeroMQ while the
        database was locked, or its loop did not run: paused, swapped out, busy): the
        sites' silence over that time was the coordinator's deafness, so it does not
        count towards their heartbeat timeout, and the round's deadlines move that
        much later. A site heard since (the held message itself) is not moved: never
        past now. ``seconds`` is measured as ``clock`` measures (fedge.coordinator.process
        reads ``time.monotonic``, the production ``clock``): a step of the wall clock
        neither makes nor hides deafness."""
        now = self.clock()
        began = now - seconds
        for conn in self.conns.values():
            if conn.last_seen != float("-inf") and conn.last_seen < began:
                conn.last_seen = min(conn.last_seen + seconds, now)
        if self.runner is not None and self.runner.round is not None:
            self.runner.round.postpone(seconds)

    def peer_lost(self, site: str, address: str = "", *,
                  why: str = "its connection closed or went silent") -> None:
        """The transport lost ``site`` (heartbeat timeout or disconnect), or the process
        dropped it (``why``); ``address``: the connection's, as the transport reports
        it."""
        self._link_changed(site, False, f"disconnected: {why}"
                           + (f" ({printable(address)})" if address else ""), self.clock())
        conn = self.conns.get(site)
        if conn is not None and conn.last_seen != float("-inf"):
            conn.last_seen = float("-inf")  # keeps its replay window
            try:
                self.store.audit(site, "connection_lost", "")
            except (StoreError, sqlite3.OperationalError) as exc:
                self._not_written(f"connection_lost of {site}", exc)
        if self.runner is not None and self.runner.round is not None:
            self._emit(self.runner.round, self.runner.round.lost(site, self.clock()))

    def _version_accepted(self, site: str, agent_version: str) -> bool:
        """Version skew (fedge.update.version): one minor behind is accepted and audited
        as update-required; beyond that the agent is refused, naming both versions, and
        dropped. (Added by the console/updates engineer.)"""
        from fedge.update.version import SkewDecision, check_version_skew

        try:
            decision = check_version_skew(__version__, agent_version)
        except ValueError as exc:
            decision = SkewDecision(False, False, str(exc))
        if not decision.accepted:
            # the Rejected goes first (the agent's journal then says why), the
            # connection is dropped after it (fedge.coordinator.process._drain)
            self._reject(site, "version_refused", decision.reason, close_after=True)
            self.conns.pop(site, None)
            self._link_changed(site, False, "disconnected: its agent's version is refused",
                               self.clock())
            return False
        conn = self.conns.get(site)
        if decision.update_required and (conn is None
                                         or conn.last_heartbeat[:1] != (agent_version,)):
            self.store.audit(site, "version_update_required", decision.reason)
        return True

    def _heartbeat(self, site: str, hb: m.Heartbeat) -> None:
        # Every heartbeat is recorded: the store holds each site's latest in memory and
        # writes the fleet's in one transaction every store.HEARTBEAT_FLUSH_S, so a
        # fleet of hundreds beating every second costs no fsync per heartbeat.
        conn = self.conns[site]
        conn.secagg_protocol = hb.secagg_protocol
        if hb.eligible and self.runner is not None \
                and self.runner.sidelined.pop(site, None) is not None:
            log.info("job %s: %s says it is eligible again; back among the round's "
                     "candidates", self.runner.job_id, site)
        conn.classes, conn.classes_next = conn.classes_next, None
        (conn.tasks, conn.input_shapes, conn.standardise), conn.inputs_next = \
            conn.inputs_next or ({}, {}, {}), None
        datasets = [d[:HEARTBEAT_TEXT_MAX] for d in hb.datasets[:DATASETS_MAX]]
        conn.datasets = tuple(datasets)
        conn.last_heartbeat = (hb.version, hb.health_json, hb.eligible, hb.reason,
                               tuple(hb.datasets), hb.current_task)
        try:
            health = (_json(hb.health_json) if len(hb.health_json) <= HEALTH_JSON_MAX else
                      {"unparsable": f"health report of {len(hb.health_json)} characters, "
                                     f"over {HEALTH_JSON_MAX}: not kept"})
            self.store.record_heartbeat(
                site, version=hb.version, health=health, eligible=hb.eligible,
                reason=hb.reason[:HEARTBEAT_TEXT_MAX],
                datasets=datasets,
                current_task=hb.current_task[:HEARTBEAT_TEXT_MAX],
                inputs=DeclaredInputs(conn.tasks, conn.input_shapes,
                                      conn.standardise).to_record())
        except StoreError as exc:
            self._reject(site, "unknown_site", str(exc))
            return
        except sqlite3.OperationalError as exc:  # a full disk: the site is still answered
            self._not_written(f"heartbeat of {site}", exc)
        self._ledger_count(site, health.get(LEDGER_RELEASED))

    def _ledger_count(self, site: str, released: Any) -> None:
        """Compare the released runs ``site``'s privacy ledger holds (its health report's
        LEDGER_RELEASED; absent from agents before it, and those keeping no ledger: then
        nothing is compared) with the most it reported before (fedge.coordinator.cohort,
        the store's ``note_ledger_released``): fewer is a ledger restored from an older
        copy. Said once in the log and the audit log, and to the site, in a Rejected (the
        one message whose free text every agent's journal shows), when flagged and again
        each time it comes back or LEDGER_NOTICE_S pass while it stays so."""
        if isinstance(released, bool) or not isinstance(released, int) \
                or not 0 <= released <= LEDGER_COUNT_MAX:
            return
        try:
            events = self.store.note_ledger_released(site, released)
        except sqlite3.OperationalError as exc:  # held in memory; written at its next report
            self._not_written(f"privacy-ledger count of {site}", exc)
            events = []
        for e in events:
            if e.action == LEDGER_ROLLED_BACK:
                log.warning("%s (left out of every new cohort)",
                            ledger_rollback_reason(site, e.now, e.was))
            else:
                log.info("%s's privacy ledger holds %d released runs again, its mark %d: "
                         "back among the candidates", site, e.now, e.was)
        flag = self.store.ledger_flag(site)
        conn = self.conns.get(site)
        now = self.clock()
        if flag is None or conn is None or now - conn.ledger_told_at < LEDGER_NOTICE_S:
            return
        conn.ledger_told_at = now
        mark, rolled_back_to = flag
        self.outbox.append(Outgoing(site, m.Rejected(ledger_rollback_notice(
            site, rolled_back_to, mark))))

    def _reject(self, site: str, action: str, reason: str, *,
                close_after: bool = False) -> None:
        """Answer ``site`` with Rejected(reason), every time; log and audit the first
        rejection of each kind per site (action, and the error class a reason starts
        with), then at most one summary row a minute (a site sending malformed messages
        in a loop must not cost a fsync'd row each)."""
        # the kind: the error class a wire error names ("OversizeMessage: ..."), so each
        # kind of malformation is audited once in full; replays etc. have one kind each.
        # Only a head that is one name: any other reason may quote what the site sent
        # before its first colon (a job id), and varying it must not make a new kind
        reason = m.clip_reason(reason)  # it may quote what the site sent
        head, sep, _ = reason[:80].partition(":")
        kind = head if sep and head.isidentifier() else ""
        try:
            if self._rejections.event((site, action, kind), site, action, reason,
                                      self.clock()):
                log.warning("rejected message from %s: %s", site, printable(reason))
        except (StoreError, sqlite3.Error) as exc:  # a full disk: the answer still goes
            self._not_written(f"{action} of a message from {site}", exc)
        self.outbox.append(Outgoing(site, m.Rejected(reason), close_after=close_after))

    def _not_written(self, what: str, exc: Exception) -> None:
        """A record the database cannot take now (disk full): logged, at most once per
        FINISH_RETRY_S, never raised. The event itself goes on; its record is what a
        full disk costs."""
        now = self.clock()
        if now - self._write_failed_at >= FINISH_RETRY_S:
            self._write_failed_at = now
            log.error("%s not written to the database %s (writes failing; next report in "
                      "%g s): %s: %s", what, self.store.path, FINISH_RETRY_S,
                      type(exc).__name__, exc)

    def _link_changed(self, site: str, up: bool, why: str, now: float) -> None:
        """``site`` connected (``up``) or went away, ``why`` saying how: one INFO line,
        unless LINK_LOG_BURST were logged in its window (LINK_LOG_WINDOW_S); then the
        change is counted, and :meth:`_say_links` says where the site stands when the
        window ends. A site not connected since this process started has nothing to
        lose."""
        link = self._links.get(site)
        if link is None:
            if not up:
                return
            link = self._links[site] = _Link(up=False, why="")
        if link.up == up:
            return
        link.up, link.why = up, why
        if now - link.window_at >= LINK_LOG_WINDOW_S:
            self._say_link(site, link, now)  # a new window, and the last one's count
        elif link.said < LINK_LOG_BURST:
            link.said += 1
            log.info("site %s %s", site, why)
        else:
            link.unsaid += 1

    @staticmethod
    def _say_link(site: str, link: _Link, now: float) -> None:
        """Say where ``site`` stands, with the changes its last window held back, and
        open a new window."""
        held = ""
        if link.unsaid:
            held = (f" (its connection changed {link.unsaid} more time(s) in the "
                    f"{now - link.window_at:.0f} s before, not logged one by one)")
        log.info("site %s %s%s", site, link.why, held)
        link.window_at, link.said, link.unsaid = now, 1, 0

    def _say_links(self, now: float) -> None:
        """Note the sites gone silent past the heartbeat timeout that the transport
        has not reported lost, and say the changes held back (LINK_LOG_WINDOW_S)."""
        if now - self._links_checked_at < LINK_CHECK_S:
            return
        self._links_checked_at = now
        rnd = self.runner.round if self.runner is not None else None
        uploading = (set(rnd.participants) if rnd is not None
                     and rnd.phase is Phase.AGGREGATING else set())
        for site, link in list(self._links.items()):
            if link.up and not self._connected(site, now) and not (
                    site in uploading and not self._transport_lost(site)):
                # (a site uploading its masked input is silent behind it: tick's rule)
                where = f" in {self.config_path}" if self.config_path is not None else ""
                self._link_changed(site, False, "not heard from for over "
                                   f"{self.heartbeat_timeout_s:g} s ([heartbeat] timeout_s "
                                   f"= {self.heartbeat_timeout_s:g}{where}): counted as "
                                   "disconnected", now)
            if link.unsaid and now - link.window_at >= LINK_LOG_WINDOW_S:
                self._say_link(site, link, now)

    # -- driving --------------------------------------------------------------------

    def connected_sites(self, now: float | None = None) -> set[str]:
        now = self.clock() if now is None else now
        return {s for s in self.conns if self._connected(s, now)}

    def _transport_lost(self, site: str) -> bool:
        """Whether the transport reported ``site`` lost (`peer_lost`: its connection
        closed, a send found it not connected, or no byte came from it for the
        transport's timeout), or it never connected, rather than only silent past
        the heartbeat timeout."""
        c = self.conns.get(site)
        return c is None or c.last_seen == float("-inf")

    def _connected(self, site: str, now: float) -> bool:
        c = self.conns.get(site)
        return c is not None and now - c.last_seen <= self.heartbeat_timeout_s

    def tick(self, *, start_next: bool = True) -> None:
        """Advance deadlines, notice lost connections, start and finish rounds.

        ``start_next=False``: with no job running, none is started (the process loop
        builds the next one's starting model in a child meanwhile, or waits for a disk
        that could not take it); the rest (the silence checks, the summaries of refused
        events) goes on as on every tick."""
        now = self.clock()
        for throttle in (self._refusals, self._rejections):
            if throttle.pending:
                try:
                    throttle.flush(now)
                except (StoreError, sqlite3.Error) as exc:  # counted; flushed when it can be
                    self._not_written(f"a summary of {throttle.verb} events", exc)
        self._say_links(now)
        if self.runner is None:
            if start_next:
                self._start_next_job(now)
            if self.runner is None:
                return
        runner = self.runner
        if runner.finished:  # every planned round committed: finish, never train one more
            if now - runner.finish_failed_at >= FINISH_RETRY_S:
                self._finish_job(runner, now)
            return
        if runner.round is None:
            if now < runner.retry_at:  # the pause after a failed attempt (RETRY_BACKOFF_S)
                return
            runner.new_round(now)
        rnd = runner.round
        assert rnd is not None
        if rnd.finished:  # done but its commit failed (disk full): retried, not trained
            self._after(now)
            return
        for site in rnd.participants:
            if self._connected(site, now):
                continue
            if rnd.phase is Phase.AGGREGATING and not self._transport_lost(site):
                # silent past the heartbeat timeout, but not lost by the transport:
                # in secure aggregation a site's heartbeats queue behind its own
                # upload (a masked input of 4 bytes a coordinate on one connection),
                # which the transport counts as life; the stage deadline decides
                continue
            self._emit(rnd, rnd.lost(site, now))
        if rnd.phase is Phase.WAITING_COHORT:
            sel = select_cohort(
                self.store.appliances(), connected=self.connected_sites(now),
                dataset=runner.plan.dataset,
                sidelined={**runner.sidelined, **runner.excluded, **self.updating,
                           **self.contested_out(now)},
                protocols={s: c.secagg_protocol for s, c in self.conns.items()},
                secure_protocol=SECAGG_PROTOCOL if runner.plan.secagg.enabled else None,
                dp=any(runner.plan.privacy.get(k) is not None for k in ("dp", "client_dp")),
                scaffold=runner.plan.scaffold,
                versions={s: c.last_heartbeat[0] for s, c in self.conns.items()
                          if c.last_heartbeat},
                classes={s: c.classes for s, c in self.conns.items()},
                job_classes=runner.plan.classes, pinned=rnd.pinned_cohort,
                min_clients=runner.plan.min_clients)
            runner.selection = sel
            why = (sel.explain_missing(rnd.pinned_cohort) if rnd.pinned_cohort is not None
                   else sel.explain(runner.plan.min_clients))
            self._emit(rnd, rnd.offer(sel.candidates, now, why=why))
            if rnd.phase is not Phase.WAITING_COHORT:  # the cohort formed: who was not in it
                rnd.left_out = sel.left_out(rnd.cohort)
                if rnd.left_out:
                    formed = (f"cohort of {len(rnd.cohort)} formed" if rnd.cohort
                              else "no cohort formed")  # failed waiting for one
                    log.info("job %s round %d: %s; left out: %s", rnd.job_id, rnd.round,
                             formed, _left_out_text(rnd.left_out))
        else:
            self._emit(rnd, rnd.tick(now))
        self._after(now)

    def fail_round_in_flight(self, reason: str) -> bool:
        """Fail the round in progress with ``reason`` (its sites are told to drop it) and
        record the failed attempt, as for any failed round: the round starts again
        after the pause (RETRY_BACKOFF_S), and a job whose rounds keep failing fails after
        ``max_failed_attempts``. For an error the coordinator cannot get past (a tick
        that raises): each attempt fails once, never in a loop. Returns whether there
        was a round to fail.
        """
        runner = self.runner
        if runner is None or runner.round is None or runner.round.phase is Phase.FAILED:
            return False
        rnd = runner.round
        self._emit(rnd, rnd.discard(reason))
        self._after(self.clock())
        return True

    def _after(self, now: float) -> None:
        runner = self.runner
        if runner is None or runner.round is None or not runner.round.finished:
            return
        rnd = runner.round
        try:
            self._end_round(runner, rnd, now)
        finally:
            if runner.round is not rnd:  # committed or failed: the next is not formed yet
                self.on_round_ended()

    def _end_round(self, runner: JobRunner, rnd: Round, now: float) -> None:
        if rnd.phase is Phase.DONE:
            if now - runner.commit_failed_at >= runner.commit_retry_s:
                self._commit(runner, rnd, now)
        else:
            # the attempt and, at the plan's limit, the job's end in one transaction: a
            # write refused here leaves both to the next tick, never one without the other
            reason = remedy_first(rnd.failure, rnd.refused)
            unrecorded = self._unmask_unrecorded
            if unrecorded is not None and unrecorded[0] is rnd:
                reason = unrecorded_first(reason, unrecorded[1])
            refused_twice = self._refused_twice(runner, rnd, reason)
            attempts = self.store.fail_round(rnd.job_id, rnd.round, started_at=rnd.started_at,
                                             cohort=rnd.cohort, reason=reason,
                                             max_attempts=runner.plan.max_failed_attempts,
                                             dropped_reasons=rnd.dropped_reasons(),
                                             survivors=rnd.summed, job_error=refused_twice)
            runner.round = None
            if unrecorded is not None and unrecorded[0] is rnd:
                self._unmask_unrecorded = None
            ended = bool(refused_twice) or attempts >= runner.plan.max_failed_attempts
            if not ended:
                runner.retry_later(attempts, reason, now, rnd.opened_at)
                self._sideline(runner, rnd, attempts)
                log.warning("job %s round %d failed (attempt %d of %d; the next in %g s): %s",
                            rnd.job_id, rnd.round, attempts, runner.plan.max_failed_attempts,
                            runner.retry_s, printable(reason))
            else:
                log.warning("job %s round %d failed (attempt %d): %s", rnd.job_id,
                            rnd.round, attempts, printable(reason))
            if refused_twice:
                log.error("job %s failed: %s", rnd.job_id, printable(refused_twice))
            elif ended:
                log.error("job %s failed: round %d failed %d times", rnd.job_id, rnd.round,
                          attempts)
            if ended:
                self.runner = None
                digest = self.keep_last_model(rnd.job_id, runner.committed,
                                              runner.last_checkpoint)
                self.forget_rounds(rnd.job_id)
                if digest:
                    try:  # names the export's weights, so a resumed finish keeps it
                        self.store.set_final_digest(rnd.job_id, digest)
                    except (StoreError, sqlite3.OperationalError) as exc:
                        self._not_written(f"the final digest of job {rnd.job_id}", exc)
                    self.on_job_completed(rnd.job_id)

    def _refused_twice(self, runner: JobRunner, rnd: Round, reason: str) -> str:
        """The job's error when the failed attempt ``rnd`` (recorded with ``reason``)
        and the attempt before it at the same round each failed because every site of
        the same cohort refused to train in the same words (Round.unanimous_refusal):
        a plan every site refuses alike (a data set none holds, a policy all share) is
        refused again at every retry, and the ML engineer would wait out
        max_failed_attempts backoffs for nothing. "" otherwise (a partial refusal,
        another reason, a site lost or trained, another cohort, an attempt between
        them that was not a failure): the retries go on as before. The attempt before
        is the database's row, so a coordinator restarted in between still sees it.

        Raises: StoreError, sqlite3.Error: the database cannot be read (the attempt's
        end is retried at the next tick, as for its write)."""
        why = rnd.unanimous_refusal
        if why is None or runner.plan.max_failed_attempts <= 2:
            return ""  # (at 2 or fewer, the count ends the job as soon)
        cohort = sorted(rnd.cohort)
        before = [r for r in self.store.rounds(rnd.job_id) if r.round == rnd.round]
        if not before:
            return ""
        last = before[-1]
        if last.status != "failed" or sorted(last.cohort) != cohort or last.survivors \
                or last.reason != reason or last.dropped_reasons != {s: why for s in cohort}:
            return ""
        return m.clip_reason(
            f"round {rnd.round}: every site of its cohort ({_names(cohort, limit=20)}) "
            f"refused to train it, in attempts {last.attempt} and {last.attempt + 1} "
            f"alike: {why}; the job was not retried further (max_failed_attempts is "
            f"{runner.plan.max_failed_attempts}): every site refused it twice in the same "
            "words")

    def _sideline(self, runner: JobRunner, rnd: Round, attempts: int) -> None:
        """Leave each site that refused or was lost in the failed attempt ``rnd`` (not
        one a failed aggregation dropped only because others were gone) out of the
        round's next attempts, until a heartbeat of its own says it is eligible
        (:meth:`_heartbeat`). Its failure was its own (a state dir it cannot write, a
        crash), and a heartbeat is its word that it is fit again; the others may
        meanwhile commit without it where min_clients allows. An attempt nobody
        refused (a cohort that never formed) leaves nobody out."""
        for site, why in rnd.dropped_reasons().items():
            if site in rnd.lost_by_aggregation:
                # dropped because others were (fewer than t left): not its failure, and
                # a retry opened before its next heartbeat would go on without it
                continue
            runner.sidelined[site] = (f"left out after attempt {attempts} at round "
                                      f"{rnd.round} failed with it ({why}), until it "
                                      "reports eligible again")
            log.warning("job %s: %s is left out of round %d until its next heartbeat says "
                        "it is eligible: %s", rnd.job_id, site, rnd.round, printable(why))

    def _commit(self, runner: JobRunner, rnd: Round, now: float) -> None:
        """Commit a DONE round: its checkpoint, then its SQLite row (module docstring).

        A round that cannot be written (disk full, I/O error) is not lost and not
        trained again: it stays the runner's DONE round, the failure is logged and
        audited (best effort: the audit may not fit on the disk either) as
        ``round_commit_failed``, and :meth:`tick` tries the commit again every
        FINISH_RETRY_S. A coordinator restarted meanwhile retrains the round.
        """
        assert rnd.new_weights is not None
        rows = rnd.metric_rows()
        summary = {f"{split}/{name}": v for site, split, name, v, _ in rows if site == "*"}
        ckpt = ck.Checkpoint(weights=rnd.new_weights, round=rnd.round, plan=runner.plan.text,
                             strategy_state=rnd.strategy.state, metrics=summary)
        path = ck.round_path(self.state_dir, runner.job_id, rnd.round)
        try:
            digest = ck.save_checkpoint(path, ckpt)
            self.store.commit_round(runner.job_id, rnd.round, started_at=rnd.started_at,
                                    cohort=rnd.cohort, survivors=rnd.survivors,
                                    dropped=rnd.dropped, model_digest=digest, metrics=rows,
                                    dropped_reasons=rnd.dropped_reasons(),
                                    eval_missing=rnd.eval_missing,
                                    left_out=rnd.left_out)
        except (OSError, sqlite3.Error) as exc:
            what = (f"cannot write {path}" if isinstance(exc, OSError)
                    else f"cannot write database {self.store.path}")
            error = f"{what}: {type(exc).__name__}: {exc}"
            runner.commit_retry_s = LOCKED_RETRY_S if is_locked(exc) else FINISH_RETRY_S
            log.error("job %s round %d not committed (retried in %g s): %s", runner.job_id,
                      rnd.round, runner.commit_retry_s, error)
            runner.commit_failed_at = now
            runner.commit_error = error
            try:
                self.store.audit(SYSTEM, "round_commit_failed",
                                 {"job": runner.job_id, "round": rnd.round,
                                  "error": error[:500]})
            except (StoreError, sqlite3.Error) as audit_exc:
                self._not_written(f"round_commit_failed of job {runner.job_id}", audit_exc)
            return
        except Exception as exc:  # not the disk: what the round holds cannot be written
            # (a value SQLite refuses...). Retrying would fail the same way every
            # FINISH_RETRY_S for ever: the attempt fails, naming why, and is run again.
            log.exception("job %s round %d cannot be committed", runner.job_id, rnd.round)
            self.fail_round_in_flight(f"round {rnd.round} could not be committed: "
                                      f"{type(exc).__name__}: {str(exc)[:300]}")
            return
        runner.commit_failed_at = float("-inf")
        runner.commit_error = ""
        self._prune_rounds(runner.job_id, rnd.round, ended=False)
        marks = [*rnd.phase_log, ("committed", self.clock())]
        phases = ", ".join(f"{a} {t1 - t0:.2f} s" for (a, t0), (_, t1)
                           in itertools.pairwise(marks))
        log.info("job %s round %d committed (%s), survivors %s; %s", runner.job_id,
                 rnd.round, digest[:12], rnd.survivors, phases)
        for split, evals in ((runner.plan.eval_split, rnd.evals), ("test", rnd.test_evals)):
            for site, why in eval_count_outliers(evals).items():
                self._finding(runner, "eval_count_outlier", {
                    "job": runner.job_id, "round": rnd.round, "site": site, "split": split,
                    "reason": f"capped in the size-weighted {split} metrics: {why}"})
        if rnd.final_test:  # which survivors are not in the final test, and why
            try:
                self.store.audit(SYSTEM, "final_test", {
                    "job": runner.job_id, "round": rnd.round,
                    "evaluated": sorted(rnd.test_evals), "missing": rnd.test_missing})
            except (StoreError, sqlite3.Error) as exc:
                self._not_written(f"final_test of job {runner.job_id}", exc)
        runner.weights = rnd.new_weights
        runner.strategy = rnd.strategy
        runner.committed = rnd.round
        runner.last_checkpoint = ckpt
        runner.round = None
        if runner.finished:
            self._finish_job(runner, self.clock())

    def _finish_job(self, runner: JobRunner, now: float) -> None:
        """Every planned round is committed: write final.safetensors, mark the job
        completed and hand it to ``on_job_completed``.

        The last round is already committed when this runs, so a failure here (disk
        full, the coordinator killed while writing) must not start another round:
        it is logged and audited as ``job_finish_failed`` and :meth:`tick` tries
        again every FINISH_RETRY_S (after a restart, :meth:`_start_next_job` does).
        """
        ckpt = runner.last_checkpoint
        try:
            if ckpt is None:  # resumed after a restart: the last committed round's file
                ckpt = ck.load_checkpoint(ck.round_path(self.state_dir, runner.job_id,
                                                        runner.committed))
                runner.last_checkpoint = ckpt
            digest = ck.save_final(self.state_dir, runner.job_id, ckpt,
                                   self.job_outcome(runner.job_id, "completed"))
            self.store.set_job_status(runner.job_id, "completed", actor=SYSTEM,
                                      final_digest=digest)
            log.info("job %s completed: %d round(s) committed; final model %s",
                     runner.job_id, runner.committed, digest[:12])
        except (OSError, ck.CheckpointError, StoreError, sqlite3.Error) as exc:
            if isinstance(exc, OSError):  # its text may name no file (a write's ENOSPC)
                error = (f"cannot write {ck.final_path(self.state_dir, runner.job_id)}: "
                         f"{type(exc).__name__}: {exc}")
            elif isinstance(exc, sqlite3.Error):
                error = database_error(self.store.path, exc)
            else:  # a CheckpointError names its file, a StoreError its job
                error = f"{type(exc).__name__}: {exc}"
            log.error("job %s: all %d rounds committed but finishing failed (retried in "
                      "%g s): %s", runner.job_id, runner.committed, FINISH_RETRY_S, error)
            runner.finish_failed_at = now
            runner.finish_error = error
            try:
                self.store.audit(SYSTEM, "job_finish_failed",
                                 {"job": runner.job_id, "round": runner.committed,
                                  "error": error[:500]})
            except (StoreError, sqlite3.Error):
                log.exception("cannot audit the failure to finish job %s", runner.job_id)
            return
        self.runner = None
        self._prune_rounds(runner.job_id, runner.committed, ended=True)
        self.on_job_completed(runner.job_id)

    def forget_rounds(self, job_id: str) -> None:
        """Remove the round checkpoints of an ended job that nothing reads any more
        (:func:`fedge.coordinator.checkpoint.prune_rounds`: round 0 and the last
        committed round stay). Its status and committed round are read from SQLite,
        so only what is durable there decides; a job still running is pruned as at a
        commit. Best effort: a failure is logged, and the files stay."""
        try:
            job = self.store.job(job_id)
        except (StoreError, sqlite3.Error) as exc:
            log.warning("job %s: its old round checkpoints are kept for now: %s", job_id, exc)
            return
        self._prune_rounds(job_id, job.committed_round,
                           ended=job.status in ("completed", "failed", "cancelled"))

    def _prune_rounds(self, job_id: str, committed: int, *, ended: bool) -> None:
        """checkpoint.prune_rounds once round ``committed`` is committed in SQLite; a
        file that cannot be removed is logged and left for the next commit to try."""
        try:
            removed = ck.prune_rounds(self.state_dir, job_id, committed, ended=ended)
        except OSError as exc:
            log.warning("job %s: cannot remove an old round checkpoint (tried again at the "
                        "next commit): %s", job_id, exc)
            return
        if removed:
            log.debug("job %s: removed %s", job_id, ", ".join(p.name for p in removed))

    def _start_next_job(self, now: float) -> None:
        """Start (or resume from its last committed round) the oldest running, else
        queued, job.

        A plan that does not parse fails the job, and so does a queued one that the
        submission checks (:meth:`submission_warnings`) now refuse, with their words:
        what the sites declared may have come in since it was submitted. A checkpoint
        that cannot be read (truncated or bit-flipped by a crash, unreadable for a
        moment, restored from a backup later) does not: the job stays as it is, the
        error is logged and audited as ``job_resume_failed`` (once per distinct
        error), shown in job_status as ``resume_error``, and the start is tried again
        every FINISH_RETRY_S, so putting the file back resumes the job. Until then the
        jobs queued behind it wait; cancelling it lets them run.
        """
        jobs = self.store.jobs(status="running") or self.store.jobs(status="queued")
        if not jobs:
            return
        job = jobs[0]
        failure = self._resume_failure
        if failure is not None and failure[0] == job.job_id \
                and now - failure[2] < FINISH_RETRY_S:
            return
        last: ck.Checkpoint | None = None
        try:
            plan = parse_plan(job.plan_toml)
            if job.status == "queued":
                # what the sites declared may have come after the submit (a plan queued
                # before any heartbeat was checked against nothing): checked again now,
                # before any site trains
                self.submission_warnings(plan)
            if job.committed_round == 0:
                weights = self._round0(job.job_id, plan)
                strategy = Strategy(plan.strategy)
            else:
                c = ck.load_checkpoint(ck.round_path(self.state_dir, job.job_id,
                                                     job.committed_round))
                weights = c.weights.copy()
                last = c
                strategy = Strategy(plan.strategy, {k: v.copy()
                                                    for k, v in c.strategy_state.items()})
                if plan.scaffold and not strategy.sites():
                    self._restore_scaffold_sites(job.job_id, job.committed_round, strategy)
        except PlanError as exc:
            log.error("job %s failed: %s", job.job_id, exc)
            self.store.set_job_status(job.job_id, "failed", actor=SYSTEM, error=str(exc))
            return
        except CoordinatorError as exc:
            why = str(exc).removesuffix(NOTHING_SUBMITTED).rstrip()
            error = (f"refused when it was to start, by the submission checks: {why} "
                     f"{NOT_STARTED}")
            log.error("job %s failed: %s", job.job_id, printable(error))
            self.store.set_job_status(job.job_id, "failed", actor=SYSTEM, error=error)
            return
        except ck.CheckpointError as exc:
            self._cannot_resume(job.job_id, job.committed_round, str(exc), now)
            return
        if failure is not None and failure[0] == job.job_id:
            log.info("job %s: its checkpoint reads again; resuming", job.job_id)
        self._resume_failure = None
        if job.status == "queued":
            self.store.set_job_status(job.job_id, "running", actor=SYSTEM)
            log.info("job %s started: data set %r, %d round(s), min_clients %d",
                     job.job_id, plan.dataset, plan.rounds, plan.min_clients)
        else:
            self._record_interrupted(job.job_id, job.committed_round)
            self.store.audit(SYSTEM, "job_resumed",
                             {"job": job.job_id, "from_round": job.committed_round})
            log.info("job %s resumed after round %d of %d", job.job_id,
                     job.committed_round, plan.rounds)
        # room for the longest aggregation input (SCAFFOLD: 2d + 1 values)
        self.max_message_bytes = max(self.max_message_bytes,
                                     8 * (2 * weights.size + 1) + (1 << 20))
        self.runner = JobRunner(self, job.job_id, plan, weights, strategy, job.committed_round)
        for row in self.store.audit_log(action="share_accusation", job=job.job_id):
            self._exclude(self.runner, _json(row["detail"]))
        if job.failed_attempts and not self.runner.finished:
            # restarted between attempts: the count is the database's, and the pause
            # before the next attempt is taken again in full (no clock reading survives
            # a restart to say how much of it had passed)
            failed = [r for r in self.store.rounds(job.job_id)
                      if r.round == job.committed_round + 1 and r.status == "failed"]
            self.runner.retry_later(job.failed_attempts,
                                    failed[-1].reason if failed else "", now)
        if self.runner.finished:
            # killed (or failing) between committing the last round and marking the job
            # completed: finish it, do not train round plan.rounds + 1
            self.runner.last_checkpoint = last
            self._finish_job(self.runner, now)

    def _restore_scaffold_sites(self, job_id: str, committed: int,
                                strategy: Strategy) -> None:
        """A SCAFFOLD job checkpointed by fedge < 0.2 (c, no table of sites): rebuild the
        table from SQLite (fedge.coordinator.strategies), so that c is neither rescaled
        to 0 at the next step nor every site's ControlCommit says none of its Δc_i is in
        c. n_i is each site's count in its last committed round's train metrics (every
        site that trained has them: TrainDone's n_examples), the summed round the last
        committed round whose survivors hold it.

        Raises:
            StoreError, sqlite3.Error: the database cannot be read (the resume is retried).
        """
        counts: dict[str, int] = {}
        for row in self.store.metrics(job_id):  # ordered by round: the last count wins
            if row["split"] in ("train", "privacy") and row["site"] != "*" \
                    and row["round"] <= committed:
                counts[row["site"]] = int(row["n_examples"])
        summed: dict[str, int] = {}
        for r in self.store.rounds(job_id):
            if r.status == "committed" and r.round <= committed:
                for site in r.survivors:
                    summed[site] = max(summed.get(site, 0), r.round)
        uncounted = strategy.restore_sites(counts, summed)
        table = strategy.sites()
        log.warning("job %s: its round %d checkpoint was written by an earlier fedge (< 0.2, "
                    "SCAFFOLD's c without its table of sites): the table is rebuilt from the "
                    "database: %s", job_id, committed,
                    ", ".join(f"{s} n={n} last summed round {q}"
                              for s, (n, q) in sorted(table.items())) or "no site")
        if uncounted:
            log.error("job %s: no example count stored for %s, whose updates c holds: left "
                      "out of SCAFFOLD's table (their c_i restart from 0; c keeps them)",
                      job_id, uncounted)
        try:
            self.store.audit(SYSTEM, "scaffold_sites_rebuilt",
                             {"job": job_id, "round": committed,
                              "sites": {s: [n, q] for s, (n, q) in sorted(table.items())},
                              **({"uncounted": uncounted} if uncounted else {})})
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"scaffold_sites_rebuilt of job {job_id}", exc)

    def _cannot_resume(self, job_id: str, committed: int, error: str, now: float) -> None:
        failure = self._resume_failure
        new = failure is None or failure[:2] != (job_id, error)
        self._resume_failure = (job_id, error, now)
        if not new:
            return
        log.error("job %s cannot start from round %d (its status is kept; retried every "
                  "%g s): %s", job_id, committed, FINISH_RETRY_S, error)
        try:
            self.store.audit(SYSTEM, "job_resume_failed",
                             {"job": job_id, "round": committed, "error": error[:500]})
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"job_resume_failed of job {job_id}", exc)

    def _round0(self, job_id: str, plan: Plan) -> np.ndarray:
        path = ck.round_path(self.state_dir, job_id, 0)
        if path.exists():
            return ck.load_checkpoint(path).weights.copy()
        weights = np.ascontiguousarray(self.initial_weights(plan), dtype=np.float32)
        ck.save_checkpoint(path, ck.Checkpoint(weights=weights, round=0, plan=plan.text))
        return weights

    def _emit(self, rnd: Round, out: list[tuple[str, Any]]) -> None:
        if not rnd.phase_log or rnd.phase_log[-1][0] != rnd.phase.value:
            rnd.phase_log.append((rnd.phase.value, self.clock()))
            if rnd.phase in _IN_FLIGHT:
                self._record_phase(rnd)
        for site, body in out:
            self.outbox.append(Outgoing(site, body, rnd.job_id, rnd.round))
        runner = self.runner
        if runner is not None and runner.round is rnd:
            for action, detail in rnd.take_findings():
                self._finding(runner, action, detail)
        if rnd.unmask_pending is not None:
            self._record_unmask(rnd)

    def _record_phase(self, rnd: Round) -> None:
        """Audit ``round_phase``: the attempt ``rnd`` entered its current phase, with its
        cohort (in aggregation and evaluation, the sites that had trained; in
        evaluation, the sum's survivors: each released its update in it). What a
        coordinator restarted before the attempt ended knows of it
        (:meth:`_record_interrupted`). Best effort: a full disk costs the record."""
        detail: dict[str, Any] = {"job": rnd.job_id, "round": rnd.round,
                                  "phase": rnd.phase.value, "started_at": rnd.started_at,
                                  "cohort": list(rnd.cohort)}
        if rnd.phase is not Phase.TRAINING:
            detail["trained"] = sorted(rnd.trained)
        if rnd.phase is Phase.EVALUATING:
            detail["survivors"] = sorted(rnd.survivors)
        try:
            self.store.audit(SYSTEM, "round_phase", detail)
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"round_phase of job {rnd.job_id} round {rnd.round}", exc)

    def _record_interrupted(self, job_id: str, committed: int) -> None:
        """A coordinator resuming job ``job_id`` records the attempt at round
        ``committed + 1`` the last one left in flight (its last record is a
        ``round_phase``: its cohort had been asked to train, and no end was recorded)
        as "interrupted" (Store.interrupted_round): its sites may have trained and
        released an update in it. An attempt whose cohort had not formed is not
        recorded, as for a cancel.

        Raises: StoreError, sqlite3.Error: the database cannot be read or written (the
        resume is retried)."""
        ends = ("round_started", "round_phase", "round_committed", "round_failed",
                "round_cancelled", "round_interrupted")
        last = self.store.audit_log(actions=ends, job=job_id, limit=1)
        if not last or last[-1]["action"] != "round_phase":
            return
        detail = _json(last[-1]["detail"])
        if detail.get("round") != committed + 1 or not detail.get("cohort"):
            return
        phase = Phase(str(detail.get("phase")))
        cohort = [str(s) for s in detail.get("cohort", [])]
        trained = [str(s) for s in detail.get("trained", [])]
        # the sum's, once formed (being evaluated): a release each (report.client_privacy)
        survivors = [str(s) for s in detail.get("survivors", [])]
        # the last the database heard before this process started: not an entry this
        # process wrote (a job_resume_failed, a site's stale message) since
        newest = self.store.audit_log(limit=1, until_id=self.store.audit_id_at_open)
        ended_at = float(newest[-1]["time"]) if newest else float(last[-1]["time"])
        said = (f"; {len(trained)} of {len(cohort)} site(s) had trained ({_names(trained)})"
                if phase is not Phase.TRAINING else
                f"; its cohort ({_names(cohort)}) had been asked to train")
        reason = m.clip_reason(
            f"the coordinator stopped (restarted) while the round was "
            f"{_CUT_SHORT_IN.get(phase, 'open')}{said}: the round is started again; an "
            "update a site released in this attempt is charged in its own privacy ledger "
            "(`fedge agent privacy`) though no model came of it")
        self.store.interrupted_round(job_id, InterruptedAttempt(
            round=committed + 1, started_at=float(detail.get("started_at", ended_at)),
            ended_at=max(ended_at, float(detail.get("started_at", ended_at))),
            cohort=cohort, reason=reason, survivors=survivors))
        log.warning("job %s round %d attempt cut short by the coordinator's stop: %s",
                    job_id, committed + 1, printable(reason))

    def _finding(self, runner: JobRunner, action: str, detail: dict[str, Any]) -> None:
        """Act on what a round found a site doing (``Round.findings``): log it, audit it
        (best effort: a full disk costs the row, not the action) and, for a tampered-share
        accusation, leave the accuser and the accused out of the job's later rounds. An
        "example_count_outlier" is told once per site and job (JobRunner.count_outliers)."""
        if action == "share_accusation":
            self._exclude(runner, detail)
        if action == "example_count_outlier":
            if detail.get("site") in runner.count_outliers:
                return
            runner.count_outliers.add(str(detail.get("site")))
        log.warning("job %s round %s: %s%s: %s", runner.job_id, detail.get("round"),
                    action.replace("_", " "),
                    f" ({printable(detail['site'])})" if detail.get("site") else "",
                    printable(detail.get("reason", "")))
        try:
            self.store.audit(SYSTEM, action, detail)
        except (StoreError, sqlite3.Error) as exc:
            self._not_written(f"{action} of job {runner.job_id}", exc)

    @staticmethod
    def _exclude(runner: JobRunner, accusation: dict[str, Any]) -> None:
        """Leave both sites of a tampered-share accusation (an audited
        "share_accusation" detail) out of the job's later rounds."""
        accuser, accused = str(accusation.get("site", "")), str(accusation.get("accused", ""))
        why = (f"left out of job {runner.job_id}'s later rounds: {accuser} said a share "
               f"{accused} sent it in round {accusation.get('round')} was tampered with")
        for site in (accuser, accused):
            if site:
                runner.excluded.setdefault(site, why)

    def _record_unmask(self, rnd: Round) -> None:
        """Make the survivor set of the round's held unmask requests durable, then send
        them (module docstring). Another set already recorded fails the attempt and
        asks nobody; a write the database refuses now (locked, full) keeps them held,
        tried again each tick until the unmasking stage's deadline."""
        survivors = rnd.unmask_pending
        assert survivors is not None
        try:
            self.store.record_unmask_set(rnd.job_id, rnd.round, survivors)
        except StoreError as exc:
            log.error("job %s round %d: %s", rnd.job_id, rnd.round, exc)
            self._emit(rnd, rnd.discard(str(exc)))
            return
        except sqlite3.OperationalError as exc:
            why = database_error(self.store.path, exc)
            rnd.unmask_not_recorded(why)
            self._unmask_unrecorded = (rnd, why)
            self._not_written(f"the survivor set of job {rnd.job_id} round {rnd.round}'s "
                              "unmasking (its unmask requests wait for it)", exc)
            return
        if self._unmask_unrecorded is not None and self._unmask_unrecorded[0] is rnd:
            self._unmask_unrecorded = None
        self._emit(rnd, rnd.unmask_recorded())

    def aggregation_factory(self, plan: Plan) -> AggregationFactory:
        if self._aggregation is not None:
            return self._aggregation(plan)
        if not plan.secagg.enabled:
            return plain_factory
        from fedge.coordinator.secure import secagg_factory

        return secagg_factory(self)

    def close(self) -> None:
        now = self.clock()
        try:
            for throttle in (self._refusals, self._rejections):  # counted, not yet audited
                throttle.close(now)
        finally:
            self.store.close()


def contest_reason(contest: dict[str, Any]) -> str:
    """Why a contested site (:meth:`Coordinator.contested`) is dropped or left out."""
    where = ", ".join(str(a) for a in contest.get("addresses", [])) or "?"
    return (f"contested: {contest.get('times', '?')} reconnects from {where} — two "
            "appliances share this site's keys?")


@dataclass(frozen=True)
class DeclaredInputs:
    """What one site's last DatasetClasses said of its data sets: the task, the
    input shape and the standardisation of each (fedge.wire.messages.DatasetClasses);
    empty where it said nothing (an agent before these fields, a trainer without
    agent.toml tables)."""

    tasks: dict[str, str]
    input_shapes: dict[str, tuple[int, ...]]
    standardise: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """As the store keeps it (Store.declared_inputs): a JSON object."""
        return {"tasks": dict(self.tasks),
                "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
                "standardise": dict(self.standardise)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DeclaredInputs:
        """From :meth:`to_record`'s object, as read back; what does not read (a later
        release's field, a damaged value) is left out, as a site that said nothing."""
        tasks = record.get("tasks")
        shapes = record.get("input_shapes")
        modes = record.get("standardise")
        return cls(
            {str(k): v for k, v in (tasks.items() if isinstance(tasks, dict) else ())
             if isinstance(v, str)},
            {str(k): tuple(v) for k, v in (shapes.items() if isinstance(shapes, dict) else ())
             if isinstance(v, list) and v
             and all(isinstance(d, int) and not isinstance(d, bool) for d in v)},
            {str(k): v for k, v in (modes.items() if isinstance(modes, dict) else ())
             if isinstance(v, str)})


def submission_warnings(store: Store, plan: Plan,
                        declared: dict[str, tuple[str, ...]],
                        inputs: dict[str, DeclaredInputs] | None = None) -> list[str]:
    """What submitting ``plan`` deserves to be told, from ``store``'s jobs and from
    ``declared``: each site heard from, with the data sets it declared (the running
    coordinator: the heartbeats to this process, :meth:`Coordinator.submission_warnings`;
    ``fedge coordinator submit``: the ``appliances`` table, as last recorded). Sites
    not enrolled in ``store`` are not counted. The console and the direct CLI say the
    same, in the same words.

    A ``job.name`` that a queued or running job already has is taken, with a warning
    naming that job (two jobs told apart by their ids only).

    A ``privacy.dp.delta`` above the usual 1e-5 is taken with a warning: each site
    refuses DP-SGD when its training records number 1/δ or more, which the plan check
    (against ``min_site_examples``, the smallest site) cannot see.

    A secure plan whose sum cannot hold as many sites as some site holding
    ``job.dataset`` asks for (its ``min_cohort``, from its last heartbeat) is taken with
    a warning naming each such site and its floor: those sites are left out of its
    rounds before they train (fedge.coordinator.cohort, "Privacy floors").

    ``inputs``: what each site heard from declared of its data sets' tasks and input
    shapes (the running coordinator: its heartbeats' DatasetClasses; ``fedge
    coordinator submit``: the ``declared_inputs`` table, as last recorded). A plan
    that every site holding ``job.dataset`` declared them for, and every one of them
    would refuse, is refused here, before it waits in the queue; one that some of
    them would refuse, or that every site that declared would refuse while other
    holders said nothing (agents before these declarations, in a fleet being
    upgraded), is taken with a warning naming those sites.

    Raises:
        CoordinatorError: no site heard from declares ``job.dataset``, at least
            ``min_clients`` have declared theirs, and too few enrolled sites are left
            unheard to make ``min_clients`` even if all of them held it: a job that
            would wait ``cohort_s`` × ``max_failed_attempts`` for nothing and block the
            queue. Or, for every site holding ``job.dataset``, each of which declared
            its task (or input shape): the model is for another task (a Cox model on data that
            is not survival, another model on survival data, a classifier on a
            regression target), its input shape is not the data's
            (``model.params.in_features`` and the site's feature count), or
            ``job.classes`` is set for a data set that is not a classification task.
            Or ``privacy.client_dp.cohort_size`` is above the sites that could hold
            the data set (enrolled and heard holding it, or not heard from yet). Or
            the plan asks for DP-SGD (``privacy.dp``) and every site holding
            ``job.dataset`` declared that it standardises it with constants fitted on
            its own rows (``datasets.standardise`` "continuous", the default, or
            "all"), which each of them refuses under DP-SGD. Each names the field,
            the plan's value and the sites' values.
    """
    found: list[str] = []
    dp = plan.privacy.get("dp")
    delta = dp.get("delta", 1e-5) if isinstance(dp, dict) else None
    if isinstance(delta, float) and delta > 1e-5:
        found.append(f"privacy.dp.delta = {delta:g}: each site refuses DP-SGD when its "
                     f"training records number 1/delta = {math.ceil(1 / delta)} or "
                     "more (such a delta allows publishing one of them outright); "
                     "1e-5 or less suits sites of up to 100000 records")
    if plan.name:
        same = [j.job_id for j in store.jobs(status="running") + store.jobs(status="queued")
                if plan_labels(j.plan_toml)["name"] == plan.name]
        if same:
            found.append(f"job.name {plan.name!r} is also the name of {len(same)} "
                         f"queued or running job(s) ({_names(same)}): tell them apart "
                         "by their ids")
    found += _dataset_warnings(store, plan, declared)
    found += _privacy_floor_warnings(store, plan, declared)
    _check_cohort_size(store, plan, declared)
    return found + _model_fit_warnings(store, plan, declared, inputs or {}) \
        + _dp_standardise_warnings(store, plan, declared, inputs or {})


def _dp_standardise_warnings(store: Store, plan: Plan, declared: dict[str, tuple[str, ...]],
                             inputs: dict[str, DeclaredInputs]) -> list[str]:
    """submission_warnings' part on a DP-SGD plan (``privacy.dp``) against how the
    sites holding ``job.dataset`` standardise it: each site whose standardisation is
    fitted on its own training rows (datasets.standardise "continuous", the default, or
    "all": fedge.train.data.FITTED_STANDARDISE_MODES) refuses its tasks. Refused when
    every holder declared and every one is such a site (no round could train);
    otherwise a warning naming them (those sites are left out; the others may still
    make min_clients), as for the model's fit (:func:`_refuse_or_warn`)."""
    from fedge.train.data import (
        DP_FITTED_STANDARDISE_FIX,
        DP_FITTED_STANDARDISE_WHY,
        FITTED_STANDARDISE_MODES,
    )

    # in the words of a site's own refusal (fedge.agent.trainer), and the fix
    rule = (f"{DP_FITTED_STANDARDISE_WHY}, and each such site refuses to train. Declare "
            f"public constants instead in their agent.toml: {DP_FITTED_STANDARDISE_FIX}")

    dp = plan.privacy.get("dp")
    if dp is None:
        return []
    enrolled = {a.site_id for a in store.appliances() if a.status == "enrolled"}
    holders = sorted(s for s, ds in declared.items() if s in enrolled and plan.dataset in ds)
    modes = {s: inputs[s].standardise[plan.dataset] for s in holders
             if s in inputs and plan.dataset in inputs[s].standardise}
    fitted = {s: mode for s, mode in modes.items() if mode in FITTED_STANDARDISE_MODES}
    return _refuse_or_warn(
        "privacy.dp", dp, fitted, modes, [s for s in holders if s not in modes],
        lambda mode: ("standardised with constants fitted on each site's own training "
                      f"rows (datasets.standardise = {mode!r}"
                      + (", the default)" if mode == "continuous" else ")")),
        rule, plan.dataset)


def _privacy_floor_warnings(store: Store, plan: Plan,
                            declared: dict[str, tuple[str, ...]]) -> list[str]:
    """A warning when a secure plan's sum can never hold as many sites as some site
    holding ``job.dataset`` asks for (its min_cohort, from its last heartbeat's health
    report; fedge.coordinator.cohort, "Privacy floors"): the sites that could be in it
    are those heard holding the data set and the enrolled ones not heard from yet.
    Those sites are left out of its rounds; [] when none is, or the plan is plain."""
    if not plan.secagg.enabled:
        return []
    enrolled = {a.site_id: a for a in store.appliances() if a.status == "enrolled"}
    holders = sorted(s for s, ds in declared.items()
                     if s in enrolled and plan.dataset in ds)
    unheard = sum(1 for s in enrolled if s not in declared)
    below = over_floor({s: privacy_floor(enrolled[s].health) for s in holders}, holders,
                       others=unheard)
    if not below:
        return []
    sites = _names([f"{s} (min_cohort {floor}, in a sum of at most {held})"
                    for s, (floor, held) in sorted(below.items())])
    left = len(holders) + unheard - len(below)
    text = (f"secagg.enabled: {sites} refuse a secure sum of fewer sites than their "
            f"[privacy] min_cohort, and this job's can hold at most "
            f"{len(holders) + unheard} ({len(holders)} heard from hold data set "
            f"{plan.dataset!r}, {unheard} enrolled site(s) not heard from yet): they are "
            "left out of its rounds, ")
    if left < plan.min_clients:
        text += (f"leaving {left} site(s), fewer than job.min_clients = {plan.min_clients}: "
                 f"its rounds wait for a cohort and the job fails after "
                 f"{plan.max_failed_attempts} attempt(s) of {plan.deadlines.cohort_s:g} s")
    else:
        text += f"leaving {left} site(s)"
    return [text + ". Lower min_cohort in [privacy] of their agent.toml (in a sum of k "
            "sites the other k - 1 can recover a site's update) or enrol more sites "
            "holding the data set"]


def _check_cohort_size(store: Store, plan: Plan, declared: dict[str, tuple[str, ...]]) -> None:
    """Raises: CoordinatorError: ``privacy.client_dp.cohort_size`` is above the enrolled
    sites that hold ``job.dataset`` or have not said (each site refuses to add noise
    sized for a cohort larger than the one it is in). A federation with no site
    enrolled yet is not judged: a job may be queued before its sites enrol."""
    client_dp = plan.privacy.get("client_dp")
    cohort = client_dp.get("cohort_size") if isinstance(client_dp, dict) else None
    if not isinstance(cohort, int) or isinstance(cohort, bool):
        return
    enrolled = {a.site_id for a in store.appliances() if a.status == "enrolled"}
    if not enrolled:
        return
    known = {s: ds for s, ds in declared.items() if s in enrolled}
    holders = sorted(s for s, ds in known.items() if plan.dataset in ds)
    possible = len(holders) + len(enrolled) - len(known)
    if cohort <= possible:
        return
    raise CoordinatorError(
        f"plan field privacy.client_dp.cohort_size = {cohort}: more than the "
        f"{possible} enrolled site(s) that could hold data set {plan.dataset!r} "
        f"({len(enrolled)} enrolled; {len(holders)} heard from declare it"
        f"{': ' + _names(holders) if holders else ''}; {len(enrolled) - len(known)} "
        "not heard from yet): each site refuses DP-FedAvg noise sized for a cohort larger "
        f"than the one it is in. Set cohort_size <= {possible}, or enrol more sites "
        f"first. {NOTHING_SUBMITTED}")


_CLASSIFICATION_TASKS = ("binary", "multiclass")


def _model_fit_warnings(store: Store, plan: Plan, declared: dict[str, tuple[str, ...]],
                        inputs: dict[str, DeclaredInputs]) -> list[str]:
    """submission_warnings' part on the model against the data set's declared task
    and input shape; raises as it does."""
    from fedge.coordinator.plan import model_input_shape
    from fedge.train.model_names import TASK_OF_MODEL, TASKS_OF_KIND

    enrolled = {a.site_id for a in store.appliances() if a.status == "enrolled"}
    # every enrolled site heard holding the data set, whether or not it said more: an
    # agent before DatasetClasses.tasks/input_shapes holds it and declares nothing
    holders = sorted(s for s, ds in declared.items() if s in enrolled and plan.dataset in ds)
    tasks = {s: inputs[s].tasks[plan.dataset] for s in holders
             if s in inputs and plan.dataset in inputs[s].tasks}
    shapes = {s: tuple(inputs[s].input_shapes[plan.dataset]) for s in holders
              if s in inputs and plan.dataset in inputs[s].input_shapes}
    found: list[str] = []
    kind = TASK_OF_MODEL.get(plan.model_name, "any")
    fits = TASKS_OF_KIND.get(kind, TASKS_OF_KIND["any"])
    known_tasks = {s: t for s, t in tasks.items()
                   if t in TASKS_OF_KIND["any"]}  # a task of a later release: not judged
    silent_tasks = [s for s in holders if s not in known_tasks]
    misfit = {s: t for s, t in known_tasks.items() if t not in fits}
    found += _refuse_or_warn(
        "model.name", plan.model_name, misfit, known_tasks, silent_tasks,
        lambda t: f"a {t} task",
        f"model {plan.model_name!r} is a {kind} model (survival data needs cox_linear, "
        "cox_mlp or mlp; a Cox model needs survival data; a classifier needs binary or "
        "multiclass labels)", plan.dataset)
    if plan.classes:
        misfit = {s: t for s, t in known_tasks.items() if t not in _CLASSIFICATION_TASKS}
        found += _refuse_or_warn(
            "job.classes", list(plan.classes), misfit, known_tasks, silent_tasks,
            lambda t: f"a {t} task",
            "job.classes names the class order of a classification data set; the sites "
            "holding this one send no class list, and the job would wait for one",
            plan.dataset)
    outputs = _class_outputs(plan) if kind != "survival" else None
    if outputs is not None:
        param, value, logits = outputs
        # fedge.train.api._check_classes, the sites' rule: one logit for binary labels,
        # one per class (at least two) for multiclass ones
        misfit = {s: t for s, t in known_tasks.items()
                  if (t == "binary" and logits != 1) or (t == "multiclass" and logits < 2)}
        one = "classes = 2" if plan.model_name in ("logistic", "resnet_small") \
            else "out_features = 1"
        found += _refuse_or_warn(
            param, value, misfit,
            known_tasks, silent_tasks, lambda t: f"a {t} task",
            f"model {plan.model_name!r} has {logits} output(s); a binary model has one "
            f"logit ({one}), a multiclass one an output per class (at least 2)",
            plan.dataset)
    want = model_input_shape(plan.model_name, plan.model_params)
    if want is not None:
        misfit_shapes = {s: sh for s, sh in shapes.items() if sh != want}
        field, value = _shape_field(plan, want, misfit_shapes)
        found += _refuse_or_warn(
            field, value, misfit_shapes, shapes, [s for s in holders if s not in shapes],
            _shape_text,
            f"model {plan.model_name!r} takes {_shape_text(want)}, and each site refuses "
            "data of another shape", plan.dataset)
    return found


def _class_outputs(plan: Plan) -> tuple[str, int, int] | None:
    """(the plan field that sets the model's number of outputs, its value, the number
    of logits it builds) as the sites count them (fedge.train.api._check_classes):
    ``classes`` for logistic and resnet_small (2 classes build one logit),
    ``out_features`` (default 1) for the others; None where it is not an integer (the
    model's build names it)."""
    if plan.model_name in ("logistic", "resnet_small"):
        k = plan.model_params.get("classes", 2)
        if not isinstance(k, int) or isinstance(k, bool):
            return None
        return "model.params.classes", k, 1 if k == 2 else k
    k = plan.model_params.get("out_features", 1)
    if not isinstance(k, int) or isinstance(k, bool):
        return None
    return "model.params.out_features", k, k


def _shape_field(plan: Plan, want: tuple[int, ...],
                 misfit: dict[str, tuple[int, ...]]) -> tuple[str, Any]:
    """The plan field that sets the differing part of the model's input shape."""
    if len(want) == 1:
        if any(len(sh) != 1 for sh in misfit.values()):
            return "model.name", plan.model_name
        return "model.params.in_features", want[0]
    if any(len(sh) != 3 for sh in misfit.values()):
        return "model.name", plan.model_name
    if any(sh[0] != want[0] for sh in misfit.values()):
        return "model.params.in_channels", want[0]
    return "model.params.image_size", want[1]


def _shape_text(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return f"{shape[0]} features"
    if len(shape) == 3:
        return f"{shape[0]}-channel {shape[1]}x{shape[2]} images"
    return "examples of shape " + "x".join(str(d) for d in shape)


def _refuse_or_warn(field: str, value: Any, misfit: dict[str, Any], declared: dict[str, Any],
                    silent: Sequence[str], describe: Callable[[Any], str], rule: str,
                    dataset: str) -> list[str]:
    """Refuse (CoordinatorError) when every site holding the data set declared
    (``silent``, the holders that said nothing, is empty) and all of them, ``declared``,
    are in ``misfit``; a warning when only some are, or when all that declared are but
    some holders are silent (an agent before these declarations: its site may fit the
    plan, and one upgraded site must not refuse it for them); [] when none is. Names
    the field, the plan's value, each misfit site's, and the silent sites."""
    if not misfit:
        return []
    by_value: dict[str, list[str]] = {}
    for site, v in sorted(misfit.items()):
        by_value.setdefault(describe(v), []).append(site)
    sites = "; ".join(f"{what} at {_names(who)}" for what, who in sorted(by_value.items()))
    head = (f"plan field {field} = {codec.short(value)}: data set {dataset!r} is {sites} "
            f"(agent.toml [[datasets]]); {rule}")
    if len(misfit) == len(declared) and not silent:
        raise CoordinatorError(f"{head}. Every site holding it would refuse the job. "
                               f"{NOTHING_SUBMITTED}")
    fit = len(declared) - len(misfit)
    parts = [f"{head}. Those sites will refuse its tasks"]
    if fit:
        parts.append(f"the other {fit} that said so fit it")
    if silent:
        parts.append(f"{len(silent)} site(s) holding it did not say ({_names(silent)}: an "
                     "agent before these declarations, or a data set whose shape is "
                     "known only once read), so the plan is taken: "
                     + ("it runs only if they fit it" if not fit else "they may fit it"))
    return ["; ".join(parts)]


def _dataset_warnings(store: Store, plan: Plan,
                      declared: dict[str, tuple[str, ...]]) -> list[str]:
    """submission_warnings' part on ``job.dataset``; raises as it does."""
    enrolled = {a.site_id for a in store.appliances() if a.status == "enrolled"}
    known = {s: tuple(ds) for s, ds in declared.items() if s in enrolled}
    if not known:
        return []
    holders = sorted(s for s, ds in known.items() if plan.dataset in ds)
    if not holders and len(known) >= plan.min_clients \
            and len(enrolled) - len(known) < plan.min_clients:
        raise CoordinatorError(
            f"plan field job.dataset = {plan.dataset!r}: no enrolled site declares "
            f"this data set; the {len(known)} site(s) heard from declare "
            f"{_declared(known)}, and the {len(enrolled) - len(known)} not heard "
            f"from yet could not make job.min_clients = {plan.min_clients} even if "
            f"they all held it. {NOTHING_SUBMITTED}")
    if len(holders) >= plan.min_clients:
        return []
    who = f" ({_names(holders)})" if holders else ""
    return [f"job.dataset {plan.dataset!r} is declared by {len(holders)} of the "
            f"{len(known)} site(s) heard from{who}, fewer than job.min_clients = "
            f"{plan.min_clients} ({len(enrolled) - len(known)} enrolled site(s) not "
            "heard from yet): unless more sites holding it connect, its rounds wait "
            f"for a cohort and the job fails after {plan.max_failed_attempts} "
            f"attempt(s) of {plan.deadlines.cohort_s:g} s"]


# What the owner of a seeded plan re-run over another set of sites must do: each site
# trains the update it already had summed over the first run's sites, and refuses to
# reveal it over a second set (fedge.agent.guard.RevealLog: the difference of the sums
# would be a site's update). The agents' own words end with it; the failure leads with it.
RESEED_REMEDY = "resubmit the plan with another job.seed (or with none: a fresh one is drawn)"
ALREADY_SUMMED = "UpdateAlreadySummed"


def remedy_first(failure: str, refusals: dict[str, str]) -> str:
    """A failed attempt's reason as it is recorded: ``failure``, led by RESEED_REMEDY when
    a site refused because its update was already summed over another set of sites
    (``refusals``: site -> its reason, fedge.coordinator.rounds.Round.refused)."""
    summed = sorted(s for s, r in refusals.items() if r.startswith(ALREADY_SUMMED))
    if not summed:
        return failure
    return (f"{RESEED_REMEDY}: this plan's seed was run before over another set of sites, "
            f"and {_names(summed)} refused to have the same update summed again over "
            f"this one. {failure}")


def unrecorded_first(failure: str, why: str) -> str:
    """A failed attempt's reason as it is recorded when the survivor set of its
    unmasking could not be recorded (``why``: the database's error): that first, then
    ``failure``, its consequence (the stage deadline passed with nobody asked to
    unmask: "ReconstructionFailed: ... 0 shares given"), without the round's own note
    of the cause at its end (rounds.Round._check_aggregation), said first here."""
    told = f" (no site was asked to unmask: the survivor set could not be recorded: {why})"
    return (f"the survivor set of this attempt's unmasking could not be recorded ({why}), "
            f"so no site was asked to unmask: {failure.replace(told, '')}")


# the phases of an attempt whose cohort was asked to train and that has not ended: a
# coordinator stopped in one records the attempt as interrupted when it resumes the job
_IN_FLIGHT = (Phase.TRAINING, Phase.AGGREGATING, Phase.EVALUATING)

# what a round was doing when its job's cancel cut it short, for the attempt's reason
_CUT_SHORT_IN = {Phase.TRAINING: "training", Phase.AGGREGATING: "being summed",
                 Phase.EVALUATING: "being evaluated", Phase.DONE: "waiting to be committed",
                 Phase.FAILED: "failing"}


def _cancelled_attempt(rnd: Round, reason: str) -> CancelledAttempt | None:
    """The attempt ``rnd`` that its job's cancel cuts short (``reason``: "cancelled by
    ..."), as the rounds table keeps it; None before its cohort was asked to train (no
    site did anything in it). Its reason says which sites had trained: each may have
    released its update (and, under DP, spent ε in its own ledger) with no model to
    show for it."""
    if not rnd.cohort:
        return None
    trained = sorted(rnd.trained)
    return CancelledAttempt(
        round=rnd.round, started_at=rnd.started_at, cohort=list(rnd.cohort),
        reason=m.clip_reason(
            f"job {reason} while the round was {_CUT_SHORT_IN.get(rnd.phase, 'open')}; "
            f"{len(trained)} of {len(rnd.cohort)} site(s) had trained"
            + (f" ({_names(trained)}): an update a site released is charged in its "
               "own privacy ledger (`fedge agent privacy`) though no model came of it"
               if trained else "")),
        dropped_reasons=dict(sorted(rnd.refused.items())),
        survivors=list(rnd.survivors))  # non-empty once the sum was formed


def _left_out_text(left_out: dict[str, str], limit: int = LEFT_OUT_LOGGED) -> str:
    """Who a cohort left out and why, for one log line: the first ``limit`` sites by
    name, each reason as a site's text is kept (:func:`peer_reason`: escaped, its
    middle cut when long: a reason may be a heartbeat's), the rest counted."""
    first = sorted(left_out)[:limit]
    text = "; ".join(f"{site} ({peer_reason(left_out[site])})" for site in first)
    if len(left_out) > len(first):
        text += f"; and {len(left_out) - len(first)} more (jobs status names them)"
    return text


def _names(sites: Sequence[str], limit: int = 5) -> str:
    """"a, b, c" for at most ``limit`` sites, the rest counted."""
    text = ", ".join(sites[:limit])
    return text + (f" and {len(sites) - limit} more" if len(sites) > limit else "")


def _declared(known: dict[str, tuple[str, ...]], limit: int = 10) -> str:
    """The data sets ``known`` sites declare, each with its sites, bounded."""
    by_set: dict[str, list[str]] = {}
    for site, datasets in sorted(known.items()):
        for d in datasets:
            by_set.setdefault(d, []).append(site)
    if not by_set:
        return "no data set"
    names = sorted(by_set)
    text = ", ".join(f"{d!r} ({_names(by_set[d])})" for d in names[:limit])
    return text + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _json(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text) if text else {}
    except (ValueError, RecursionError):  # RecursionError: nested past json's depth
        return {"unparsable": text[:200]}
    return value if isinstance(value, dict) else {"value": value}
