"""The appliance agent's protocol logic: tasks, secure-aggregation client, heartbeats.

:class:`Agent` is transport-agnostic: the process wrapper
(:mod:`fedge.agent.process`) hands it each message from the coordinator
(:meth:`Agent.handle_frames`) and gives it a ``send`` coroutine. Training and
evaluation run in an executor (threads by default), so the event loop — and
with it the heartbeats and the systemd watchdog — never stalls. Many agents
can share one event loop and one executor (the scale benchmark does).

Per round the agent keeps one :class:`_Task`. A new ``TrainTask`` for a job
replaces whatever the agent held (a coordinator that restarted a round after a
crash gets a fresh secure-aggregation session: new keys, never old ones). A task
that is replaced, or whose round is aborted (``RoundAbort``: a job cancelled, a
failed attempt), has its cancel event set: its training stops within one step
(``Trainer.train``'s ``cancel``), sends nothing and releases nothing, training
queued behind it for an abandoned task does not start, and until the worker is free
again heartbeats say ``finishing aborted train <job> round <r>``, so that the next
job's round does not wait out a whole local training that nobody will use.

What the heartbeats' ``current_task`` (the fleet table's TASK) says follows the site
through its round, not just its last task: ``train <job> round <r>`` while it trains,
``awaiting aggregation …`` once its train result left, ``secagg <stage> …`` at each
stage of its secure aggregation (``SECAGG_STAGES``), ``awaiting evaluation …`` once its
update (masked input and shares, or plain) has all left, ``eval …`` while it evaluates,
and nothing once the round is over for it (evaluated, aborted, or given up). Each text
is set before the message that moves the round on leaves, so the coordinator's answer
never finds the text before it; setting it is an assignment (and a STATUS= line), the
heartbeats' own timer is untouched.

A worker that does not come back is a stuck agent, though its event loop runs on
(a torch/OpenMP or CUDA deadlock): every later task would wait behind it.
:meth:`Agent.stuck_worker` names a training still running ``stuck_grace_s``
(``STUCK_TASK_GRACE_S``) after it was cancelled, or any training or evaluation running
past its plan's deadline (``train_s``, ``eval_s``) plus that grace, counted from when
its data set is loaded (a first load, which cannot be cancelled, has its own bound,
``data_load_s``, agent.toml's, ``DATA_LOAD_S`` by default; past half of it a WARNING
names the setting); from then on the
heartbeats say the site is not eligible, and the process stops its watchdog pings so
that systemd restarts it (fedge.agent.process).

What leaves the appliance: heartbeats (version, health, eligibility, data set
names, the privacy ledger's released-run count, the policy's min_cohort), example
counts, metrics, and the masked (or, if the plan disables secure aggregation and the
site's policy allows it, plain) weighted update.
Never data rows.

Durable writes (the privacy ledger's charge, the reveal log's record, the job's plan
digest and SCAFFOLD state) run on one thread of their own (``disk_executor``), never on
the event loop (an fsync on a slow disk stalled the heartbeats past their timeout and
the site dropped out of the round) and never on the task executor (busy training): one
thread keeps them in order. A secure-aggregation message is handled there whole
(``ClientSession.receive``, whose hooks write the ledger and the reveal log before the
masked input or the shares leave), one message at a time per agent.

The agent does not take the coordinator's word for what protects the update
(fedge.agent.guard): it refuses plans and aggregations below the site's
``PrivacyPolicy``, checks the model digest of every task against the weights it
came with, binds the model, plan, weight scale, cohort and SCAFFOLD's c into the
masks' context (``fedge.coordinator.rounds.context_digest``), and reveals the
shares that unmask a sum holding one update over one survivor set only. An EvalTask's
plan meets the policy as a TrainTask's does, and for a job this site trained for it
must be that job's plan (``fedge.agent.guard.plan_digest``, kept per job in
``job_state``); its metrics leave rounded to ``METRIC_DIGITS`` significant digits. A DP-SGD
run is charged in the site's privacy ledger, on disk, just before its update can be
revealed (its masked input, which the other survivors can unmask without it, or a
plain update), not when training ends; and not at all, the update withheld, when the
ε the ledger would then hold breaks the site's DP floor (``PrivacyPolicy.
refuse_release``: unbounded under ``require_dp``, above ``max_epsilon`` or
``max_epsilon_total``). A cap that the ledger meets already, before the run, refuses the
TrainTask at once (``PrivacyPolicy.refuse_spent``): no training for an update that could
never leave; and a spent ``max_epsilon_total`` makes the heartbeats say not eligible.

SCAFFOLD: the server's c stays the example-weighted mean of the sites' c_i
(fedge.coordinator.strategies) only if each c_i moves by exactly the Δc_i that
committed rounds summed. So the clipped Δc_i of a round is kept *pending* (on disk,
before the update can leave, as the privacy ledger is) and c_i does not move when
the round's EvalTask comes: that attempt may still fail, and a site that died after
its masked input left is summed without ever getting one. The coordinator sends a
``ControlCommit`` before each TrainTask of a scaffold job, naming the last committed
round whose sum held this site's Δc_i; the agent adds the pending Δc_i when it is
that round's and drops it otherwise (and drops any c_i an older agent moved for a
round that was not committed with it), then trains from the c_i that results. A
scaffold TrainTask without its ControlCommit (a coordinator that predates it) is
refused. The last round's Δc_i stays pending: no task follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.agent.guard import (
    PrivacyPolicy,
    RevealLog,
    client_dp_cohort,
    plan_digest,
    refuse_threshold,
    task_digest,
    update_digest,
)
from fedge.agent.jobstate import JobStateStore
from fedge.agent.trainer import (
    HELD_JOBS,
    LocalResult,
    RecentJobs,
    TaskRefusal,
    Trainer,
    declared_but_refused,
    without_appliance_paths,
)
from fedge.coordinator.checkpoint import model_digest
from fedge.coordinator.plan import Plan, PlanError, parse_plan
from fedge.coordinator.rounds import SECAGG_PROTOCOL, context_digest
from fedge.coordinator.secure import secagg_config
from fedge.train.accounting import ledger_run
from fedge.update.ab import running_version  # the slot the launcher runs, else fedge's
from fedge.wire import codec
from fedge.wire import messages as m
from fedge.wire.messages import HEALTH_LEDGER_RELEASED as LEDGER_RELEASED
from fedge.wire.messages import HEALTH_MIN_COHORT

log = logging.getLogger("fedge.agent")

SendFn = Callable[[list[Any]], Awaitable[None]]


@dataclass
class _Task:
    job: str
    round: int
    plan: Plan
    weights: np.ndarray
    digest: bytes
    quant_seed: bytes
    task_id: str = ""
    client_control: np.ndarray | None = None  # SCAFFOLD: c_i at the start of the round
    server_control: np.ndarray | None = None  # SCAFFOLD: c as the task brought it
    # fedge.agent.guard.task_digest of what it trains from: the reveal log's task rule
    inputs: bytes | None = None
    local: LocalResult | None = None
    session: Any = None
    started: float = field(default_factory=time.monotonic)
    # set when the round is aborted or the task superseded: training stops within a
    # step (Trainer.train's ``cancel``), and work queued for it is skipped
    cancel: threading.Event = field(default_factory=threading.Event)
    cancelled_at: float | None = None  # monotonic, when ``cancel`` was set
    training: bool = False  # its Trainer.train is queued or running on the executor

    @property
    def finishing(self) -> str:
        """What ``current_task`` says while an abandoned training winds down."""
        return f"finishing aborted {m.TASK_TRAIN} {self.job} round {self.round}"


@dataclass(eq=False)
class _Arriving:
    """A TrainTask whose plan is being parsed (off the event loop), before it becomes
    ``Agent.task``: a RoundAbort for its round in that while marks it, and it is dropped
    once parsed instead of trained."""

    job: str
    round: int
    aborted: bool = False


@dataclass(eq=False)
class _Running:
    """A task running on a worker thread: what it is, since when (monotonic, from when
    the worker took it up), the plan's deadline for it, and the round's task when it can
    be cancelled. ``setting``: the agent.toml key that sets ``deadline_s``, for a bound
    the site sets itself (a data set's load: ``data_load_s``), warned of at half."""

    what: str
    deadline_s: float
    task: _Task | None = None
    started: float = 0.0
    thread: str = ""
    setting: str = ""
    half_warned: bool = False


PROBE_WAIT_S = 0.5  # longest a heartbeat waits for its health probe
# A probe slower than PROBE_WAIT_S is logged once, then summed up at most this often
# (a slow disk made it every heartbeat: ~30 000 lines a day), and once when it recovers.
PROBE_SLOW_LOG_S = 600.0
# How long a worker may run on after its task was cancelled (training stops within one
# step), or past the plan's deadline for it, before the agent counts it stuck: not
# eligible, and no more watchdog pings (systemd restarts the agent).
STUCK_TASK_GRACE_S = 120.0
# How long a task's first load of its data set (``load_data``, before the task's own
# clock starts) may run, plus the stuck grace, before the worker counts as stuck: a large
# image set can take many minutes (500k images of 512x512 about 50 min, measured
# single-threaded), cannot be cancelled, and is lost if the agent is restarted. The
# default of agent.toml's ``data_load_s``.
DATA_LOAD_S = 1800.0
# Significant digits of the evaluation metrics that leave: a loss in float64 turned
# finite differences of chosen weights into a gradient oracle; 6 digits are more than
# any report shows, and cost such an oracle a step of about 1e-6 of the loss.
METRIC_DIGITS = 6
# How long a health verdict stands when the process names no limit: EligibilityPolicy's
# default max_report_age_s (fedge.health is not imported where health is disabled).
HEALTH_MAX_AGE_S = 300.0
# Threads whose name starts with this run the agent's tasks; the process waits for
# them at a stop (fedge.agent.process.wait_for_tasks). The durable-writes thread's name
# starts with it too: a stop lets a write in progress finish.
TASK_THREAD_PREFIX = "fedge-task"
DISK_THREAD_PREFIX = f"{TASK_THREAD_PREFIX}-disk"
# A coordinator that refused DatasetClasses' later fields (tasks, input shapes) is sent
# the class lists alone; the whole message is tried again after this long, since a
# rebuilt coordinator may report the same version (one refusal an hour, not logged).
CLASSES_ONLY_RETRY_S = 3600.0
# What ``current_task`` says at each state of the round's secure-aggregation client
# (fedge.secagg.client.CLIENT_TRANSITIONS): the stage the round is in for this site.
# Its terminal states say AWAITING_EVALUATION (Completed: the shares left) or nothing
# (Aborted: the task is given up).
SECAGG_STAGES = {
    "R0AdvertiseKeys": "advertise keys",
    "R1ShareKeys": "share keys",
    "R2MaskedInput": "masked input",
    "R3ConsistencyCheck": "consistency check",
    "R4Unmasking": "unmasking",
}
# ``current_task`` between this site's train result and its aggregation, and between
# its update leaving and its EvalTask (or the RoundAbort of a sum without it)
AWAITING_AGGREGATION = "awaiting aggregation"
AWAITING_EVALUATION = "awaiting evaluation"


def _refuses_later_class_fields(reason: str) -> tuple[str, ...]:
    """The fields to send DatasetClasses without when a coordinator's Rejected
    ``reason`` is its decoder refusing one of those it gained after 0.2.0 as unknown
    ("UnexpectedField: body.tasks: 'tasks' is not a field of DatasetClasses"): that
    field and every one added after it (a build that lacks one lacks the later ones);
    () for any other reason."""
    refused = f"is not a field of {m.DatasetClasses.__qualname__}"
    later = codec.fields_added_later(m.DatasetClasses)
    if refused not in reason:
        return ()
    for i, name in enumerate(later):
        if reason.startswith(f"{codec.UnexpectedField.__name__}: body.{name}:"):
            return later[i:]
    return ()


def _in_daemon_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], Any],
                      name: str) -> asyncio.Future[Any]:
    """``fn()`` on a daemon thread, its result as a future of ``loop``: a call that
    never returns (a hung driver) cannot hold up the process's exit, as it would on
    an executor's worker."""
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except Exception as e:
            result, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return fut


