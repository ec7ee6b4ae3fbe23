"""Every federation message type, in one place.

The header frame (schema version, type, job, round, message id, sender) is the
codec's; the bodies below are the payloads. Job and round travel in the header,
so no body repeats them. Importing this module also registers the
secure-aggregation messages (:mod:`fedge.secagg.messages`) and the update
relay messages (:mod:`fedge.update.messages`) with the codec, so that one
``import fedge.wire.messages`` gives a process the whole vocabulary.

Direction and meaning:

=================  =====================  ============================================
message            direction              meaning
=================  =====================  ============================================
Heartbeat          agent → coordinator    liveness + version, health, eligibility,
                                          data sets held, current task
DatasetClasses     agent → coordinator    just before each Heartbeat: the class list
                                          (label order) of each data set that has one,
                                          and each data set's task and input shape
                                          (not sent when it would be empty)
HeartbeatAck       coordinator → agent    liveness of the coordinator
ControlCommit      coordinator → agent    SCAFFOLD, just before each TrainTask: the
                                          last committed round whose sum held this
                                          site's Δc_i (its c_i moves by that one only)
TrainTask          coordinator → agent    train on ``dataset`` from ``weights``
TaskRefused        agent → coordinator    the task cannot run here, and why
TrainDone          agent → coordinator    trained: example count and train metrics
AggregateBegin     coordinator → agent    secure (or plain) aggregation starts over
                                          ``cohort`` with the given weight scale
PlainUpdate        agent → coordinator    plain-mode input vector (secagg disabled)
EvalTask           coordinator → agent    evaluate ``weights`` on the local split
EvalResult         agent → coordinator    example count and metrics
RoundAbort         coordinator → agent    the round is abandoned; drop its state
Rejected           coordinator → agent    your last message was refused, and why
RosterUpdate       coordinator → agent    the console-signed roster now in force (on
                                          connecting and whenever it changes); the
                                          agent takes it only if newer and verified
=================  =====================  ============================================

Every task message carries a ``task_id`` that names one attempt at one round;
the agent echoes it, so a reply to an abandoned attempt (a round restarted after
a coordinator crash, or retried after a failure) is recognised as stale.

No message carries data rows: agents send model vectors, counts and metrics.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from fedge.wire.codec import ADDED_LATER, Tensor, message

F32 = Annotated[np.ndarray, Tensor("float32", 1)]

# Names of the tasks an agent can be running (Heartbeat.current_task prefix).
TASK_TRAIN = "train"
TASK_EVAL = "eval"

# The largest example count a site may report (about 10^12): far beyond any hospital's
# data set, and small enough that counts, their sums and their products with a metric
# stay exact in a float64 and fit SQLite's INTEGER. A wire int goes up to 2^64 - 1.
MAX_EXAMPLES = 1 << 40


# Reasons the coordinator sends (Rejected, RoundAbort) are cut to this many characters:
# they may quote what a peer sent, and must stay far below those messages' 1 MiB limit.
MAX_REASON_CHARS = 2000


def clip_reason(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """``reason`` cut to ``limit`` characters ("..." marks a cut, where 3 fit)."""
    if len(reason) <= limit:
        return reason
    return reason[:limit - 3] + "..." if limit >= 3 else reason[:max(limit, 0)]


def _check_examples(cls: str, n: int, least: int) -> None:
    if not least <= n <= MAX_EXAMPLES:
        raise ValueError(f"{cls}.n_examples {n} is not in {least}..2**40 "
                         f"({least}..{MAX_EXAMPLES})")


@message("heartbeat")
@dataclass(frozen=True)
class Heartbeat:
    site: str
    version: str
    health_json: str
    eligible: bool
    reason: str
    datasets: list[str]
    current_task: str
    # fedge.coordinator.rounds.SECAGG_PROTOCOL of the agent; absent from agents that
    # predate it (protocol 1)
    secagg_protocol: int = 1


# The key of the agent's health report (Heartbeat.health_json) that holds the number
# of released runs in its privacy ledger: a field of the JSON, not of the message, so
# that agents and coordinators from before it still take each other's heartbeats
# (the codec refuses a Heartbeat with a field it does not know).
HEALTH_LEDGER_RELEASED = "privacy_ledger_released"

# The key of the health report that holds the site's privacy floor: the fewest sites
# it lets a secure sum hold ([privacy] min_cohort, fedge.agent.guard.PrivacyPolicy), so
# that the coordinator leaves it out of a round too small for it before it trains, and
# warns at submission (fedge.coordinator.cohort). Absent from agents before it: the
# coordinator then assumes no floor (the agent's own check still refuses, after
# training). A field of the JSON, not of the message, for the reason above.
HEALTH_MIN_COHORT = "privacy_min_cohort"


# Bounds on what one DatasetClasses may carry (the coordinator keeps it in memory).
CLASSES_MAX = 1000  # classes per data set
CLASS_NAME_MAX = 255  # characters per class name (a folder name)


def check_class_bounds(classes: list[str] | tuple[str, ...], what: str) -> None:
    """Raise ValueError, naming ``what``, when a class list is beyond what one
    DatasetClasses may carry (CLASSES_MAX classes of CLASS_NAME_MAX characters)."""
    if len(classes) > CLASSES_MAX:
        raise ValueError(f"{what} lists {len(classes)} classes, at most {CLASSES_MAX}")
    long = [c for c in classes if len(c) > CLASS_NAME_MAX]
    if long:
        raise ValueError(f"{what} has a class name of {len(long[0])} characters, at most "
                         f"{CLASS_NAME_MAX}")


# Bounds on what one DatasetClasses may say of a data set's task and input shape.
# characters of a task name or a standardise mode (fedge.train.data.TASKS and
# STANDARDISE_MODES are far shorter)
TASK_NAME_MAX = 64
INPUT_SHAPE_NDIM_MAX = 4  # (features,) or (channels, height, width)
INPUT_DIM_MAX = (1 << 31) - 1


@message("dataset_classes")
@dataclass(frozen=True)
class DatasetClasses:
    """What the agent's data sets declare in agent.toml, for the coordinator to check
    plans against at submission (fedge.coordinator.service.submission_warnings) rather
    than have the sites refuse them once queued:

    - ``classes``: the class list, in label order, of each data set that declares one
      (an image data set's ``classes``); a data set without one is absent. The cohort
      leaves out sites whose order disagrees (fedge.coordinator.cohort).
    - ``tasks``: each data set's task (``datasets.task``: survival, binary,
      multiclass, regression).
    - ``input_shapes``: the shape of one example as the models take it, ``[features]``
      for a table, ``[channels, height, width]`` for images; a data set whose shape is
      known only once its file is read (kind "numpy") is absent.
    - ``standardise``: how each data set's features are standardised at the site
      (``datasets.standardise``, fedge.train.data.STANDARDISE_MODES): "continuous"
      and "all" with constants fitted on the site's own training rows
      (FITTED_STANDARDISE_MODES, which the site refuses under DP-SGD), "bounds" and
      "none" not; images are not standardised ("none"). A data set whose features
      are known only once read (kind "numpy") with a fitted mode is absent.

    Sent just before every Heartbeat by an agent with anything to say here: the
    coordinator takes it as part of the heartbeat that follows (none came: nothing
    declared). ``tasks`` and ``input_shapes`` came after release 0.2.0, and
    ``standardise`` after them (``ADDED_LATER``, in that order): a message without
    them (an agent before them) still decodes, and one that leaves them empty is
    encoded without them, the form that a coordinator before them reads. Such a
    coordinator (one build of 0.2.0 knows DatasetClasses but not tasks and input
    shapes; the builds before standardise know those but not it) refuses the first
    it does not know as ``UnexpectedField``; the agent then sends it the message
    without that field and those added after it (fedge.agent.runtime).

    A message of its own, not a Heartbeat field: the codec refuses unknown fields, so
    a Heartbeat with a new field would be refused whole by a coordinator of the
    previous release (same minor version, which accepts this agent), and the site
    would never join a cohort there. Such a coordinator refuses this unknown type
    alone (one Rejected); the agent then stops sending it until the coordinator's
    version changes (fedge.agent.runtime)."""

    classes: dict[str, list[str]]
    tasks: dict[str, str] = field(default_factory=dict, metadata=ADDED_LATER)
    input_shapes: dict[str, list[int]] = field(default_factory=dict, metadata=ADDED_LATER)
    standardise: dict[str, str] = field(default_factory=dict, metadata=ADDED_LATER)

    def __post_init__(self) -> None:
        for name, classes in self.classes.items():
            check_class_bounds(classes, f"DatasetClasses.classes[{name[:80]!r}]")
        for name, task in self.tasks.items():
            if not 0 < len(task) <= TASK_NAME_MAX:
                raise ValueError(f"DatasetClasses.tasks[{name[:80]!r}] has {len(task)} "
                                 f"characters, 1..{TASK_NAME_MAX}")
        for name, shape in self.input_shapes.items():
            if not 0 < len(shape) <= INPUT_SHAPE_NDIM_MAX \
                    or not all(0 < d <= INPUT_DIM_MAX for d in shape):
                raise ValueError(f"DatasetClasses.input_shapes[{name[:80]!r}] = "
                                 f"{shape[:INPUT_SHAPE_NDIM_MAX + 1]} is not 1.."
                                 f"{INPUT_SHAPE_NDIM_MAX} sizes in 1..2**31-1")
        for name, mode in self.standardise.items():
            if not 0 < len(mode) <= TASK_NAME_MAX:
                raise ValueError(f"DatasetClasses.standardise[{name[:80]!r}] has "
                                 f"{len(mode)} characters, 1..{TASK_NAME_MAX}")


@message("heartbeat_ack")
@dataclass(frozen=True)
class HeartbeatAck:
    time: float
    coordinator_version: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.time):
            raise ValueError(f"HeartbeatAck.time {self.time} is not a finite number")


@message("train_task", max_bytes=None)
@dataclass(frozen=True)
class TrainTask:
    task_id: str  # names one attempt at one round; replies echo it
    plan: str  # the job plan TOML; the agent parses it with fedge.coordinator.plan
    weights: F32  # the global model, d values
    model_digest: bytes  # sha256 of weights (binds secagg masks to this model)
    train_seed: int  # derived from (job seed, round, site)
    quant_seed: bytes  # 16 bytes, derived from (job seed, round, site)
    # SCAFFOLD's server control variate c, d values; None for every other strategy
    server_control: F32 | None = None


@message("control_commit")
@dataclass(frozen=True)
class ControlCommit:
    """SCAFFOLD: sent to a site just before each TrainTask of a scaffold job, with the
    same ``task_id``. ``summed_round`` is the last committed round of the job whose sum
    held this site's Δc_i (0: none yet): the server's c holds exactly those, so the site
    adds the Δc_i it kept for that round to its c_i and drops any other it kept (an
    attempt that failed, a round committed without it) before it trains. An agent
    refuses a scaffold TrainTask that did not come with one.

    A separate message, not a TrainTask field, so that agents one minor version behind
    (which the coordinator accepts) still decode every TrainTask: the codec refuses
    unknown fields, and an unknown message type is only dropped and logged."""

    task_id: str  # the TrainTask it goes with
    summed_round: int

    def __post_init__(self) -> None:
        if not 0 <= self.summed_round < (1 << 31):
            raise ValueError(f"ControlCommit.summed_round {self.summed_round} is not in "
                             "0..2**31-1")


@message("task_refused")
@dataclass(frozen=True)
class TaskRefused:
    task_id: str  # names one attempt at one round; replies echo it
    task: str
    reason: str


@message("train_done")
@dataclass(frozen=True)
class TrainDone:
    task_id: str  # names one attempt at one round; replies echo it
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        # a site that trained on nothing says so with TaskRefused
        _check_examples("TrainDone", self.n_examples, 1)


@message("aggregate_begin")
@dataclass(frozen=True)
class AggregateBegin:
    task_id: str  # names one attempt at one round; replies echo it
    cohort: list[str]
    weight_scale: float  # w_i = weight_scale * n_i
    secure: bool
    threshold: int

    def __post_init__(self) -> None:
        # min(1, clip) / max n_i (fedge.coordinator.rounds.weight_scale): a NaN, an
        # infinity, 0 or more than 1 would put the inputs outside the quantiser's range
        if not (math.isfinite(self.weight_scale) and 0.0 < self.weight_scale <= 1.0):
            raise ValueError(f"AggregateBegin.weight_scale {self.weight_scale} is not a "
                             "finite number in (0, 1]")


@message("plain_update", max_bytes=None)
@dataclass(frozen=True)
class PlainUpdate:
    task_id: str  # names one attempt at one round; replies echo it
    vector: F32  # concat(w_i * delta_i, [w_i]), d + 1 values; SCAFFOLD:
    # concat(w_i * delta_i, w_i * delta_c_i, [w_i]), 2d + 1 values


@message("eval_task", max_bytes=None)
@dataclass(frozen=True)
class EvalTask:
    task_id: str  # names one attempt at one round; replies echo it
    plan: str
    weights: F32  # d values
    split: str


@message("eval_result")
@dataclass(frozen=True)
class EvalResult:
    task_id: str  # names one attempt at one round; replies echo it
    n_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_examples("EvalResult", self.n_examples, 0)


@message("round_abort")
@dataclass(frozen=True)
class RoundAbort:
    reason: str


@message("rejected")
@dataclass(frozen=True)
class Rejected:
    reason: str


@message("roster_update")
@dataclass(frozen=True)
class RosterUpdate:
    roster: bytes  # fedge.secagg.keys.Roster.to_bytes(), signed by the console


FEDERATION_MESSAGES = (
    Heartbeat, DatasetClasses, HeartbeatAck, ControlCommit, TrainTask, TaskRefused, TrainDone,
    AggregateBegin, PlainUpdate, EvalTask, EvalResult, RoundAbort, Rejected, RosterUpdate,
)

# The other packages define plain frozen dataclasses; they are registered here so
# that the whole wire vocabulary is in one place. The secagg masked input is a bare
# ``np.ndarray`` field, declared to the codec as a 1-D uint32 tensor.
SECAGG_TENSORS = {"secagg.masked_input": {"masked": Tensor("uint32", 1)}}
UPDATE_FETCH_MESSAGES = {
    "update.fetch_request": "UpdateFetchRequest",
    "update.fetch_reply": "UpdateFetchReply",
}
UPDATE_FETCH_MAX_BYTES = (1 << 20) + 4096  # one MAX_CHUNK of data plus the envelope


def _register_external() -> None:
    try:
        secagg = importlib.import_module("fedge.secagg.messages")
    except ModuleNotFoundError as exc:  # that package has not landed its messages
        if exc.name != "fedge.secagg.messages":
            raise
    else:
        for wire_name, cls in getattr(secagg, "MESSAGE_TYPES", {}).items():
            if getattr(cls, "__wire_type__", None) != wire_name:
                message(wire_name, max_bytes=None, tensors=SECAGG_TENSORS.get(wire_name))(cls)
    try:
        update = importlib.import_module("fedge.update.messages")
    except ModuleNotFoundError as exc:
        if exc.name != "fedge.update.messages":
            raise
    else:
        for wire_name, cls_name in UPDATE_FETCH_MESSAGES.items():
            cls = getattr(update, cls_name, None)
            if cls is not None and getattr(cls, "__wire_type__", None) != wire_name:
                message(wire_name, max_bytes=UPDATE_FETCH_MAX_BYTES)(cls)


_register_external()


def is_secagg(body: object) -> bool:
    return type(body).__module__ == "fedge.secagg.messages"


def is_update_fetch(body: object) -> bool:
    return type(body).__name__ == "UpdateFetchRequest" and type(body).__module__ == (
        "fedge.update.messages"
    )
