"""Job plans: the TOML file an operator submits, parsed and checked in one place.

A plan names a model, a data set, the number of rounds, the local training
recipe, the server strategy (FLamby's parameter names), secure-aggregation and
privacy settings, the minimum cohort and per-stage deadlines. Every field is
checked when the plan is parsed; an invalid plan raises :class:`PlanError`
naming the field, the value and the rule, and nothing is stored.

Example::

    [job]
    name = "brca cox baseline"  # optional, at most 100 characters: shown in `jobs list`,
                                # job status, the report's title and the ONNX metadata
    dataset = "fed_tcga_brca"
    rounds = 3
    min_clients = 2
    seed = 42
    eval_split = "val"      # split each round's model is evaluated on: val | test | train
                            # (not train under privacy.dp / client_dp: metrics carry no noise)
    # classes = ["benign", "malignant"]  # optional: the label order every site must
                            # declare for job.dataset (agent.toml datasets.classes);
                            # sites declaring another are left out and refuse the tasks

    [model]
    name = "cox_linear"
    params = { in_features = 39 }

    [train]
    epochs = 1              # or: steps = 50
    batch_size = 32
    optimizer = "sgd"       # sgd | adam
    learning_rate = 0.01
    momentum = 0.0
    weight_decay = 0.0

    [strategy]
    name = "fedadam"        # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad | scaffold
    server_learning_rate = 0.01
    beta1 = 0.9
    beta2 = 0.999
    tau = 1e-3

    [secagg]
    enabled = true
    alpha = 0.1
    delta = 0.0
    clip = 1.0              # bounds each coordinate of every site's update to [-clip,
                            # clip], secure aggregation on or off: a clip small beside
                            # one round's weight change slows or stops training unsaid

    [privacy]               # passed through to fedge.train (DP-SGD, DP-FedAvg)
    min_site_examples = 100 # smallest site's training rows: bounds the sampling rate
    # DP-SGD (a Cox model's ε bounds one loss term, not one record: cox_per_term says so)
    dp = { noise_multiplier = 1.1, delta = 1e-5, target_epsilon = 8.0, cox_per_term = true }
    # DP-FedAvg: noise_multiplier > 0; cohort_size > 1 needs [secagg] enabled, and
    # secagg.clip >= 6 * noise_multiplier * clip_norm / sqrt(cohort_size) (3.465 here)
    # client_dp = { clip_norm = 1.0, noise_multiplier = 1.0, cohort_size = 3 }
    [deadlines]             # seconds
    cohort_s = 60
    train_s = 600
    secagg_stage_s = 60
    eval_s = 120
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import math
import os
import re
import secrets
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.train.model_names import MODEL_NAMES, TASK_OF_MODEL, ModelParamError, check_model_params

EVAL_SPLITS = ("val", "test", "train")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold")
OPTIMIZERS = ("sgd", "adam")
JOB_NAME_MAX = 100  # characters of job.name

# Which strategy parameters each strategy reads (all others are refused, so a
# typo such as "server_lr" is an error rather than a silent default).
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": ("server_learning_rate",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedprox": ("server_learning_rate", "mu"),
    "fedadam": ("server_learning_rate", "beta1", "beta2", "tau"),
    "fedyogi": ("server_learning_rate", "beta1", "beta2", "tau"),
    "fedadagrad": ("server_learning_rate", "beta1", "tau"),
    "scaffold": ("server_learning_rate",),
}
STRATEGY_DEFAULTS: dict[str, float] = {
    "server_learning_rate": 1.0,
    "server_momentum": 0.9,
    "mu": 0.01,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
}


# Differential privacy is not a strategy: said where a plan names one as if it were
_DP_IS_PRIVACY = ("; differential privacy is set in the [privacy] table with any of "
                  "these strategies, not as one: DP-FedAvg is privacy.client_dp = "
                  "{ clip_norm, noise_multiplier, cohort_size }, DP-SGD is privacy.dp = "
                  "{ noise_multiplier, delta, ... }")


class PlanError(ValueError):
    """An invalid job plan; ``field`` is the dotted TOML path of the culprit."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"plan field {field} = {value!r}: {rule}")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int | None
    steps: int | None
    batch_size: int
    optimizer: str
    learning_rate: float
    momentum: float
    weight_decay: float


@dataclass(frozen=True)
class StrategySettings:
    name: str
    params: dict[str, float]

    def get(self, key: str) -> float:
        return self.params.get(key, STRATEGY_DEFAULTS[key])


@dataclass(frozen=True)
class SecAggSettings:
    enabled: bool
    alpha: float
    delta: float
    clip: float


@dataclass(frozen=True)
class Deadlines:
    cohort_s: float
    train_s: float
    secagg_stage_s: float
    eval_s: float