_SHARED_DISK: list[Executor] = []
_SHARED_DISK_LOCK = threading.Lock()


def _shared_disk_executor() -> Executor:
    """The durable-writes thread of the agents given none (made once)."""
    with _SHARED_DISK_LOCK:
        if not _SHARED_DISK:
            _SHARED_DISK.append(ThreadPoolExecutor(1, thread_name_prefix=DISK_THREAD_PREFIX))
        return _SHARED_DISK[0]


@dataclass
class _JobControls:
    """SCAFFOLD state of one job at this site: c_i by the round it starts, and the
    (round, clipped Δc_i) pending until a ControlCommit, (0, None) when none waits."""

    by_round: dict[int, np.ndarray]
    pending: tuple[int, np.ndarray | None] = (0, None)


class Agent:
    """One appliance's federation client.

    ``identity`` (Ed25519, ``fedge.secagg.keys.Identity``) and ``roster``
    (``fedge.secagg.keys.Roster``) are needed only when a plan enables secure
    aggregation. ``health`` returns (health dict, eligible, reason); a verdict stands
    for ``max_report_age_s`` (the site's ``EligibilityPolicy.max_report_age_s``), and
    until ``health`` first returns the appliance says it is not eligible (without
    ``health``, always eligible). ``held_jobs``: how many jobs' SCAFFOLD c_i stay in
    memory (the ones used last). ``disk_executor``: one thread for the durable writes
    (module doc; its owner shuts it down); without one, the agents of this process share
    one, made on first use (as the scale benchmark's many agents share one loop).

    ``stuck_grace_s``: how long past a cancel or a deadline a worker task may run before
    the agent counts it stuck (:meth:`stuck_worker`). ``data_load_s``: a data set's load
    before a task's own deadline (agent.toml ``data_load_s``; None: ``DATA_LOAD_S``).

    Raises: ValueError: ``max_report_age_s``, ``stuck_grace_s`` or ``data_load_s`` not
        above 0, ``held_jobs`` below 1.
    """

    def __init__(
        self,
        site: str,
        trainer: Trainer,
        *,
        identity: Any = None,
        roster: Any = None,
        roster_key: bytes = b"",
        roster_path: Path | None = None,
        executor: Executor | None = None,
        health: Callable[[], tuple[dict[str, Any], bool, str]] | None = None,
        max_report_age_s: float = HEALTH_MAX_AGE_S,
        max_message_bytes: int = 1 << 30,
        secagg_threads: int = 1,
        job_state: JobStateStore | None = None,
        policy: PrivacyPolicy | None = None,
        reveal_log: RevealLog | None = None,
        held_jobs: int = HELD_JOBS,
        disk_executor: Executor | None = None,
        stuck_grace_s: float = STUCK_TASK_GRACE_S,
        data_load_s: float | None = None,
    ) -> None:
        self.site = site
        # The site's own floor (agent.toml [privacy]); the default requires secure
        # aggregation. The reveal log is in memory unless the process gives it a file.
        self.policy = policy if policy is not None else PrivacyPolicy()
        self.reveal_log = reveal_log if reveal_log is not None else RevealLog()
        self.trainer = trainer
        self.identity = identity
        self.roster = roster
        # A newer console-signed roster from the coordinator replaces ``roster`` (and
        # the file at ``roster_path``) when it verifies under ``roster_key``.
        self.roster_key = roster_key
        self.roster_path = roster_path
        self.executor = executor
        self._disk = disk_executor
        # secure-aggregation messages are handled one at a time (off the loop: their
        # hooks fsync), in the order they came
        self._secagg_turn = asyncio.Lock()
        if not max_report_age_s > 0:
            raise ValueError(f"max_report_age_s={max_report_age_s!r} must be > 0")
        self.health = health or (lambda: ({}, True, ""))
        self.max_report_age_s = max_report_age_s
        if not stuck_grace_s > 0:
            raise ValueError(f"stuck_grace_s={stuck_grace_s!r} must be > 0")
        self.stuck_grace_s = stuck_grace_s
        data_load_s = DATA_LOAD_S if data_load_s is None else data_load_s
        if not data_load_s > 0:
            raise ValueError(f"data_load_s={data_load_s!r} must be > 0")
        self.data_load_s = data_load_s
        self._running: list[_Running] = []  # on the worker threads now
        self._running_lock = threading.Lock()  # the workers add and remove themselves
        self._stuck_logged: _Running | None = None
        self._probe_error_logged = ""  # the health probe's failure last journalled
        self.max_message_bytes = max_message_bytes
        self.secagg_threads = secagg_threads
        self.send_frames: SendFn | None = None
        self.task: _Task | None = None
        self._arriving: list[_Arriving] = []
        self._evaluating: list[tuple[str, int]] = []  # EvalTasks on the executor now
        # called after each message once the agent holds no round (`held_round`): a
        # staged software update restarts then (fedge.agent.updates)
        self.on_idle: Callable[[], None] = lambda: None
        self.last_ack: float | None = None
        self.on_status: Callable[[str], None] = lambda text: None
        self.before_handle: Callable[[codec.Envelope], None] | None = None
        self._busy: str = ""
        # SCAFFOLD's c_i, per job: {round r: c_i at the start of round r} (the latest),
        # and the clipped Δc_i of the last round whose update left, pending until a
        # ControlCommit says whether c holds it (module doc); both written to
        # ``job_state`` whenever they change, so a restarted agent resumes them. Only
        # the ``held_jobs`` jobs used last stay in memory: a job ends without telling the
        # agent (its tasks just stop), and a job that comes back after being dropped
        # here reloads them from ``job_state`` (without one it starts from zeros).
        self.controls = RecentJobs(held_jobs)  # job -> _JobControls, read once a job
        # job -> task_id of the last ControlCommit taken: its TrainTask may train
        self._control_commits = RecentJobs(held_jobs)
        # job -> plan_digest of the plan its last accepted TrainTask brought: an EvalTask
        # for that job is run under that plan only (kept in ``job_state`` as well)
        self._job_plans = RecentJobs(held_jobs)
        self.job_state = job_state
        # The cohort holds only appliances known to be healthy: nothing measured is no
        # verdict, so the heartbeats before the first probe returns say not eligible
        # (without a probe, health is not watched and the constant verdict holds).
        self._health_cache: tuple[dict[str, Any], bool, str] = (
            ({}, False, "health not measured yet") if health is not None else ({}, True, ""))
        self._health_measured: float | None = None  # monotonic, when its probe returned
        # Health probes run on a thread of their own: on ``executor`` they would queue
        # behind a round's training (one worker by default) and the heartbeat with them.
        # The probe's future holds its verdict and when (monotonic) the probe returned.
        self._probe: asyncio.Future[tuple[tuple[dict[str, Any], bool, str], float]] | None = None
        self._probe_started = 0.0  # monotonic
        self._probe_overdue_logged = False
        self._probe_slow = 0  # heartbeats since the last log line whose probe was late
        self._probe_slow_logged: float | None = None  # monotonic; None: probes are in time
        # The coordinator's version from its last HeartbeatAck, and the version of one
        # that refused DatasetClasses as an unknown type (the previous release): not
        # sent to it again until its version changes (fedge.wire.messages.DatasetClasses).
        self._coordinator_version: str | None = None
        self._classes_unknown_to: str | None = None
        self._classes_refused = False
        # The coordinator version that refused one of DatasetClasses' fields added after
        # 0.2.0 (UnexpectedField: a build before it), when (monotonic), and the fields
        # it is sent without (that one and the later ones), the form it reads, until
        # its version changes or CLASSES_ONLY_RETRY_S pass; and the (version, fields)
        # whose refusal was logged.
        self._classes_only_for: tuple[str | None, float, tuple[str, ...]] | None = None
        self._classes_only_logged: set[tuple[str | None, tuple[str, ...]]] = set()
        # the (classes, tasks, input shapes) last found too large to send (not tried
        # again while unchanged)
        self._classes_unsendable: tuple[Any, ...] | None = None
        # (released runs in the privacy ledger, :meth:`budget_spent`'s answer for them)
        self._budget_spent_cache: tuple[int, str] | None = None

    # -- outgoing -------------------------------------------------------------------

    async def send(self, body: Any, *, job: str = "", round: int = 0) -> None:
        if self.send_frames is None:
            raise RuntimeError("agent has no link to the coordinator")
        await self.send_frames(codec.encode(body, sender=self.site, job=job, round=round))

    async def heartbeat(self) -> None:
        """Send a heartbeat with a fresh health report: the probe runs on its own
        thread; one still running after ``PROBE_WAIT_S`` (a hung NVML call) is left to
        finish for a later heartbeat, and until then heartbeats carry the last report
        without waiting, eligible for ``max_report_age_s`` at most (see
        :meth:`_health_verdict`)."""
        loop = asyncio.get_running_loop()
        wait = 0.0  # a probe already late for an earlier heartbeat delays no other
        if self._probe is None:
            self._probe = _in_daemon_thread(loop, self._measure, "fedge-health")
            self._probe_started = time.monotonic()
            self._probe_overdue_logged = False
            wait = PROBE_WAIT_S
        probe = self._probe
        if wait:
            await asyncio.wait([probe], timeout=wait)
        if probe.done():
            self._probe = None
            try:
                self._health_cache, self._health_measured = probe.result()
            except Exception as exc:  # a broken probe must not silence the heartbeat
                # the coordinator keeps the reason: the kind, no path; the whole error
                # in this site's journal, once for as long as it stays the same
                error = without_appliance_paths(f"{type(exc).__name__}: {exc}")
                if self._probe_error_logged != str(exc):
                    self._probe_error_logged = str(exc)
                    log.warning("%s: health probe failed: %s: %s", self.site,
                                type(exc).__name__, exc)
                self._health_cache = ({"error": error}, False, f"health probe failed: {error}")
                self._health_measured = time.monotonic()
            if wait and self._probe_slow_logged is not None:
                log.info("%s: health probe answers within %.1f s again (late %d more "
                         "time(s) since the last report)", self.site, PROBE_WAIT_S,
                         self._probe_slow)
                self._probe_slow, self._probe_slow_logged = 0, None
        elif wait:
            self._log_slow_probe(time.monotonic())
        report, eligible, reason = self._health_verdict(time.monotonic())
        stuck = self.stuck_worker()
        if stuck:
            eligible, reason = False, f"worker stuck: {stuck}"
        later = dict(zip(("tasks", "input_shapes"), self.declared_inputs(), strict=True),
                     standardise=self.declared_standardise())
        for name in self._fields_left_out(time.monotonic()):
            later[name] = {}  # left at its default, the codec leaves it out
        declared = (self.declared_classes(), *later.values())
        if any(declared) and not self._classes_refused \
                and declared != self._classes_unsendable:
            try:  # first: with the heartbeat they stand
                await self.send(m.DatasetClasses(classes=declared[0], **later))
            except (ValueError, codec.WireError) as exc:  # beyond the message's bounds:
                # nothing was sent (send encodes first); said once, the heartbeat goes
                self._classes_unsendable = declared
                log.error("%s: class lists not sent (%s): this site is left out of jobs "
                          "whose sites declare classes", self.site, exc)
        released = self._ledger_released()
        if released is not None:  # the coordinator's check for a ledger rolled back
            report = {**report, LEDGER_RELEASED: released}
        # the privacy floor, so the coordinator invites this site only to rounds of at
        # least that many sites, not to train for a sum it would then refuse
        report = {**report, HEALTH_MIN_COHORT: self.policy.min_cohort}
        await self.send(m.Heartbeat(
            site=self.site, version=running_version(),
            health_json=json.dumps(report, default=str),
            eligible=eligible, reason=reason, datasets=self.trainer.datasets(),
            current_task=self._busy, secagg_protocol=SECAGG_PROTOCOL))

    def _ledger_released(self) -> int | None:
        """The released runs in this site's privacy ledger, for the heartbeat's health
        report (fedge.coordinator.cohort, LEDGER_RELEASED): the coordinator keeps the
        most it has seen and leaves the site out of jobs when it reports fewer (its
        disk restored from an older backup). None without a ledger, or while a release
        is being saved (a save that fails takes the entry back: the count read then
        could fall again), so that heartbeat goes without it."""
        ledger = getattr(self.trainer, "privacy_ledger", None)
        return None if ledger is None else ledger.settled_released_count()

    def _log_slow_probe(self, now: float) -> None:
        """A heartbeat went without waiting for its probe: said once, then summed up
        every ``PROBE_SLOW_LOG_S`` while it goes on."""
        self._probe_slow += 1
        if self._probe_slow_logged is None:
            log.warning("%s: health probe still running after %.1f s; heartbeats go with "
                        "the last report until it ends (said again every %.0f min while "
                        "it goes on)", self.site, PROBE_WAIT_S, PROBE_SLOW_LOG_S / 60)
        elif now - self._probe_slow_logged >= PROBE_SLOW_LOG_S:
            log.warning("%s: health probe still slower than %.1f s: %d time(s) in the last "
                        "%.0f min", self.site, PROBE_WAIT_S, self._probe_slow,
                        (now - self._probe_slow_logged) / 60)
        else:
            return
        self._probe_slow, self._probe_slow_logged = 0, now

    def declared_classes(self) -> dict[str, list[str]]:
        """Each held data set's class list in label order (agent.toml ``classes``),
        for those that declare one."""
        names = getattr(self.trainer, "class_names", None)
        if names is None:  # a trainer without class lists (SyntheticTrainer)
            return {}
        out = {}
        for name in self.trainer.datasets():
            classes = names(name)
            if classes:
                out[name] = list(classes)
        return out

    def declared_inputs(self) -> tuple[dict[str, str], dict[str, list[int]]]:
        """(task, input shape) of each held data set, as its agent.toml table declares
        them (no data is read): the task (``datasets.task``), and the shape of one
        example as the models take it, ``[features]`` for a table (its declared
        ``features``; FLamby's 39 for fed_tcga_brca without them), ``[1, image_size,
        image_size]`` for images (loaded single-channel). A numpy data set's shape is
        known only once its file is read: absent. The coordinator refuses at submission
        a plan whose model these rule out (fedge.coordinator.service)."""
        from fedge.train.data import FED_TCGA_BRCA_FEATURES

        # TorchTrainer's parsed [[datasets]] tables; a trainer without them
        # (SyntheticTrainer) declares nothing
        dataset_spec = getattr(self.trainer, "dataset_spec", None)
        tasks: dict[str, str] = {}
        shapes: dict[str, list[int]] = {}
        if dataset_spec is None:
            return tasks, shapes
        for name in self.trainer.datasets():
            spec = dataset_spec(name)
            if spec is None:
                continue
            tasks[name] = spec.task
            if spec.kind == "tabular" and spec.features:
                shapes[name] = [len(spec.features)]
            elif spec.kind == "fed_tcga_brca":
                shapes[name] = [len(spec.features or FED_TCGA_BRCA_FEATURES)]
            elif spec.kind == "images":
                shapes[name] = [1, spec.image_size, spec.image_size]
        return tasks, shapes

    def declared_standardise(self) -> dict[str, str]:
        """How each held data set's features are standardised here (agent.toml
        ``datasets.standardise``; images: "none", they are not), for the coordinator
        to refuse at submission a DP-SGD plan that this site would refuse for
        constants fitted on its own rows (:func:`fedge.agent.trainer.
        refuse_fitted_standardisation`). A numpy data set with a fitted mode is
        absent: whether it is standardised is known only once its file is read (a
        table is; images are not)."""
        from fedge.train.data import FITTED_STANDARDISE_MODES

        dataset_spec = getattr(self.trainer, "dataset_spec", None)
        out: dict[str, str] = {}
        if dataset_spec is None:  # SyntheticTrainer: declares nothing
            return out
        for name in self.trainer.datasets():
            spec = dataset_spec(name)
            if spec is None:
                continue
            if spec.kind == "images":
                out[name] = "none"
            elif spec.kind in ("tabular", "fed_tcga_brca") \
                    or spec.standardise not in FITTED_STANDARDISE_MODES:
                out[name] = spec.standardise
        return out

    def _classes_refusal(self, plan: Plan) -> str:
        """Why this site cannot run ``plan`` for its class order ("" when it can): the
        plan's ``job.classes`` differs from the list this site declares for the data
        set (its labels would be summed mixed up with the other sites')."""
        if not plan.classes:
            return ""
        own = self.declared_classes().get(plan.dataset)
        if own is None:
            return (f"the plan's job.classes {list(plan.classes)} names classes for data set "
                    f"{plan.dataset!r}, which declares none at {self.site} (agent.toml "
                    "datasets.classes)")
        if tuple(own) != plan.classes:
            return (f"the plan's job.classes {list(plan.classes)} differs from the classes "
                    f"{own} that {self.site} declares for data set {plan.dataset!r} in "
                    "agent.toml (datasets.classes, label order): its labels would be summed "
                    "mixed up with the other sites'; fix the order in agent.toml or the plan")
        return ""

    def _measure(self) -> tuple[tuple[dict[str, Any], bool, str], float]:
        """The probe's verdict and the moment it was decided: the probe decides as
        soon as it has collected, and the heartbeat that takes it up may come later.
        A privacy ledger at or above ``max_epsilon_total`` makes a healthy site not
        eligible (no DP job can release here: :meth:`budget_spent`)."""
        report, eligible, reason = self.health()
        if eligible:
            spent = self.budget_spent()
            if spent:
                eligible, reason = False, spent
        return (report, eligible, reason), time.monotonic()

    def budget_spent(self) -> str:
        """'privacy budget spent: epsilon X >= max_epsilon_total Y ...' when the ε of
        every job in this site's ledger meets its ``max_epsilon_total``, else ''.
        Computed again only when the ledger's released runs change (on the probe's
        thread: the accountant can take seconds)."""
        ledger = getattr(self.trainer, "privacy_ledger", None)
        if ledger is None or self.policy.max_epsilon_total is None:
            return ""
        released = ledger.released_count()
        held = self._budget_spent_cache
        if held is None or held[0] != released:
            try:
                spent = self._spent(None)
            except ValueError as exc:  # the ledger cannot be read as it stands
                log.error("%s: privacy ledger's epsilon not computed: %s", self.site, exc)
                return ""
            total, without_dp = (spent[1], spent[2]) if spent is not None else (None, [])
            held = self._budget_spent_cache = (
                released, self.policy.budget_spent(total, without_dp))
        return held[1]

    def _health_verdict(self, now: float) -> tuple[dict[str, Any], bool, str]:
        """The cached (report, eligible, reason), unless it is too old to stand.

        A verdict was decided when its report was collected, so it stands for
        ``max_report_age_s`` from the moment its probe returned; and a probe running
        longer than that (an NVML call stuck after the GPU fell off the bus, say) makes
        the appliance ineligible until it returns, rather than leave the last good
        verdict standing for as long as the call hangs."""
        report, eligible, reason = self._health_cache
        limit = self.max_report_age_s
        running = now - self._probe_started if self._probe is not None else 0.0
        if running > limit:
            reason = (f"health probe has not returned for {running:.1f} s "
                      f"(limit {limit:g} s): a hung NVML call?")
            if not self._probe_overdue_logged:
                self._probe_overdue_logged = True
                log.error("%s: %s; not eligible until it returns", self.site, reason)
            return report, False, reason
        if eligible and self._health_measured is not None:
            age = now - self._health_measured
            if age > limit:
                return report, False, (f"health report is {age:.1f} s old "
                                       f"(limit {limit:g} s)")
        return report, eligible, reason

    # -- incoming -------------------------------------------------------------------

    async def handle_frames(self, frames: list[Any]) -> None:
        try:
            # the list is this call's (run_agent passes a copy): a chunked model's
            # frames are freed as they are copied, not held through training
            env = codec.decode(frames, max_bytes=self.max_message_bytes,
                               release_frames=isinstance(frames, list))
        except codec.WireError as exc:
            log.warning("%s: dropped a malformed message from the coordinator: %s",
                        self.site, exc)
            return
        except Exception as exc:  # the decoder failing on hostile input is still input
            log.warning("%s: dropped a message from the coordinator that could not be "
                        "decoded (%s)", self.site, type(exc).__name__)
            return
        try:
            await self.handle(env)
        except Exception:  # logged here, not lost in an unawaited task; the agent goes on
            log.exception("%s: internal error handling %s from the coordinator", self.site,
                          env.header.type)
        if self.held_round() is None:
            self.on_idle()

    def held_round(self) -> tuple[str, int] | None:
        """The (job, round) this agent is working for: a task held from its TrainTask
        (or its plan being read) to its evaluation, an EvalTask running; None between
        rounds and jobs, the only time a restart loses nothing. A task abandoned (its
        round aborted, superseded, or its aggregation refused by this site: nothing more
        comes of it) is not held, though its worker may still wind down."""
        if self.task is not None and not self.task.cancel.is_set():
            return self.task.job, self.task.round
        for job, rnd in [*((a.job, a.round) for a in self._arriving), *self._evaluating]:
            return job, rnd
        return None

    def _fields_left_out(self, now: float) -> tuple[str, ...]:
        """The later fields DatasetClasses goes without: those the coordinator refused
        (one, and the ones added after it), while its version is still the one that
        did and CLASSES_ONLY_RETRY_S have not passed since; () otherwise."""
        if self._classes_only_for is None:
            return ()
        version, since, fields = self._classes_only_for
        if version != self._coordinator_version or now - since > CLASSES_ONLY_RETRY_S:
            self._classes_only_for = None
            return ()
        return fields

    async def handle(self, env: codec.Envelope) -> None:
        if self.before_handle is not None:
            self.before_handle(env)
        body, job, rnd = env.body, env.header.job, env.header.round
        if isinstance(body, m.HeartbeatAck):
            self.last_ack = time.monotonic()
            self._coordinator_version = body.coordinator_version
            self._classes_refused = (self._classes_unknown_to is not None
                                     and self._classes_unknown_to == body.coordinator_version)
        elif isinstance(body, m.ControlCommit):
            await self._on_control_commit(job, rnd, body)
        elif isinstance(body, m.TrainTask):
            await self._on_train(job, rnd, body)
        elif isinstance(body, m.AggregateBegin):
            await self._on_aggregate(job, rnd, body)
        elif m.is_secagg(body):
            await self._on_secagg(job, rnd, body)
        elif isinstance(body, m.EvalTask):
            await self._on_eval(job, rnd, body)
        elif isinstance(body, m.RoundAbort):
            arriving = [a for a in self._arriving if (a.job, a.round) == (job, rnd)]
            for a in arriving:
                a.aborted = True
            if arriving or self._current(job, rnd):
                log.info("%s: round %s/%d aborted: %s", self.site, job, rnd,
                         codec.short(body.reason, 300))
            if self._current(job, rnd):
                assert self.task is not None
                self._abandon(self.task)
                self.task = None
        elif isinstance(body, m.Rejected):
            if body.reason.startswith("UnknownMessageType") \
                    and repr(m.DatasetClasses.__wire_type__) in body.reason:
                # a coordinator before DatasetClasses: it still takes our heartbeats
                self._classes_unknown_to = self._coordinator_version
                self._classes_refused = True
                log.info("%s: the coordinator (%s) does not take class lists; not sent "
                         "until its version changes", self.site,
                         self._coordinator_version or "version not known yet")
                return
            fields = _refuses_later_class_fields(body.reason)
            if fields:
                self._classes_only_for = (self._coordinator_version, time.monotonic(),
                                          fields)
                key = (self._coordinator_version, fields)
                logged = key in self._classes_only_logged
                self._classes_only_logged.add(key)
                if fields != ("standardise",):
                    what = ("the data sets' tasks and input shapes", "it is sent the class "
                            "lists alone, and plans are not checked against the data there")
                else:
                    what = ("the data sets' standardisation", "it is sent the rest, and "
                            "DP-SGD plans are not checked against it there")
                log.log(logging.DEBUG if logged else logging.WARNING,
                        "%s: the coordinator (%s) refused %s (%s): a build before them; %s",
                        self.site, self._coordinator_version or "version not known yet",
                        what[0], codec.short(body.reason, 200), what[1])
                return
            log.warning("%s: coordinator rejected a message: %s", self.site,
                        codec.short(body.reason, 300))
        elif isinstance(body, m.RosterUpdate):
            self._on_roster(body.roster)
        else:
            log.warning("%s: ignoring unexpected %s", self.site, env.header.type)

    def _on_roster(self, data: bytes) -> bool:
        """Take a newer roster the console signed (sites enrolled or revoked since this
        appliance's enrolment). Refused, with the reason logged, and the roster in
        force kept: one that does not verify under the console key trusted at
        enrolment, an older serial (a replay that could bring back a revoked
        identity), or one without this site under its own identity. Returns whether
        it was taken."""
        from fedge.secagg.keys import Roster, RosterSignatureError

        if not self.roster_key or self.identity is None:
            log.warning("%s: roster update ignored: no trusted roster key", self.site)
            return False
        try:
            new = Roster.from_bytes(data, self.roster_key)
        except RosterSignatureError as exc:
            log.error("%s: roster update refused: %s", self.site, exc)
            return False
        held = getattr(self.roster, "serial", 0) if self.roster is not None else -1
        if new.serial <= held:
            if new.serial < held:
                log.error("%s: roster update refused: serial %d is older than the roster "
                          "in force (%d)", self.site, new.serial, held)
            return False
        if new.entries.get(self.site) != self.identity.public_bytes():
            log.error("%s: roster update refused: serial %d does not hold this site with "
                      "its identity (revoked or re-enrolled?)", self.site, new.serial)
            return False
        if self.roster_path is not None:
            from fedge.update.files import write_atomic

            try:
                write_atomic(self.roster_path, bytes(data))
            except OSError as exc:  # in force anyway; a restart gets it again on connecting
                log.error("%s: roster serial %d not kept in %s: %s", self.site, new.serial,
                          self.roster_path, exc)
        self.roster = new
        log.info("%s: roster serial %d in force: %d site(s)", self.site, new.serial,
                 len(new.entries))
        return True

    def _current(self, job: str, rnd: int) -> bool:
        return self.task is not None and (self.task.job, self.task.round) == (job, rnd)

    def _set_busy(self, text: str) -> None:
        self._busy = text
        self.on_status(text or "idle")

    def _on_disk(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the durable-writes thread (module doc), in the order of the
        calls; its result, or what it raised, as a future of the running loop."""
        if self._disk is None:
            self._disk = _shared_disk_executor()
        return asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    async def _on_worker(self, what: str, deadline_s: float, fn: Callable[[], Any],
                         task: _Task | None = None, dataset: str = "",
                         job: str | None = None) -> Any:
        """``fn()`` on the task executor, watched from when a worker takes it up until
        it returns (:meth:`stuck_worker`). ``dataset``: loaded first, as job ``job``
        uses it (the trainer's ``load_data``, where it has one: a job that holds its
        version already costs nothing there, neither a look at the source nor a
        re-read), under its own bound ``data_load_s``: the plan's deadline for the task
        counts from when it is loaded.
        Raises: what ``fn`` (or the load) raises."""
        entry = _Running(what, deadline_s, task)
        load = getattr(self.trainer, "load_data", None) if dataset else None
        if load is not None and job is not None:
            load = functools.partial(load, job=job)

        def run() -> Any:
            if load is not None and not (task is not None and task.cancel.is_set()):
                loading = _Running(f"loading data set {dataset!r} for {what}",
                                   self.data_load_s, None, time.monotonic(),
                                   threading.current_thread().name, setting="data_load_s")
                with self._watched(loading):
                    load(dataset)
            entry.started = time.monotonic()
            entry.thread = threading.current_thread().name
            with self._watched(entry):
                return fn()

        return await asyncio.get_running_loop().run_in_executor(self.executor, run)

    @contextlib.contextmanager
    def _watched(self, entry: _Running) -> Iterator[None]:
        """``entry`` among the running tasks :meth:`stuck_worker` watches, meanwhile."""
        with self._running_lock:
            self._running.append(entry)
        try:
            yield
        finally:
            with self._running_lock:
                self._running.remove(entry)

    def stuck_worker(self, now: float | None = None) -> str:
        """Why a worker thread counts as stuck, '' when none does: a training still
        running ``stuck_grace_s`` after it was cancelled (it checks the cancel before
        every step), or a training or evaluation running past its plan's deadline plus
        ``stuck_grace_s``. Logged at ERROR once per stuck task, and once more, at
        WARNING, if it comes back."""
        now = time.monotonic() if now is None else now
        grace = self.stuck_grace_s
        with self._running_lock:  # the heartbeats and the watchdog's thread both ask
            running = list(self._running)
            halfway = [e for e in running if e.setting and not e.half_warned
                       and now - e.started > e.deadline_s / 2]
            for e in halfway:
                e.half_warned = True
        for e in halfway:  # a bound the site sets itself: said while there is time
            log.warning("%s: %s has run %.0f s, past half of its limit (agent.toml %s = "
                        "%g s): past the limit plus %g s the agent counts itself stuck and "
                        "systemd restarts it, the load lost; raise %s if it needs longer",
                        self.site, e.what, now - e.started, e.setting, e.deadline_s, grace,
                        e.setting)
        stuck, why = None, ""
        for e in running:
            ran = now - e.started
            cancelled = e.task.cancelled_at if e.task is not None else None
            since = now - max(cancelled, e.started) if cancelled is not None else 0.0
            if since > grace:
                stuck, why = e, (f"{e.what} still running on {e.thread} {since:.1f} s after "
                                 f"it was cancelled (grace {grace:g} s), {ran:.1f} s in all")
                break
            if ran > e.deadline_s + grace:
                stuck, why = e, (f"{e.what} running on {e.thread} for {ran:.1f} s, past its "
                                 f"deadline of {e.deadline_s:g} s plus {grace:g} s")
                if e.setting:
                    why += f" (agent.toml {e.setting} sets that deadline)"
                break
        if stuck is not None and stuck is not self._stuck_logged:
            self._stuck_logged = stuck
            log.error("%s: worker stuck: %s; this site says it is not eligible until it "
                      "returns", self.site, why)
        elif stuck is None and self._stuck_logged is not None \
                and self._stuck_logged not in running:
            log.warning("%s: the stuck worker task (%s) returned", self.site,
                        self._stuck_logged.what)
            self._stuck_logged = None
        return why

    def _abandon(self, task: _Task) -> None:
        """``task`` is no longer the agent's (its round aborted, or another task took
        its place): its training stops within a step and queued work for it is
        skipped; while its thread winds down, heartbeats say so."""
        if task.cancelled_at is None:
            task.cancelled_at = time.monotonic()
        task.cancel.set()
        if self.task is task:
            self._set_busy(task.finishing if task.training else "")

    def _give_up(self, task: _Task) -> None:
        """This site refused ``task``'s aggregation: nothing more comes of the task (the
        coordinator sums without it, and sends an EvalTask, which needs no task, if its
        masked input was summed anyway), so the agent no longer holds its round
        (:meth:`held_round`: a staged software update need not wait for it)."""
        if self.task is task:
            self._abandon(task)
            self.task = None

    async def _refuse(self, job: str, rnd: int, task: str, reason: str, task_id: str) -> None:
        # the reason may quote the coordinator's plan or messages: escaped for the log
        log.warning("%s: refusing %s for %s/%d: %s", self.site, task, job, rnd,
                    codec.printable(reason))
        if not self._busy:  # idle, but not for nothing: the status names why
            self.on_status(f"refused {task} {job} round {rnd}: {codec.short(reason, 160)}")
        await self.send(m.TaskRefused(task_id=task_id, task=task, reason=reason), job=job,
                        round=rnd)

    async def _plan(self, text: str, arriving: _Arriving | None = None) -> Plan | None:
        """parse_plan off the event loop: its first parse of a DP plan runs the privacy
        accountant, seconds on a loaded machine, and heartbeats must keep flowing.
        None, unparsed, when ``arriving`` was aborted while the parse waited for the
        worker (behind an abandoned training, say).

        Raises: PlanError, as parse_plan."""
        def parse() -> Plan | None:
            return None if arriving is not None and arriving.aborted else parse_plan(text)
        return await asyncio.get_running_loop().run_in_executor(self.executor, parse)

    def _spent(self, job: str | None) -> tuple[float, float | None, list[str]] | None:
        """(ε of ``job``, ε of every job or None when ``max_epsilon_total`` is not set,
        jobs released without DP) as the trainer's privacy ledger holds them now, at the
        policy's ``budget_delta``; None when no ε cap is set or the trainer keeps no
        ledger (SyntheticTrainer). The accountant can take seconds: off the event loop."""
        ledger = getattr(self.trainer, "privacy_ledger", None)
        if ledger is None or not self.policy.caps:
            return None
        delta = self.policy.budget_delta
        total = (ledger.epsilon(delta) if self.policy.max_epsilon_total is not None
                 else None)
        return (ledger.epsilon(delta, job=job) if job is not None else 0.0, total,
                ledger.without_dp())

    async def _budget_refusal(self, job: str) -> str | None:
        """Why a TrainTask of ``job`` is refused, this site's ε caps being met already
        by its ledger as it stands (``PrivacyPolicy.refuse_spent``), or None."""
        if not self.policy.caps or getattr(self.trainer, "privacy_ledger", None) is None:
            return None
        try:
            spent = await asyncio.get_running_loop().run_in_executor(
                self.executor, self._spent, job)
        except ValueError as exc:  # checked again, with the run, before it is released
            log.error("%s: privacy ledger's epsilon not computed: %s", self.site, exc)
            return None
        if spent is None:
            return None
        job_epsilon, total, without_dp = spent
        return self.policy.refuse_spent(job=job, job_epsilon=job_epsilon,
                                        total_epsilon=total, without_dp=without_dp)

    async def _on_train(self, job: str, rnd: int, t: m.TrainTask) -> None:
        # The task is this round's before its plan is parsed: a RoundAbort that comes
        # meanwhile must stop it, or the aborted attempt would train to the end on the
        # one worker and send a TrainDone nobody waits for.
        arriving = _Arriving(job, rnd)
        self._arriving.append(arriving)
        if self.task is not None:
            # superseded now, not once this plan is parsed: the parse waits for the one
            # worker, which an abandoned training would hold to its end
            self._abandon(self.task)
        try:
            plan = await self._plan(t.plan, arriving)
            spent = await self._budget_refusal(job) if plan is not None else None
        except PlanError as exc:
            if not arriving.aborted:
                await self._refuse(job, rnd, m.TASK_TRAIN, f"unrunnable plan: {exc}",
                                   t.task_id)
            return
        finally:
            self._arriving.remove(arriving)
        if arriving.aborted or plan is None:
            log.info("%s: task %s for %s/%d dropped: its round was aborted while its plan "
                     "was read", self.site, codec.short(t.task_id, 80), job, rnd)
            return
        refused = (self.policy.refuse_plan(plan.secagg.enabled, plan.privacy,
                                           rounds=plan.rounds)
                   or spent or self._classes_refusal(plan))
        if refused:
            await self._refuse(job, rnd, m.TASK_TRAIN, refused, t.task_id)
            return
        if plan.dataset not in self.trainer.datasets():
            why = self.trainer.unusable.get(plan.dataset)  # declared, its table refused
            await self._refuse(job, rnd, m.TASK_TRAIN,
                               declared_but_refused(plan.dataset, why) if why is not None
                               else f"data set {plan.dataset!r} is not held by {self.site}",
                               t.task_id)
            return
        if plan.secagg.enabled and (self.identity is None or self.roster is None):
            await self._refuse(job, rnd, m.TASK_TRAIN,
                               "secure aggregation needs an enrolled identity and roster",
                               t.task_id)
            return
        kwargs: dict[str, Any] = {}
        if plan.scaffold:
            control = None if t.server_control is None else np.array(t.server_control,
                                                                      dtype=np.float32)
            if control is None or control.shape != np.shape(t.weights):
                await self._refuse(job, rnd, m.TASK_TRAIN,
                                   f"scaffold task without a server control variate of "
                                   f"length {np.size(t.weights)}", t.task_id)
                return
            if self._control_commits.touch(job) != t.task_id:
                await self._refuse(job, rnd, m.TASK_TRAIN,
                                   "scaffold task without its ControlCommit (which of this "
                                   "site's control variate updates the server's c holds): "
                                   "the coordinator predates it; update the coordinator",
                                   t.task_id)
                return
            kwargs = {"server_control": control, "client_control": self.client_control(job, rnd)}
        weights = np.array(t.weights, dtype=np.float32)  # own copy: frames are read-only
        if bytes.fromhex(model_digest(weights)) != bytes(t.model_digest):
            await self._refuse(job, rnd, m.TASK_TRAIN,
                               "the task's model digest does not match the weights it "
                               "carries", t.task_id)
            return
        plan_kept = self._keep_job_plan(job, t.plan)
        task = _Task(job, rnd, plan, weights, bytes(t.model_digest), bytes(t.quant_seed),
                     t.task_id, kwargs.get("client_control"), kwargs.get("server_control"),
                     task_digest(job=job, round=rnd, plan=t.plan,
                                 model_digest=bytes(t.model_digest), train_seed=t.train_seed,
                                 server_control=kwargs.get("server_control")))
        if self.task is not None:  # superseded (another TrainTask came meanwhile)
            self._abandon(self.task)
        self.task = task
        self._set_busy(f"{m.TASK_TRAIN} {job} round {rnd}")
        task.training = True
        try:
            result = await self._on_worker(
                f"{m.TASK_TRAIN} {job} round {rnd}", plan.deadlines.train_s,
                lambda: self.trainer.train(self.site, job, plan, weights, round=rnd,
                                           seed=t.train_seed, cancel=task.cancel,
                                           task_id=t.task_id or None, **kwargs),
                task, dataset=plan.dataset, job=job)
        except Exception as exc:
            if task.cancel.is_set():  # abandoned meanwhile: nobody waits for an answer
                log.info("%s: training for %s/%d stopped: its round was aborted or the task "
                         "superseded (%s)", self.site, job, rnd, codec.short(str(exc), 200))
                return
            if not isinstance(exc, TaskRefusal):  # unforeseen: answer anyway, or the
                # round waits train_s; the details stay in this site's journal
                log.exception("%s: local training for %s/%d failed", self.site, job, rnd)
            if self.task is task:
                self.task = None
                self._set_busy("")
                await self._refuse(job, rnd, m.TASK_TRAIN, str(exc)
                                   if isinstance(exc, TaskRefusal) else
                                   f"local training failed: internal error "
                                   f"({type(exc).__name__}; see the site's journal)",
                                   t.task_id)
            return
        finally:
            task.training = False
            if self._busy == task.finishing:  # the worker is free again
                self._set_busy("")
        if self.task is not task or task.cancel.is_set():  # superseded or aborted
            return
        if plan.scaffold and (result.delta_control is None
                              or result.delta_control.shape != weights.shape):
            self.task = None
            self._set_busy("")
            await self._refuse(job, rnd, m.TASK_TRAIN,
                               "scaffold training returned no control variate update",
                               t.task_id)
            return
        if not 1 <= result.n_examples <= m.MAX_EXAMPLES:  # TrainDone's own range
            self.task = None
            self._set_busy("")
            await self._refuse(job, rnd, m.TASK_TRAIN,
                               f"trained on {result.n_examples} examples; a train result "
                               f"needs 1..{m.MAX_EXAMPLES}", t.task_id)
            return
        if plan_kept is not None:  # the plan digest is on disk before a result leaves
            not_kept = await plan_kept
            if self.task is not task or task.cancel.is_set():
                return
            if not_kept:
                # without it on disk, a restart would forget which plan this update
                # was trained under, and evaluate the job under another: withheld, as
                # a SCAFFOLD control that cannot be kept is (_hold_control). Forgotten
                # in memory too, so the next TrainTask tries the write again.
                if self._job_plans.touch(job) == plan_digest(t.plan):
                    self._job_plans.pop(job, None)
                self.task = None
                self._set_busy("")
                await self._refuse(job, rnd, m.TASK_TRAIN, not_kept, t.task_id)
                return
        task.local = result
        # before it leaves: the AggregateBegin it brings must find the text it replaces
        self._set_busy(f"{AWAITING_AGGREGATION} {job} round {rnd}")
        await self.send(m.TrainDone(task_id=task.task_id, n_examples=result.n_examples,
                                    metrics=result.metrics, epsilon=result.epsilon),
                        job=job, round=rnd)

    def _keep_job_plan(self, job: str, text: str) -> asyncio.Future[str] | None:
        """Remember (in memory now, and in ``job_state`` on the durable-writes thread)
        that this site trains ``job`` under the plan ``text``: its EvalTasks must bring
        the same plan. Returns the write, None when none: its result is '' once the
        digest is on disk, else why it could not be kept (logged; the update trained
        under it may then not leave: a restart would forget the plan)."""
        digest = plan_digest(text)
        if self._job_plans.touch(job) == digest:
            return None
        self._job_plans.pop(job, None)
        self._job_plans.hold(job, digest)
        store = self.job_state
        if store is None:
            return None

        def save() -> str:
            try:
                store.save(job, "plan", {"digest": np.frombuffer(digest, np.uint8)})
            except OSError as exc:  # a restart would forget it: the update is withheld
                log.error("%s: job %s: its plan's digest not saved: %s", self.site, job, exc)
                # the coordinator keeps the reason: no path in it
                return ("cannot record the plan this job is trained under (its "
                        "evaluations are held to it, also after a restart): "
                        f"{without_appliance_paths(str(exc))}")
            return ""

        return self._on_disk(save)

    def job_plan(self, job: str) -> bytes | None:
        """``plan_digest`` of the plan this site last trained ``job`` under (from
        ``job_state`` when it is no longer held in memory), or None: never trained here."""
        held: bytes | None = self._job_plans.touch(job)
        if held is None and self.job_state is not None:
            saved = self.job_state.load(job, "plan").get("digest")
            if saved is not None and saved.dtype == np.uint8 and saved.size == 32:
                held = self._job_plans.hold(job, saved.tobytes())
        return held

    def client_control(self, job: str, rnd: int) -> np.ndarray | None:
        """SCAFFOLD's c_i for round ``rnd`` of ``job`` (None: zeros, never moved).

        The value at the start of the latest round <= ``rnd``: c_i as the committed
        rounds the agent has been told of (ControlCommit) left it; a pending Δc_i
        (:meth:`pending_control`) is not in it.
        """
        held = self._held_controls(job)
        earlier = [r for r in held if r <= rnd]
        return held[max(earlier)] if earlier else None

    def pending_control(self, job: str) -> tuple[int, np.ndarray] | None:
        """SCAFFOLD: (round, clipped Δc_i) of ``job``'s last update that left, until a
        ControlCommit says whether the server's c holds it; None when none waits."""
        rnd, dc = self._held_pending(job)
        return None if dc is None else (rnd, dc)

    def _job_controls(self, job: str) -> _JobControls:
        """``job``'s c_i and pending Δc_i, from ``job_state`` (one read) the first time
        and after the job was dropped from memory."""
        held: _JobControls | None = self.controls.touch(job)
        if held is None:
            saved = self.job_state.load(job, "controls") if self.job_state else {}
            dc, at = saved.get("pending"), saved.get("pending_round")
            pending = ((int(at.reshape(-1)[0]), dc.astype(np.float64))
                       if dc is not None and at is not None and dc.ndim == 1 and at.size == 1
                       else (0, None))
            held = self.controls.hold(job, _JobControls(
                {int(r): a.astype(np.float32) for r, a in saved.items()
                 if r.lstrip("-").isdigit() and a.ndim == 1}, pending))
        return held

    def _held_controls(self, job: str) -> dict[int, np.ndarray]:
        return self._job_controls(job).by_round

    def _held_pending(self, job: str) -> tuple[int, np.ndarray | None]:
        return self._job_controls(job).pending

    @staticmethod
    def _controls_arrays(controls: _JobControls) -> dict[str, np.ndarray]:
        """What ``job_state`` keeps of one job's c_i and pending Δc_i."""
        arrays = {str(r): a for r, a in controls.by_round.items()}
        rnd, dc = controls.pending
        if dc is not None:
            arrays["pending"] = dc
            arrays["pending_round"] = np.array([rnd], dtype=np.int64)
        return arrays

    def _save_controls(self, job: str, controls: _JobControls | None = None) -> None:
        """c_i and the pending Δc_i of ``job`` (``controls``, else the ones held) to
        ``job_state``. Raises: OSError."""
        if self.job_state is None:
            return
        held = controls if controls is not None else self._job_controls(job)
        self.job_state.save(job, "controls", self._controls_arrays(held))

    def _hold_control(self, task: _Task, controls: _JobControls | None = None) -> str:
        """SCAFFOLD: keep the round's Δc_i, clipped to [−c, c] exactly as it goes into
        the sum (``input_vector``), as the job's pending one, on disk, before the update
        can be summed (module doc); '' when done or not SCAFFOLD, else why it could not
        be kept (then the update may not leave: c would hold a Δc_i this c_i never gets).
        ``controls``: the job's, looked up on the event loop when this runs on the
        durable-writes thread (``self.controls`` is the loop's)."""
        assert task.local is not None
        if task.local.delta_control is None:
            return ""
        clip = task.plan.secagg.clip
        summed = np.clip(task.local.delta_control.astype(np.float64), -clip, clip)
        held = controls if controls is not None else self._job_controls(task.job)
        held.pending = (task.round, summed)
        try:
            self._save_controls(task.job, held)
        except OSError as exc:  # the coordinator keeps the reason: no path in it
            log.error("%s: job %s: SCAFFOLD control variate change not saved: %s",
                      self.site, task.job, exc)
            return ("cannot record this update's SCAFFOLD control variate change "
                    f"({without_appliance_paths(str(exc))})")
        return ""

    async def _on_control_commit(self, job: str, rnd: int, cc: m.ControlCommit) -> None:
        """The server's c holds this site's Δc_i of round ``cc.summed_round`` and none
        later (module doc): c_i takes the pending Δc_i if it is that round's and drops
        it otherwise, and a c_i moved for a later round (by an agent that moved it when
        the EvalTask came) goes back; then the TrainTask of ``cc.task_id`` may train."""
        q = cc.summed_round
        if q >= rnd:
            log.warning("%s: ControlCommit for %s/%d names round %d, not an earlier one: "
                        "ignored", self.site, job, rnd, q)
            return
        held = self._held_controls(job)
        at, dc = self._held_pending(job)
        changed = False
        if dc is not None:
            if at == q:
                start = self.client_control(job, q)
                base = np.zeros(dc.shape) if start is None else start.astype(np.float64)
                held[q + 1] = (base + dc).astype(np.float32)
                log.info("%s: job %s: round %d's control variate update committed", self.site,
                         job, q)
            else:
                log.info("%s: job %s: round %d's update was not committed with this site: "
                         "its control variate update is dropped", self.site, job, at)
            self._job_controls(job).pending = (0, None)
            changed = True
        later = sorted(r for r in held if r > q + 1)
        if later:
            log.warning("%s: job %s: c_i had moved for round(s) %s, which were not "
                        "committed with this site: back to round %d's", self.site, job,
                        [r - 1 for r in later], q)
        if q > 0 and not any(r == q + 1 for r in held):
            log.error("%s: job %s: the server's c holds this site's control variate update "
                      "of round %d, which this agent no longer has (its state was lost): "
                      "its c_i lags the server's c", self.site, job, q)
        keep = [r for r in held if r <= q + 1]
        for r in [r for r in held if r > q + 1 or (keep and r < max(keep))]:
            del held[r]
            changed = True
        self._control_commits.pop(job, None)
        self._control_commits.hold(job, cc.task_id)
        store = self.job_state
        if changed and store is not None:
            arrays = self._controls_arrays(self._job_controls(job))  # as of now, in order

            def save() -> None:
                try:
                    store.save(job, "controls", arrays)
                except OSError as exc:  # only a restart would lose it
                    log.error("%s: job %s: SCAFFOLD c_i not saved: %s", self.site, job, exc)

            await self._on_disk(save)

    @staticmethod
    def clipped_update(task: _Task) -> np.ndarray:
        """Δ (and SCAFFOLD's Δc) clipped to [−c, c], float64: what the input vector
        scales, and what the reveal log knows an update by."""
        assert task.local is not None
        c = task.plan.secagg.clip
        parts = [task.local.weights.astype(np.float64) - task.weights.astype(np.float64)]
        if task.local.delta_control is not None:
            parts.append(task.local.delta_control.astype(np.float64))
        delta = np.concatenate(parts)
        np.clip(delta, -c, c, out=delta)
        return delta

    def input_vector(self, task: _Task, weight_scale: float,
                     delta: np.ndarray | None = None) -> np.ndarray:
        """concat(w·Δ, [w]) with Δ clipped to [−c, c] and w = weight_scale·n (see rounds.py).

        SCAFFOLD: concat(w·Δ, w·Δc, [w]), Δc clipped to [−c, c] as well.

        DP-FedAvg (``privacy.client_dp``): w = min(1, c) at every site, whatever its n
        and whatever weight scale the coordinator sends. Each site's noise share is
        sized for the unweighted mean of the cohort's updates (the sum carries
        N(0, (zS)²), one site moves the mean by at most S/K); weighted by example
        counts, the largest site's influence grows and the noise does not, and the
        mean would carry less noise than the plan's z (0.63 z on Fed-TCGA-BRCA's six
        centres).
        """
        assert task.local is not None
        c = task.plan.secagg.clip
        if delta is None:  # ``clipped_update(task)``, when the caller has it already
            delta = self.clipped_update(task)
        if task.plan.privacy.get("client_dp") is not None:
            w = min(1.0, c)
        else:
            w = weight_scale * task.local.n_examples
        vec = np.empty(delta.size + 1, dtype=np.float32)
        vec[:-1] = w * delta
        vec[-1] = w
        return vec

    async def _on_aggregate(self, job: str, rnd: int, a: m.AggregateBegin) -> None:
        task = self.task
        if task is None or not self._current(job, rnd) or task.local is None \
                or task.task_id != a.task_id:
            await self._refuse(job, rnd, "aggregate", "no trained update for this round",
                               a.task_id)
            return
        refused = self.policy.refuse_aggregation(
            plan_secure=task.plan.secagg.enabled, secure=a.secure, cohort=len(set(a.cohort)),
            weight_scale=float(a.weight_scale),
            client_dp_cohort=client_dp_cohort(task.plan.privacy))
        if not refused and self.site not in a.cohort:
            refused = f"the aggregation cohort does not include {self.site}"
        if refused:
            self._give_up(task)
            await self._refuse(job, rnd, "aggregate", refused, task.task_id)
            return
        delta = self.clipped_update(task)  # once: the input vector and the reveal log's key
        vec = self.input_vector(task, a.weight_scale, delta)
        controls = (self._job_controls(task.job) if task.local.delta_control is not None
                    else None)  # looked up here, on the loop: the writes run off it
        if not a.secure:
            # the update itself leaves now: its DP run is charged, on disk, first, and
            # SCAFFOLD's Δc_i kept pending
            refused = await self._on_disk(
                lambda: self._release_privacy(task) or self._hold_control(task, controls))
            if refused:
                self._give_up(task)
                await self._refuse(job, rnd, "aggregate", f"{refused}; the update is withheld",
                                   task.task_id)
                return
            if self.task is not task or task.cancel.is_set():  # aborted meanwhile: the
                return  # run stays charged (the safe side), the update stays here
            self._set_busy(f"{AWAITING_EVALUATION} {job} round {rnd}")
            await self.send(m.PlainUpdate(task.task_id, vec), job=job, round=rnd)
            return
        from fedge.secagg.client import ClientSession
        from fedge.secagg.config import RoundContext
        from fedge.secagg.errors import SecAggConfigError

        try:
            config = secagg_config(task.plan, len(a.cohort), vec.size)
            too_low = refuse_threshold(self.policy, config.threshold, config.degree + 1)
            if too_low:
                self._give_up(task)
                await self._refuse(job, rnd, "aggregate", too_low, task.task_id)
                return
            # The quantiser's rounding comes from (job seed, round, site), not from
            # fresh randomness: a round restarted after a crash sums the same values.
            bound = context_digest(task.digest, task.plan.text, float(a.weight_scale),
                                   list(a.cohort), task.server_control)
            update = delta.astype(np.float32)
            summed = update_digest(update, task.local.n_examples)
            task.session = ClientSession(config, RoundContext(job, rnd, bound),
                                         self.site, self.identity, self.roster, vec,
                                         threads=self.secagg_threads,
                                         quantise_seed=task.quant_seed,
                                         before_reveal=lambda survivors: self._before_reveal(
                                             task, summed, update, survivors),
                                         before_masked_input=lambda max_summed: (
                                             self._before_input(task, controls,
                                                                max_summed)))
        except SecAggConfigError as exc:
            self._give_up(task)
            await self._refuse(job, rnd, "aggregate", f"secure aggregation: {exc}",
                               task.task_id)
            return
        self._secagg_status(task)

    def _secagg_status(self, task: _Task) -> None:
        """``current_task`` from the stage ``task``'s secure-aggregation session is in
        (SECAGG_STAGES; once it completed, the site awaits its evaluation)."""
        state = getattr(task.session, "state", "")
        stage = SECAGG_STAGES.get(state)
        if stage is not None:
            self._set_busy(f"secagg {stage} {task.job} round {task.round}")
        elif state == "Completed":
            self._set_busy(f"{AWAITING_EVALUATION} {task.job} round {task.round}")
        elif state == "Aborted":  # the coordinator's RoundFailed: nothing more to do
            self._set_busy("")

    def _release_privacy(self, task: _Task) -> str:
        """Charge the task's DP run in the site's privacy ledger, on disk, before its
        update can be revealed (``LocalResult.release_privacy``); '' when done or when
        there is nothing to charge, else why it was refused or failed (then the update
        may not leave: the run stays pending, uncounted).

        Refused when the ε the ledger would hold with this run, for its job and over
        every job, breaks the site's floor (``PrivacyPolicy.refuse_release``): the
        plan's noise and target are the coordinator's word, the ledger is the site's."""
        assert task.local is not None
        release = task.local.release_privacy
        if release is None:
            return ""
        if self.policy.checks_release:
            run = ledger_run(release)
            if run is None:  # a trainer whose runs this agent cannot look up
                return ("this appliance's [privacy] DP floor (require_dp, max_epsilon, "
                        "max_epsilon_total) cannot be checked: the trainer's run is not in "
                        "a privacy ledger this agent can read")
            ledger, key = run
            job_epsilon, total_epsilon = ledger.epsilon_if_released(
                key, self.policy.budget_delta,
                total=self.policy.max_epsilon_total is not None)
            refused = self.policy.refuse_release(job=key[0], job_epsilon=job_epsilon,
                                                 total_epsilon=total_epsilon)
            if refused:
                return refused
        try:
            if ledger_run(release) is not None:  # the coordinator's task id, in the entry
                release(task_id=task.task_id or None)
            else:
                release()
        except OSError as exc:  # the coordinator keeps the reason: no path in it
            log.error("%s: job %s: privacy ledger not saved: %s", self.site, task.job, exc)
            return ("cannot record this update's privacy spend in the ledger "
                    f"({without_appliance_paths(str(exc))})")
        return ""

    def _before_input(self, task: _Task, controls: _JobControls | None = None,
                      max_summed: int | None = None) -> None:
        """A DP run is charged in the privacy ledger, on disk, before the masked input
        leaves: from then on the other survivors can unmask it without this site (any t
        of them reveal its self-mask seed), whether or not it sends its own shares or
        stays connected. A round that fails after this was charged: the safe side.

        First, a sum that :meth:`_before_reveal` would refuse whoever survives is
        refused here, before anything is charged: ``max_summed`` (the most inputs the
        sum can hold, ``ClientSession``) below the site's ``min_cohort`` or, under
        DP-FedAvg, below the cohort the noise was drawn for. Sites that dropped before
        sharing keys would otherwise cost ε in a round that cannot commit.

        SCAFFOLD's Δc_i is kept pending (:meth:`_hold_control`) here too: once the input
        left, it can be summed without this site.

        Raises: TooFewSurvivors (a SecAggAbort): too few sites shared keys; nothing
        charged. RevealRefused (a SecAggAbort): the ledger (or the pending Δc_i) cannot
        be saved; the masked input is withheld and the run stays pending."""
        from fedge.secagg.errors import RevealRefused, TooFewSurvivors

        if max_summed is not None:
            too_few = self.policy.min_cohort_refusal(max_summed, "a sum")
            client_dp = task.plan.privacy.get("client_dp")
            dp_cohort = (int(client_dp.get("cohort_size", 0))
                         if isinstance(client_dp, dict) else 0)
            if not too_few and dp_cohort > max_summed:
                too_few = (f"DP-FedAvg noise was drawn for a cohort of {dp_cohort} but a sum "
                           f"can hold at most {max_summed} sites: it would carry less noise "
                           "than epsilon assumes")
            if too_few:
                # kept short: the coordinator keeps 320 characters of a site's reason
                raise TooFewSurvivors(f"{too_few}; at most {max_summed} sites shared keys: "
                                      "masked input withheld, privacy spend not charged")
        refused = self._release_privacy(task) or self._hold_control(task, controls)
        if refused:
            raise RevealRefused(f"{refused}; the masked input is withheld")

    def _before_reveal(self, task: _Task, summed: bytes, update: np.ndarray,
                       survivors: list[str]) -> None:
        """The last word before the shares that unmask a sum leave: the sum must hold
        at least the site's ``min_cohort`` inputs (and, under DP-FedAvg, the cohort its
        noise was drawn for), counted over the survivors actually summed, not the
        sites invited; and the reveal log must allow it (recorded on disk first). The
        round's DP run was charged before the masked input left (``_before_input``).

        Raises: a SecAggAbort (nothing revealed)."""
        from fedge.agent.guard import RevealLogError
        from fedge.secagg.errors import RevealRefused, TooFewSurvivors

        plan = task.plan
        n = len(set(survivors))
        too_few = self.policy.min_cohort_refusal(n, "a sum")  # says how to allow it
        if too_few:
            raise TooFewSurvivors(too_few)
        client_dp = plan.privacy.get("client_dp")
        if isinstance(client_dp, dict) and int(client_dp.get("cohort_size", 0)) > n:
            raise TooFewSurvivors(
                f"DP-FedAvg noise was drawn for a cohort of {client_dp['cohort_size']} but "
                f"the sum holds {n} sites: it would carry less noise than epsilon assumes")
        try:
            self.reveal_log.check_and_record(summed, survivors, update, job=task.job,
                                             round=task.round, inputs=task.inputs)
        except RevealLogError as exc:  # journalled with its path by the reveal log
            raise RevealRefused(without_appliance_paths(
                str(exc), [self.reveal_log.path or ""])) from exc
        except OSError as exc:
            log.error("%s: job %s round %d: reveal log not written: %s", self.site,
                      task.job, task.round, exc)
            raise RevealRefused(
                f"cannot record the survivors this update is summed over "
                f"({without_appliance_paths(str(exc))}); not revealing") from exc

    async def _on_secagg(self, job: str, rnd: int, body: Any) -> None:
        """One message of the round's ClientSession, handled on the durable-writes thread
        (its hooks write the ledger and the reveal log before anything leaves) and one
        at a time: the next waits its turn, in the order they came, and finds the
        session as this one left it."""
        from fedge.secagg.errors import SecAggAbort

        async with self._secagg_turn:
            task = self.task
            if task is None or not self._current(job, rnd) or task.session is None:
                log.info("%s: secagg message for %s/%d, which is not in progress", self.site,
                         job, rnd)
                return
            session = task.session
            try:
                replies = await self._on_disk(session.receive, body, time.time())
            except SecAggAbort as exc:
                log.error("%s: secure aggregation aborted: %s: %s", self.site,
                          type(exc).__name__, codec.printable(exc))
                if task.session is session:
                    task.session = None
                if self.task is task and not task.cancel.is_set():
                    self._give_up(task)
                    # the journal (above) has the whole text; the coordinator keeps
                    # this one: no path of this appliance in it
                    await self._refuse(job, rnd, "aggregate", without_appliance_paths(
                        f"{type(exc).__name__}: {exc}", [self.reveal_log.path or ""]),
                        task.task_id)
                return
            if self.task is not task or task.cancel.is_set() or task.session is not session:
                log.info("%s: secure aggregation for %s/%d ended while a message was "
                         "handled: its reply is not sent", self.site, job, rnd)
                return
            self._secagg_status(task)  # before the replies: the next stage answers them
            for reply in replies:
                await self.send(reply, job=job, round=rnd)

    async def _on_eval(self, job: str, rnd: int, e: m.EvalTask) -> None:
        try:
            plan = await self._plan(e.plan)
        except PlanError as exc:
            await self._refuse(job, rnd, m.TASK_EVAL, f"unrunnable plan: {exc}", e.task_id)
            return
        assert plan is not None  # only an arriving TrainTask's parse is ever skipped
        # SCAFFOLD's c_i does not move here (module doc: the ControlCommit moves it)
        # metrics leave without noise: the plan meets this site's floor as a TrainTask's
        # does, the training split is not evaluated under DP (the plan's or the site's),
        # only the split the plan names or the final test is
        # (fedge.agent.guard.PrivacyPolicy.refuse_evaluation); and a job this site
        # trained for is evaluated under that job's plan only, not one the coordinator
        # writes for the occasion
        refused = self.policy.refuse_evaluation(e.split, plan_split=plan.eval_split,
                                                secure=plan.secagg.enabled,
                                                privacy=plan.privacy, rounds=plan.rounds)
        trained_under = None if refused else self.job_plan(job)
        if trained_under is not None and trained_under != plan_digest(e.plan):
            refused = (f"the evaluation's plan differs from the plan this site trained job "
                       f"{job!r} under: a job is evaluated under its own plan only")
        refused = refused or self._classes_refusal(plan)
        if refused:
            if self._current(job, rnd):
                self.task = None
            await self._refuse(job, rnd, m.TASK_EVAL, refused, e.task_id)
            return
        weights = np.array(e.weights, dtype=np.float32)
        said = f"{m.TASK_EVAL} {job} round {rnd}"
        self._set_busy(said)
        evaluating = (job, rnd)
        self._evaluating.append(evaluating)
        try:
            n, metrics = await self._on_worker(
                f"{m.TASK_EVAL} {job} round {rnd}", plan.deadlines.eval_s,
                lambda: self.trainer.evaluate(plan, weights, e.split, job=job),
                dataset=plan.dataset, job=job)
        except TaskRefusal as exc:
            await self._refuse(job, rnd, m.TASK_EVAL, str(exc), e.task_id)
            return
        except Exception as exc:  # unforeseen: answer anyway, or the round waits eval_s
            log.exception("%s: evaluation for %s/%d failed", self.site, job, rnd)
            # the details stay in this site's journal; the coordinator gets the kind
            await self._refuse(job, rnd, m.TASK_EVAL,
                               f"evaluation failed: internal error ({type(exc).__name__}; "
                               "see the site's journal)", e.task_id)
            return
        finally:
            self._evaluating.remove(evaluating)
            if self._current(job, rnd):
                self.task = None
            if self._busy == said:  # else a task that came meanwhile: its text stands
                # the round's other evaluation (its final test) still queued or running
                # is what the site does now; with none, the round is over for it
                self._set_busy(f"{m.TASK_EVAL} {self._evaluating[-1][0]} round "
                               f"{self._evaluating[-1][1]}" if self._evaluating else "")
        if not 0 <= n <= m.MAX_EXAMPLES:  # EvalResult's own range
            await self._refuse(job, rnd, m.TASK_EVAL, f"evaluated {n} examples; an "
                               f"evaluation result needs 0..{m.MAX_EXAMPLES}", e.task_id)
            return
        await self.send(m.EvalResult(task_id=e.task_id, n_examples=n,
                                     metrics=rounded_metrics(metrics)), job=job, round=rnd)


def rounded_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` to ``METRIC_DIGITS`` significant digits, as they leave the site
    (non-finite values as they are)."""
    return {k: float(f"{v:.{METRIC_DIGITS}g}") if np.isfinite(v) else float(v)
            for k, v in metrics.items()}