@dataclass(frozen=True)
class Plan:
    text: str
    dataset: str
    rounds: int
    min_clients: int
    seed: int
    max_failed_attempts: int
    model_name: str
    model_params: dict[str, Any]
    train: TrainSettings
    strategy: StrategySettings
    secagg: SecAggSettings
    privacy: dict[str, Any]
    deadlines: Deadlines
    extra: dict[str, Any] = field(default_factory=dict)
    # The split every site evaluates each round's global model on; "val" keeps the
    # test rows unseen until the job is over (default "test": the final report).
    eval_split: str = "test"
    # job.name, a label for people ("" when the plan has none). Checked at submission
    # (check_submission); a stored plan from before that check gives its name if it
    # is a string, cut to JOB_NAME_MAX characters, else "".
    name: str = ""
    # job.classes: the class names in label order every site's data set must declare
    # (fedge.coordinator.cohort, fedge.agent.runtime); () when the plan names none.
    classes: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def prox_mu(self) -> float:
        """The FedProx proximal weight the clients use (0 for other strategies)."""
        return self.strategy.get("mu") if self.strategy.name == "fedprox" else 0.0

    @property
    def scaffold(self) -> bool:
        """SCAFFOLD: tasks carry the server control variate c, updates carry Δc."""
        return self.strategy.name == "scaffold"


_TOP = ("job", "model", "train", "strategy", "secagg", "privacy", "deadlines")

# Byte-order marks an editor may put in front of a plan (Windows Notepad saves
# "Unicode" as UTF-16 LE with a BOM, or "UTF-8 with BOM"). UTF-32's come first: the
# UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def read_plan_file(path: str | os.PathLike[str]) -> str:
    """The text of a plan file: UTF-8, or whatever encoding its byte-order mark names
    (UTF-8, UTF-16 or UTF-32 with a BOM); the mark itself is not part of the text.

    Raises:
        OSError: the file cannot be read.
        PlanError: the bytes are not text in that encoding, or hold NUL characters
            (UTF-16 saved without a BOM); one line naming the file and the byte.
    """
    data = Path(path).read_bytes()
    encoding, start = "utf-8", 0
    for bom, name in _BOMS:
        if data.startswith(bom):
            encoding, start = name, len(bom)
            break
    try:
        text = data[start:].decode(encoding)
    except UnicodeDecodeError as exc:
        at = start + exc.start
        raise PlanError("<toml>", str(path),
                        f"not {encoding.upper()} text: byte 0x{data[at]:02x} at offset {at} "
                        "cannot be decoded; save the plan as UTF-8") from None
    if "\x00" in text:
        raise PlanError("<toml>", str(path),
                        "holds NUL characters (UTF-16 saved without a byte-order mark?); "
                        "save the plan as UTF-8")
    return text


def parse_plan(text: str) -> Plan:
    """Parse and check a plan.

    The same text gives the same (frozen) Plan, parsed once: the DP feasibility check
    runs an accountant (a tenth of a second, several on a loaded machine the first
    time), and agents and the coordinator see a job's plan every round.

    Raises:
        PlanError: malformed TOML, an unknown table or key, a missing field, or a
            value outside its rule; the message names the field and the rule.
    """
    if not isinstance(text, str):
        raise PlanError("<toml>", type(text).__name__, "a plan is TOML text")
    return _parse_plan(text)


@functools.lru_cache(maxsize=64)
def _parse_plan(text: str) -> Plan:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PlanError("<toml>", text[:40], f"not valid TOML: {exc}") from exc
    except RecursionError as exc:  # nested past the parser's depth: not a plan
        raise PlanError("<toml>", text[:40], "not valid TOML: nested too deeply") from exc
    for key in raw:
        if key not in _TOP:
            raise PlanError(key, raw[key], f"unknown table; expected one of {', '.join(_TOP)}")
    job = _table(raw, "job")
    model = _table(raw, "model")
    train = _table(raw, "train")
    strat = _table(raw, "strategy")
    sec = _table(raw, "secagg", required=False)
    dead = _table(raw, "deadlines", required=False)
    privacy = _table(raw, "privacy", required=False)
    _known(job, "job", ("dataset", "rounds", "min_clients", "seed", "max_failed_attempts", "name",
                        "eval_split", "classes"))
    _known(model, "model", ("name", "params"))
    _known(train, "train", ("epochs", "steps", "batch_size", "optimizer", "learning_rate",
                            "momentum", "weight_decay"))
    _known(sec, "secagg", ("enabled", "alpha", "delta", "clip"))
    _known(dead, "deadlines", ("cohort_s", "train_s", "secagg_stage_s", "eval_s"))

    # NFC: the name an agent.toml declares is read so too (one spelling of 'é' whether
    # an editor wrote it composed or not); the plan's text itself stays as given
    dataset = unicodedata.normalize("NFC", _str(job, "job.dataset"))
    rounds = _int(job, "job.rounds", lo=1)
    min_clients = _int(job, "job.min_clients", lo=1, default=2)
    seed = _int(job, "job.seed", lo=0, default=0)
    max_failed = _int(job, "job.max_failed_attempts", lo=1, default=3)
    eval_split = _str(job, "job.eval_split", default="test")
    name = job.get("name", "")
    name = name[:JOB_NAME_MAX] if isinstance(name, str) else ""
    if eval_split not in EVAL_SPLITS:
        raise PlanError("job.eval_split", eval_split, f"must be one of {', '.join(EVAL_SPLITS)}")
    classes = _classes(job)

    model_name = _str(model, "model.name")
    if model_name not in MODEL_NAMES:
        raise PlanError("model.name", model_name,
                        f"not a registered model; known: {', '.join(MODEL_NAMES)}")
    params = model.get("params", {})
    if not isinstance(params, dict):
        raise PlanError("model.params", params, "must be a table")

    epochs = _int(train, "train.epochs", lo=1, default=None)
    steps = _int(train, "train.steps", lo=1, default=None)
    if (epochs is None) == (steps is None):
        raise PlanError("train.epochs", epochs, "give exactly one of train.epochs, train.steps")
    optimizer = _str(train, "train.optimizer", default="sgd")
    if optimizer not in OPTIMIZERS:
        raise PlanError("train.optimizer", optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    tsettings = TrainSettings(
        epochs=epochs,
        steps=steps,
        batch_size=_int(train, "train.batch_size", lo=1),
        optimizer=optimizer,
        learning_rate=_float(train, "train.learning_rate", lo=0.0, lo_open=True),
        momentum=_float(train, "train.momentum", lo=0.0, hi=1.0, hi_open=True, default=0.0),
        weight_decay=_float(train, "train.weight_decay", lo=0.0, default=0.0),
    )

    sname = _str(strat, "strategy.name")
    if sname not in STRATEGIES:
        raise PlanError("strategy.name", sname, f"must be one of {', '.join(STRATEGIES)}"
                        + (_DP_IS_PRIVACY if "dp" in sname.lower() else ""))
    allowed = STRATEGY_PARAMS[sname]
    sparams: dict[str, float] = {}
    for key, value in strat.items():
        if key == "name":
            continue
        if key not in allowed:
            raise PlanError(f"strategy.{key}", value,
                            f"not a parameter of {sname}; it takes {', '.join(allowed)}")
        if key in ("beta1", "beta2", "server_momentum"):
            sparams[key] = _float(strat, f"strategy.{key}", lo=0.0, hi=1.0, hi_open=True)
        elif key == "mu":
            sparams[key] = _float(strat, f"strategy.{key}", lo=0.0)
        else:
            sparams[key] = _float(strat, f"strategy.{key}", lo=0.0, lo_open=True)

    ssettings = SecAggSettings(
        enabled=_bool(sec, "secagg.enabled", default=True),
        alpha=_float(sec, "secagg.alpha", lo=0.0, hi=1.0, hi_open=True, default=0.1),
        delta=_float(sec, "secagg.delta", lo=0.0, hi=1.0, hi_open=True, default=0.0),
        clip=_float(sec, "secagg.clip", lo=0.0, lo_open=True, default=1.0),
    )
    if ssettings.enabled and min_clients < 2:
        raise PlanError("job.min_clients", min_clients,
                        "must be >= 2 when secagg.enabled: a sum of one input reveals it")
    if sname == "scaffold":  # first: no privacy table is allowed there, valid or not
        _check_scaffold(tsettings, privacy)
    _check_privacy(privacy, tsettings, rounds)
    deadlines = Deadlines(
        cohort_s=_float(dead, "deadlines.cohort_s", lo=0.0, lo_open=True, default=60.0),
        train_s=_float(dead, "deadlines.train_s", lo=0.0, lo_open=True, default=600.0),
        secagg_stage_s=_float(dead, "deadlines.secagg_stage_s", lo=0.0, lo_open=True,
                              default=60.0),
        eval_s=_float(dead, "deadlines.eval_s", lo=0.0, lo_open=True, default=120.0),
    )
    return Plan(
        text=text, dataset=dataset, rounds=rounds, min_clients=min_clients, seed=seed,
        max_failed_attempts=max_failed, model_name=model_name, model_params=dict(params),
        train=tsettings, strategy=StrategySettings(sname, sparams), secagg=ssettings,
        privacy=dict(privacy), deadlines=deadlines, eval_split=eval_split, name=name,
        classes=classes,
    )


CLASSES_MAX = 1000  # fedge.wire.messages.CLASSES_MAX: what a site can declare
CLASS_NAME_MAX = 255


def _classes(job: dict[str, Any]) -> tuple[str, ...]:
    """``job.classes``: two or more distinct, non-empty class names (at most
    CLASSES_MAX, each at most CLASS_NAME_MAX characters, printable); () when absent.

    Raises: PlanError: any other value, naming the rule broken."""
    if "classes" not in job:
        return ()
    value = job["classes"]
    rule = ("must be a list of 2 or more distinct, non-empty class names in label order, "
            "the same list as each site's agent.toml datasets.classes")
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise PlanError("job.classes", value, rule)
    if len(value) < 2:
        raise PlanError("job.classes", value, f"{rule} (a classifier of one class learns "
                        "nothing)")
    if len(value) > CLASSES_MAX:
        raise PlanError("job.classes", f"{len(value)} names", f"{rule}; at most {CLASSES_MAX}")
    bad = [c for c in value if not c.strip() or not c.isprintable() or len(c) > CLASS_NAME_MAX]
    if bad:
        raise PlanError("job.classes", value[:20], f"{rule}; {bad[0][:40]!r} is empty, not "
                        f"printable or over {CLASS_NAME_MAX} characters")
    repeated = sorted({c for c in value if value.count(c) > 1})
    if repeated:
        raise PlanError("job.classes", value[:20], f"{rule}; {repeated} appear more than once")
    return tuple(value)


# The keys of privacy.dp and privacy.client_dp and their rules are those of
# fedge.train.privacy's DPConfig and ClientDPConfig, which the agents apply to the
# same tables (tests/coordinator/test_plan.py holds the two together); checked here
# too so that a bad table is refused at submit, named by its place in the plan.
DP_KEYS = ("noise_multiplier", "max_grad_norm", "delta", "target_epsilon", "cox_per_term")
CLIENT_DP_KEYS = ("clip_norm", "noise_multiplier", "cohort_size")


def _check_privacy(privacy: dict[str, Any], train: TrainSettings, rounds: int) -> None:
    """Check the ``dp`` and ``client_dp`` tables, and refuse a plan whose record-level DP
    target cannot be met with the rounds asked. (DP-SGD on a Cox model needs
    ``cox_per_term = true``: a rule for new jobs, in `check_submission`.)

    The worst case is the smallest site: sampling rate batch_size / min_site_examples.
    A site smaller than declared (or whose epochs round up to more steps a round)
    refuses the job before its first released run, with its own rows and ε, so it
    spends nothing (``fedge.train.api.local_train`` given the plan's rounds).

    Raises:
        PlanError: an unknown privacy key, a missing or out-of-range ``dp`` or
            ``client_dp`` field, a missing ``min_site_examples`` where a target is
            set, or a target that cannot be met (with the numbers).
    """
    _known(privacy, "privacy", ("dp", "client_dp", "min_site_examples"))
    if "min_site_examples" in privacy:
        _int(privacy, "privacy.min_site_examples", lo=1)
    client_dp = privacy.get("client_dp")
    if client_dp is not None:
        if not isinstance(client_dp, dict):
            raise PlanError("privacy.client_dp", client_dp, "must be a table")
        _known(client_dp, "privacy.client_dp", CLIENT_DP_KEYS)
        _float(client_dp, "privacy.client_dp.clip_norm", lo=0.0, lo_open=True)
        _float(client_dp, "privacy.client_dp.noise_multiplier", lo=0.0)
        _int(client_dp, "privacy.client_dp.cohort_size", lo=1)
    dp = privacy.get("dp")
    if dp is None:
        return
    if not isinstance(dp, dict):
        raise PlanError("privacy.dp", dp, "must be a table")
    _known(dp, "privacy.dp", DP_KEYS)
    sigma = _float(dp, "privacy.dp.noise_multiplier", lo=0.0, lo_open=True)
    _float(dp, "privacy.dp.max_grad_norm", lo=0.0, lo_open=True, default=1.0)
    delta = _float(dp, "privacy.dp.delta", lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                   default=1e-5)
    _bool(dp, "privacy.dp.cox_per_term", default=False)  # its rule: check_submission
    if dp.get("target_epsilon") is None:
        return
    target = _float(dp, "privacy.dp.target_epsilon", lo=0.0, lo_open=True)
    if "min_site_examples" not in privacy:
        raise PlanError("privacy.min_site_examples", None,
                        "required with privacy.dp.target_epsilon: the smallest site's "
                        "training rows bound the sampling rate batch_size / n")
    n_min = _int(privacy, "privacy.min_site_examples", lo=1)
    q = min(1.0, train.batch_size / n_min)
    steps = train.steps if train.steps is not None else \
        (train.epochs or 1) * math.ceil(n_min / train.batch_size)
    from fedge.train.accounting import PrivacyBudgetError, check_dp_plan

    try:
        check_dp_plan(target_epsilon=target, delta=delta, rounds=rounds, steps_per_round=steps,
                      sampling_rate=q, noise_multiplier=sigma)
    except PrivacyBudgetError as exc:
        raise PlanError("privacy.dp.target_epsilon", target, str(exc)) from None


def _check_scaffold(train: TrainSettings, privacy: dict[str, Any]) -> None:
    """Refuse what SCAFFOLD's option II control variate does not hold for.

    c_i⁺ = c_i − c + (w − y_i)/(K·lr) is the mean corrected gradient of K plain SGD
    steps; with momentum or Adam it is not. DP-SGD (``dp``) and DP-FedAvg
    (``client_dp``) privatise the weights but Δc_i would leave the site un-noised.

    Raises:
        PlanError: naming the offending field.
    """
    if train.optimizer != "sgd":
        raise PlanError("train.optimizer", train.optimizer,
                        "strategy scaffold needs plain sgd (option II control variates "
                        "assume K plain SGD steps)")
    if train.momentum != 0.0:
        raise PlanError("train.momentum", train.momentum,
                        "strategy scaffold needs momentum = 0 (option II control variates "
                        "assume K plain SGD steps)")
    for key in ("dp", "client_dp"):
        if key in privacy:
            raise PlanError(f"privacy.{key}", privacy[key],
                            "not supported with strategy scaffold: the control variate "
                            "update Δc_i would leave the site without noise")


def _table(raw: dict[str, Any], name: str, *, required: bool = True) -> dict[str, Any]:
    if name not in raw:
        if required:
            raise PlanError(name, None, "required table is missing")
        return {}
    value = raw[name]
    if not isinstance(value, dict):
        raise PlanError(name, value, "must be a table")
    return value


def _known(table: dict[str, Any], prefix: str, keys: tuple[str, ...]) -> None:
    for key in table:
        if key not in keys:
            raise PlanError(f"{prefix}.{key}", table[key],
                            f"unknown key; {prefix} takes {', '.join(keys)}")


_MISSING = object()


def _get(table: dict[str, Any], dotted: str, default: Any) -> Any:
    key = dotted.rsplit(".", 1)[-1]
    if key in table:
        return table[key]
    if default is _MISSING:
        raise PlanError(dotted, None, "required field is missing")
    return default


def _str(table: dict[str, Any], dotted: str, default: Any = _MISSING) -> str:
    value = _get(table, dotted, default)
    if not isinstance(value, str) or not value:
        raise PlanError(dotted, value, "must be a non-empty string")
    return value


def _bool(table: dict[str, Any], dotted: str, default: Any = _MISSING) -> bool:
    value = _get(table, dotted, default)
    if not isinstance(value, bool):
        raise PlanError(dotted, value, "must be true or false")
    return value


def _int(table: dict[str, Any], dotted: str, *, lo: int, default: Any = _MISSING) -> Any:
    value = _get(table, dotted, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(dotted, value, "must be an integer")
    if value < lo:
        raise PlanError(dotted, value, f"must be >= {lo}")
    return value


def _float(table: dict[str, Any], dotted: str, *, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           default: Any = _MISSING) -> float:
    value = _get(table, dotted, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PlanError(dotted, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise PlanError(dotted, value, "must be finite")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise PlanError(dotted, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise PlanError(dotted, value, f"must be {'<' if hi_open else '<='} {hi}")
    return value


_JOB_HEADER = re.compile(r"""^[ \t]*\[[ \t]*(job|"job"|'job')[ \t]*\][ \t]*(#.*)?$""",
                         re.MULTILINE)
# an inline job table, up to its opening brace: job = { dataset = "...", ... }
_JOB_INLINE = re.compile(r"""^[ \t]*(job|"job"|'job')[ \t]*=[ \t]*\{""", re.MULTILINE)


def check_submission(text: str) -> Plan:
    """`parse_plan`, plus the rules a plan must meet to be submitted now but that a
    job stored by an earlier release may predate (its status must stay readable, and
    its sites, which apply the same rules, refuse it with the reason):

    - ``model.params`` holds only the parameters the model takes, each by its rule
      (fedge.train.model_names.MODEL_PARAMS): a misspelt one would otherwise leave
      the default silently in its place. The sites and the coordinator's starting
      model are built by fedge.train, which applies the same rule, so a stored job
      that predates it is refused there, saying why. (A missing required parameter
      is named when the starting model is built.)
    - DP-SGD on a Cox model needs ``privacy.dp.cox_per_term = true``: its ε bounds
      one loss term, not one record.
    - The DP rules of `_check_dp_release` (the training split is not evaluated
      under DP, DP-FedAvg has noise, needs secure aggregation over a cohort, and a
      ``secagg.clip`` that leaves its noise whole; δ well below 1/n). Sites hold
      their side of these themselves: they refuse an evaluation on the training
      split under DP (fedge.agent.guard.refuse_eval), a ``client_dp`` without noise
      (fedge.train.privacy.ClientDPConfig; a ``require_dp`` appliance counts it as no
      DP) and a plain aggregation of DP-FedAvg noise sized for a cohort.

    - ``job.name``, where given, is a string of at most JOB_NAME_MAX characters
      without control characters (it is printed in tables and titles).
    - ``job.rounds`` is at most ROUNDS_MAX, and the model has at most
      MODEL_PARAMS_MAX parameters (`model_parameter_count`).
    - ``job.classes`` is not set for a Cox model (survival data has no classes).
    - ``train.momentum`` is 0 (or left out) unless ``train.optimizer = "sgd"``: the
      sites' Adam does not read it, so it would be silently ignored.

    Raises: PlanError, naming the field and the rule.
    """
    _check_rounds(text)  # first: parse_plan's DP accountant runs over every round
    plan = parse_plan(text)
    _check_job_name(tomllib.loads(text).get("job", {}))
    try:
        check_model_params(plan.model_name, plan.model_params)
    except ModelParamError as exc:
        raise PlanError(f"model.params.{exc.key}", exc.value, exc.rule) from None
    _check_model_size(plan)
    if plan.train.momentum != 0.0 and plan.train.optimizer != "sgd":
        raise PlanError("train.momentum", plan.train.momentum,
                        f"applies to optimizer = \"sgd\" only: with train.optimizer = "
                        f"{plan.train.optimizer!r} it would be ignored (Adam's own momentum "
                        "is its beta1 = 0.9, fixed). Leave train.momentum out, or use "
                        "optimizer = \"sgd\"")
    if plan.classes and TASK_OF_MODEL.get(plan.model_name) == "survival":
        raise PlanError("job.classes", list(plan.classes),
                        f"model {plan.model_name!r} is a Cox (survival) model: job.classes "
                        "names the class order of a classification data set; leave it out")
    dp = plan.privacy.get("dp")
    if isinstance(dp, dict) and TASK_OF_MODEL.get(plan.model_name) == "survival" \
            and dp.get("cox_per_term") is not True:
        from fedge.train.accounting import COX_DP_RULE

        raise PlanError("privacy.dp.cox_per_term", dp.get("cox_per_term", False),
                        f"model {plan.model_name!r} is a Cox model. {COX_DP_RULE}")
    _check_dp_release(plan)
    return plan


# The most parameters a submitted model may have. 50 M float32 parameters are 200 MB
# for each copy: a TrainTask carries one (SCAFFOLD two, 400 MB), well inside the
# agents' 1 GiB message limit (fedge.agent.runtime), and the coordinator holds a few
# copies per round (weights, strategy state, sums) besides SecAgg+'s masks, each d
# long. The largest model in the examples, tests and bench (resnet_small, width 16)
# has about 0.08 M; a typo such as hidden = [100000, 100000] has 10 000 M (40 GB),
# which the coordinator's child would try to allocate when the job starts.
MODEL_PARAMS_MAX = 50_000_000


def model_parameter_count(name: str, params: dict[str, Any]) -> int | None:
    """The number of parameters (weights and biases) of model ``name`` built with
    ``params``, counted from the shapes fedge.train.models builds, without building
    it (tests/coordinator/test_plan_limits.py holds the two together); None when a
    required parameter is missing or not an integer (the builder names it).

    Raises: KeyError: ``name`` is not a registered model."""
    from fedge.train.model_names import MODEL_PARAMS

    declared = MODEL_PARAMS[name]

    def get(key: str) -> Any:
        value = params.get(key, declared[key].default)
        if key == "hidden":
            ok = isinstance(value, list | tuple) and all(
                isinstance(h, int) and not isinstance(h, bool) for h in value)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise _Uncountable
        return value

    def linear(d_in: int, d_out: int) -> int:
        return d_in * d_out + d_out

    def mlp(d_in: int, hidden: list[int], d_out: int) -> int:
        total, prev = 0, d_in
        for h in hidden:
            total, prev = total + linear(prev, h), h
        return total + linear(prev, d_out)

    try:
        if name == "linear":
            return linear(get("in_features"), get("out_features"))
        if name == "logistic":
            k = get("classes")
            return linear(get("in_features"), 1 if k == 2 else k)
        if name == "mlp":
            return mlp(get("in_features"), get("hidden"), get("out_features"))
        if name == "cox_linear":
            return linear(get("in_features"), 1)
        if name == "cox_mlp":
            return mlp(get("in_features"), get("hidden"), 1)
        if name == "resnet_small":
            c, w, k = get("in_channels"), get("width"), get("classes")

            def block(c_in: int, c_out: int) -> int:  # stride 2: always a 1x1 skip conv
                return 9 * c_in * c_out + 9 * c_out * c_out + c_in * c_out + 4 * c_out

            return (9 * c * w + 2 * w  # stem: conv and GroupNorm
                    + block(w, w) + block(w, 2 * w) + block(2 * w, 4 * w)
                    + linear(4 * w, 1 if k == 2 else k))
    except _Uncountable:
        return None
    raise KeyError(name)


def model_input_shape(name: str, params: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape of one example model ``name`` takes with ``params``, as
    fedge.train.models.input_shape gives it (without torch): ``(in_features,)`` for
    the tabular models, ``(in_channels, image_size, image_size)`` for resnet_small;
    None when a parameter it needs is missing or not an integer (the builder names
    it). Raises: KeyError: ``name`` is not a registered model."""
    from fedge.train.model_names import MODEL_PARAMS

    declared = MODEL_PARAMS[name]
    keys = ("in_channels", "image_size", "image_size") if name == "resnet_small" \
        else ("in_features",)
    shape = tuple(params.get(k, declared[k].default) for k in keys)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        return None
    return shape


def check_required_model_params(plan: Plan) -> None:
    """Refuse a plan whose model leaves out a parameter that has no default
    (fedge.train.model_names.MODEL_PARAMS, ``default=None``: ``in_features`` of the
    tabular models), which the coordinator's starting model and every site's build
    would otherwise refuse only once the job has started.

    Not part of `check_submission`: a coordinator given its starting weights
    (``initial_weights``, as tests and in-process federations do) never builds the
    model from the plan, and its plans may leave the widths out. Called at submit by
    Coordinator.submit_job where the coordinator builds it (torch_initial_weights,
    the console's path) and by `fedge coordinator submit`.

    Raises: PlanError: naming model.params.<key>, the model and the rule."""
    from fedge.train.model_names import MODEL_PARAMS

    for key, param in MODEL_PARAMS[plan.model_name].items():
        if param.default is None and key not in plan.model_params:
            what = (" (the number of feature columns of the data set at each site)"
                    if key == "in_features" else "")
            raise PlanError(f"model.params.{key}", None,
                            f"required by model {plan.model_name!r}, which has no default "
                            f"for it{what}; give it in model.params ({param.rule})")


class _Uncountable(Exception):
    """A model parameter the count cannot use (missing, not an integer)."""


def _check_model_size(plan: Plan) -> None:
    """Raises: PlanError: the model has more than MODEL_PARAMS_MAX parameters, naming
    the parameter that sizes it, the count and the limit."""
    count = model_parameter_count(plan.model_name, plan.model_params)
    if count is None or count <= MODEL_PARAMS_MAX:
        return
    params = plan.model_params
    key = next((k for k in ("hidden", "width", "in_features", "in_channels", "classes",
                            "out_features") if k in params), None)
    where, value = (f"model.params.{key}", params[key]) if key else ("model.params", params)
    raise PlanError(where, value,
                    f"model {plan.model_name!r} would have {count:,} parameters "
                    f"({count * 4 / 1e9:.3g} GB as float32), more than the limit of "
                    f"{MODEL_PARAMS_MAX:,}: every site and the coordinator hold several "
                    "copies and send it each round. A typo in model.params?")


# The most rounds a submitted job may plan. Federated benchmarks run tens to a few
# hundred rounds (FLamby's Fed-TCGA-BRCA: 15 at most); 10000 leaves ample room while a
# typo (1e11) would hold the queue for good, and the DP accountant that checks a
# target epsilon composes every round (at 1e11 it runs for minutes).
ROUNDS_MAX = 10_000


def _check_rounds(text: str) -> None:
    """Raises: PlanError: ``job.rounds`` is an integer above ROUNDS_MAX (any other
    fault in it, or in the TOML, is parse_plan's to name)."""
    try:
        job = tomllib.loads(text).get("job")
    except (tomllib.TOMLDecodeError, RecursionError):
        return
    rounds = job.get("rounds") if isinstance(job, dict) else None
    if isinstance(rounds, int) and not isinstance(rounds, bool) and rounds > ROUNDS_MAX:
        raise PlanError("job.rounds", rounds,
                        f"must be <= {ROUNDS_MAX}: a job of more rounds holds the queue "
                        "for good (a typo?)")


def _check_job_name(job: Any) -> None:
    """Raises: PlanError: ``job.name`` is not a short printable string."""
    if not isinstance(job, dict) or "name" not in job:
        return
    value = job["name"]
    rule = (f"must be a string of at most {JOB_NAME_MAX} characters (a label shown in "
            "`jobs list`, job status and the report's title)")
    if not isinstance(value, str):
        raise PlanError("job.name", value, rule)
    if len(value) > JOB_NAME_MAX:
        raise PlanError("job.name", value[:40] + "…",
                        f"{rule}; this one has {len(value)}")
    if not value.isprintable():
        raise PlanError("job.name", value, f"{rule}, without line breaks or control "
                        "characters")


# Under DP-FedAvg each site clips its noised update elementwise to ±secagg.clip
# (fedge.agent.runtime.Agent.clipped_update): the clip must sit this many standard
# deviations of the site's noise share above zero to leave the noise whole.
CLIENT_DP_CLIP_SIGMAS = 6.0


def _round_up(x: float, digits: int = 4) -> float:
    """``x`` rounded up to ``digits`` significant digits (a bound that, written as
    shown, still holds)."""
    if x <= 0:
        return x
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / step * (1 - 1e-12)) * step:.{digits}g}")


def _round_down(x: float, digits: int = 2) -> float:
    """``x`` rounded down to ``digits`` significant digits."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.floor(x / step * (1 + 1e-12)) * step:.{digits}g}")


def _check_dp_release(plan: Plan) -> None:
    """The rules that keep what a DP plan releases inside its ε (`check_submission`).

    - ``job.eval_split = "train"`` is refused with ``privacy.dp`` or
      ``privacy.client_dp``: evaluation metrics leave the sites without noise, and on
      the training split they are about the very records the ε protects. (On the
      validation and test splits they are released without noise too, outside ε,
      about records that were not trained on.)
    - ``privacy.client_dp.noise_multiplier`` must be > 0: without noise DP-FedAvg
      only clips, and each update leaves the site as it was trained.
    - ``privacy.client_dp.cohort_size`` > 1 needs ``secagg.enabled``: each site's
      noise share is sized for the sum of cohort_size sites (std z·S/√K), so an
      update seen alone carries z/√K of noise, not z.
    - under ``privacy.client_dp``, ``secagg.clip`` >= 6·z·S/√K: each site clips its
      noised update elementwise to ±secagg.clip before it is summed (plain or
      masked), and a clip nearer its noise share cuts the noise off.
    - with ``privacy.min_site_examples`` = n, ``privacy.dp.delta`` must be below
      1/n: a δ of 1/n allows releasing a whole record of n outright. (Without n the
      sites check δ against their own rows.)

    Raises: PlanError, naming the field, the numbers and the rule.
    """
    privacy = plan.privacy
    dp = privacy.get("dp")
    client_dp = privacy.get("client_dp")
    if (dp is not None or client_dp is not None) and plan.eval_split == "train":
        raise PlanError("job.eval_split", plan.eval_split,
                        "not allowed with privacy.dp or privacy.client_dp: evaluation "
                        "metrics leave the sites without noise, outside the plan's ε, and "
                        "on the training split they are about the very records ε "
                        'protects; evaluate on "val" or "test"')
    if isinstance(client_dp, dict):
        z = float(client_dp["noise_multiplier"])
        clip_norm = float(client_dp["clip_norm"])
        cohort = int(client_dp["cohort_size"])
        if not z > 0:
            raise PlanError("privacy.client_dp.noise_multiplier", client_dp["noise_multiplier"],
                            "must be > 0: without noise DP-FedAvg only clips, and each "
                            "site's update leaves it as trained (no ε)")
        if cohort > 1 and not plan.secagg.enabled:
            raise PlanError("secagg.enabled", plan.secagg.enabled,
                            f"privacy.client_dp.cohort_size = {cohort} needs secure "
                            f"aggregation: each site's noise share is sized for the sum of "
                            f"{cohort} sites (std z·S/√{cohort}), so an update seen alone "
                            f"carries 1/√{cohort} of the plan's noise; enable secagg, or "
                            "set cohort_size = 1")
        std = z * clip_norm / math.sqrt(cohort)
        need = CLIENT_DP_CLIP_SIGMAS * std
        if plan.secagg.clip < need * (1 - 1e-9):
            raise PlanError("secagg.clip", plan.secagg.clip,
                            f"too small for privacy.client_dp: each site clips its noised "
                            f"update elementwise to ±secagg.clip, and its noise share has "
                            f"std z·S/√K = {z:g}·{clip_norm:g}/√{cohort} = {std:.4g}; a clip "
                            f"below {CLIENT_DP_CLIP_SIGMAS:g} std cuts into the noise. "
                            f"Set secagg.clip >= {_round_up(need):g}")
    if isinstance(dp, dict) and "min_site_examples" in privacy:
        n = int(privacy["min_site_examples"])
        delta = float(dp.get("delta", 1e-5))
        if delta >= 1.0 / n:
            raise PlanError("privacy.dp.delta", delta,
                            f"must be well below 1/min_site_examples = 1/{n} = {1.0 / n:.3g}: "
                            f"a delta of 1/n allows a mechanism that releases one of the n "
                            f"records outright; take delta <= {_round_down(0.1 / n):g} "
                            "(1e-5 or smaller is usual)")


def plan_labels(text: str) -> dict[str, str]:
    """``{"name", "dataset", "model"}`` of a stored plan for listing it: ``job.name``,
    ``job.dataset`` and ``model.name``, each "" where the plan lacks it or holds no
    string there. Reads the TOML only (no rule is checked, no accountant run), and
    never raises: a job list shows every job, whatever its plan."""
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, TypeError):
        return {"name": "", "dataset": "", "model": ""}
    job, model = raw.get("job"), raw.get("model")
    job = job if isinstance(job, dict) else {}
    model = model if isinstance(model, dict) else {}

    def text_of(table: dict[str, Any], key: str) -> str:
        value = table.get(key, "")
        return value[:JOB_NAME_MAX] if isinstance(value, str) else ""
    return {"name": text_of(job, "name"),
            "dataset": unicodedata.normalize("NFC", text_of(job, "dataset")),
            "model": text_of(model, "name")}


def with_seed(text: str) -> str:
    """``text`` with ``seed = <fresh random>`` written into its job table when the
    plan names no seed, so the job is reproducible from what is stored, and two jobs
    do not train bit-identical updates: sites refuse to have one update summed over
    two different survivor sets (fedge.agent.guard.RevealLog), so jobs sharing a
    seed and a model could not be re-run over other sites. A plan that names its
    seed is returned unchanged. Used at submission: the plan is checked as
    `check_submission` does.

    The seed goes under a ``[job]`` header, into an inline ``job = { ... }`` table,
    or, for a job written as dotted keys (``job.dataset = ...``), as ``job.seed`` at
    the top; the result is parsed again and must differ from the plan by the seed
    alone.

    Raises: PlanError, as check_submission; or ``job`` names no seed and none could
    be written in (a layout none of the above fits), saying to use a [job] header.
    """
    check_submission(text)
    raw = tomllib.loads(text)
    job = raw.get("job", {})
    if "seed" in job:
        return text
    seed = secrets.randbelow(2**31)
    note = "  # chosen at submission"
    candidates = []
    header = _JOB_HEADER.search(text)
    if header is not None:
        at = header.end()
        candidates.append(f"{text[:at]}\nseed = {seed}{note}{text[at:]}")
    inline = _JOB_INLINE.search(text)
    if inline is not None:
        at = inline.end()
        candidates.append(f"{text[:at]} seed = {seed},{text[at:]}")
    candidates.append(f"job.seed = {seed}{note}\n{text}")  # dotted keys
    for seeded in candidates:
        try:
            again = tomllib.loads(seeded)
        except (tomllib.TOMLDecodeError, RecursionError):
            continue
        if isinstance(again.get("job"), dict) and again["job"].pop("seed", None) == seed \
                and again == raw:
            return seeded
    raise PlanError("job.seed", None,
                    "the plan names no seed, and one could not be written into its job "
                    "table: write the job's keys under a [job] header, or give job.seed")
