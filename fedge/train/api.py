"""The interface the agent, the coordinator and the serving side call (docs/CONTRACTS.md).

::

    spec = ModelSpec("cox_linear", {"in_features": 39})
    data = load_site_data(DatasetSpec.from_config(agent_config["datasets"][0]))
    cfg = TrainConfig.from_dict(plan["train"])
    out = local_train(spec, global_flat, data, cfg, round=r)     # TrainOutcome
    ev = evaluate(spec, out.weights, data, "val")               # EvalOutcome

Only flat float32 weights, names and numbers cross this boundary; never rows.

Theory of operation of ``local_train``: the registry builds the model, its
parameters become views of one flat buffer (``FlatParams``) loaded with the
global weights; ``steps`` mini-batches (or ``epochs`` passes) are drawn with a
generator seeded from (seed, round, site). With ``steps`` and a ``ClientState``
the site walks one stream of shuffled epochs across the job's rounds: round r
starts where round r-1 stopped (the last, possibly short, batch of an epoch
included), as FLamby's ``DataLoaderWithMemory`` does, so every training row
is visited equally often whatever ``steps * batch_size`` is. Each step computes the loss's
gradient into the flat gradient buffer (per-example, clipped and noised under
DP-SGD) and the fused optimiser step updates the flat buffer in place, adding
the FedProx proximal and SCAFFOLD correction terms when asked. Then the
optional client-level DP clips and noises the update. A ``cancel`` event, checked
before every step, stops a run whose round was abandoned (``TrainingCancelled``):
nothing of it is recorded in the ledger, and ``state`` is as it was before.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedge.train import metrics as M
from fedge.train.accounting import DP_FEDAVG, DP_SGD, NO_DP
from fedge.train.data import DatasetSpec, SiteData, Split, load_site_data
from fedge.train.model_names import TASKS_OF_KIND
from fedge.train.models import (
    TASK_OF_MODEL,
    ModelSpec,
    build_model,
    cox_log_denominator,
    cox_partial_likelihood,
    cox_risk_sets,
    input_shape,
)
from fedge.train.optim import AdamStepper, FlatParams, SGDStepper, flatten, load_flat
from fedge.train.privacy import (
    COX_DP_RULE,
    ClientDPConfig,
    DPConfig,
    PrivacyBudgetError,
    PrivacyLedger,
    check_dp_plan,
    dp_fedavg_privatise,
    epsilon_for,
    honest_sites,
    private_gradient,
    secret_gaussian,
    secret_uniform,
)

if TYPE_CHECKING:
    import threading

__all__ = [
    "ClientState",
    "DataCursor",
    "DatasetSpec",
    "EvalOutcome",
    "ModelSpec",
    "SiteData",
    "TrainConfig",
    "TrainOutcome",
    "TrainingCancelled",
    "TrainingDiverged",
    "build_model",
    "check_dp_plan",
    "evaluate",
    "flatten",
    "load_flat",
    "load_site_data",
    "local_train",
    "minibatches",
    "predict",
]


class TrainingCancelled(Exception):
    """``local_train`` stopped because its ``cancel`` event was set (its round was
    aborted or superseded): no update, nothing recorded in the privacy ledger."""


class TrainingDiverged(ValueError):
    """The loss or the weights of ``local_train`` became NaN or infinite. Its text is
    made of the plan's settings and step counts only (no value of the data), so the
    agent sends it to the coordinator as it is: what the ML engineer changes."""


def _diverged(what: str, where: str, cfg: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: {what} {where} (the plan's train.learning_rate = {cfg.lr:g}, "
        f"train.optimizer = {cfg.optimizer!r}; try a lower learning rate, and check that "
        "the data set's features are standardised at the sites)")


@dataclass(frozen=True)
class TrainConfig:
    """The plan's ``[train]`` table: what each site does in one round."""

    steps: int | None = None  # local optimiser steps per round; None → epochs
    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw"
    lr: float = 0.01
    lr_decay: float = 1.0  # lr * lr_decay**round
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # FedProx proximal term
    scaffold: bool = False  # SCAFFOLD control variates (needs ClientState)
    loss_reduction: str = "mean"  # Cox: "mean" (per batch example, FLamby) | "events"
    dp: DPConfig | None = None  # record-level DP-SGD
    client_dp: ClientDPConfig | None = None  # client-level DP-FedAvg
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Build from a plan's ``[train]`` table (``dp`` / ``client_dp`` as sub-tables).

        Raises:
            ValueError: an unknown key or a value breaking its rule (named).
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__) - {"learning_rate"})
        if unknown:
            raise ValueError(
                f"train: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        values = dict(d)
        if "learning_rate" in values:  # the plan's spelling
            if "lr" in values:
                raise ValueError("train: give 'lr' or 'learning_rate', not both")
            values["lr"] = values.pop("learning_rate")
        if isinstance(values.get("dp"), Mapping):
            values["dp"] = DPConfig.from_dict(values["dp"])
        if isinstance(values.get("client_dp"), Mapping):
            values["client_dp"] = ClientDPConfig.from_dict(values["client_dp"])
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            if v is None:
                continue
            out[k] = v.__dict__.copy() if isinstance(v, DPConfig | ClientDPConfig) else v
        return out

    def validate(self) -> None:
        """Raises:
        ValueError: naming the field, the value and the rule.
        """

        def positive_int(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"train.{name}={v!r} must be an integer >= 1")

        if self.steps is not None:
            positive_int("steps", self.steps)
        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size)
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"train.optimizer={self.optimizer!r} must be 'sgd', 'adam' or 'adamw'")
        for name in ("lr", "lr_decay"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"train.{name}={v!r} must be a finite number > 0")
        for name in ("momentum", "weight_decay", "prox_mu"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v < 0 or not math.isfinite(v):
                raise ValueError(f"train.{name}={v!r} must be a finite number >= 0")
        if self.momentum >= 1:
            raise ValueError(f"train.momentum={self.momentum} must be < 1")
        if self.loss_reduction not in ("mean", "events", "sum"):
            raise ValueError(
                f"train.loss_reduction={self.loss_reduction!r} must be mean|events|sum"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device={self.device!r} must be 'auto', 'cpu' or 'cuda'")
        if self.scaffold and self.dp is not None:
            raise ValueError(
                "train.scaffold with train.dp is not supported (control variates leak)"
            )
        if self.dp is not None:
            self.dp.validate()


@dataclass
class DataCursor:
    """Where a site's stream of shuffled epochs stands: the epoch's order and position."""

    order: torch.Tensor
    pos: int


@dataclass
class ClientState:
    """What a site keeps between rounds of one job (SCAFFOLD's c_i, the privacy ledger,
    the data cursor of the epoch stream)."""

    scaffold_ci: np.ndarray | None = None
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    job: str = ""
    # round -> cursor at that round's start; a retried round restarts from the same
    # place, so it reproduces the same update. Only the latest two rounds are kept.
    cursors: dict[int, DataCursor] = field(default_factory=dict)

    def cursor_arrays(self) -> dict[str, np.ndarray]:
        """The cursors as named arrays (``order<r>``, ``pos<r>``), for the agent to keep
        on disk; :meth:`restore_cursors` reads them back."""
        out: dict[str, np.ndarray] = {}
        for r, cur in self.cursors.items():
            out[f"order{r}"] = cur.order.cpu().numpy().astype(np.int64)
            out[f"pos{r}"] = np.array(cur.pos, dtype=np.int64)
        return out

    def restore_cursors(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Replace the cursors with those of :meth:`cursor_arrays`' output.

        Raises:
            ValueError: an array is missing, misnamed or of the wrong shape (named).
        """
        cursors: dict[int, DataCursor] = {}
        for name, order in arrays.items():
            if not name.startswith("order"):
                continue
            r = name.removeprefix("order")
            pos = arrays.get(f"pos{r}")
            if not r.lstrip("-").isdigit() or pos is None or pos.shape != () \
                    or order.ndim != 1 or not 0 <= int(pos) <= order.size:
                raise ValueError(f"data cursor {name!r}: not a saved cursor")
            cursors[int(r)] = DataCursor(torch.from_numpy(order.astype(np.int64)), int(pos))
        self.cursors = cursors


@dataclass
class TrainOutcome:
    """One site's round result. ``weights`` are the new local weights (not the delta)."""

    weights: np.ndarray
    n_examples: int
    metrics: dict[str, float]
    # DP-SGD: this job's ε at this site once this update is released (earlier released
    # runs and this one), else None
    epsilon: float | None = None
    delta: float | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "scaffold_delta_c"
    # figures for the site's own log, never sent (under DP-SGD: the raw batches' loss)
    local_metrics: dict[str, float] = field(default_factory=dict)
    # this run's (job, round, attempt) in ``state.ledger``, recorded pending whatever
    # its mechanism (DP-SGD, DP-FedAvg or none); the caller releases it
    # (PrivacyLedger.release) before the update can leave
    ledger_key: tuple[str, int, int] | None = None


@dataclass
class EvalOutcome:
    n_examples: int
    metrics: dict[str, float]


# ---------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _seed(*parts: object) -> int:
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


_KIND_WORDS = {
    "survival": "a Cox (survival) model, whose output is a log-risk",
    "classification": "a classifier, whose output is logits over class labels",
    "regression": "a regression model, whose output is the predicted value",
}
_TASK_NEEDS = {"survival": "a Cox model", "regression": "a model of the target value",
               "binary": "a classifier", "multiclass": "a classifier"}


def _models_for_task(task: str) -> list[str]:
    """The models made for a data set of ``task``: those whose kind is the task's own
    (a classifier for binary or multiclass labels), then mlp, which follows the data
    set's task."""
    family = "classification" if task in ("binary", "multiclass") else task
    return [m for m, kind in TASK_OF_MODEL.items() if kind == family] \
        + [m for m, kind in TASK_OF_MODEL.items() if kind == "any"]


def _task(spec: ModelSpec, data: SiteData) -> str:
    """The task ``spec`` trains for on ``data``: the data set's, once the model's kind,
    input shape and outputs are found to fit it.

    Raises:
        ValueError: naming the data set, its task, the model and what it is, and the
            models made for that task; or the input or output parameter that does
            not fit the site's data.
    """
    kind = TASK_OF_MODEL[spec.name]
    if data.task not in TASKS_OF_KIND[kind]:
        use = _models_for_task(data.task)
        raise ValueError(
            f"data set {data.name!r} is a {data.task} task at this site but model "
            f"{spec.name!r} is {_KIND_WORDS[kind]}, not {_TASK_NEEDS[data.task]}: it would "
            f"train on the wrong loss. For a {data.task} data set use model.name = "
            + ", ".join(repr(m) for m in use[:-1]) + f" or {use[-1]!r}")
    want, x = input_shape(spec), data.train.x
    if x.ndim == 2 and len(want) == 1 and x.shape[1] != want[0]:
        raise ValueError(
            f"data set {data.name!r} has {x.shape[1]} features at this site but "
            f"model.params.in_features is {want[0]}")
    if x.ndim == 4 and len(want) == 3 and x.shape[1] != want[0]:
        raise ValueError(
            f"data set {data.name!r} has {x.shape[1]}-channel images at this site but "
            f"model.params.in_channels is {want[0]}")
    if data.task in ("binary", "multiclass"):
        _check_classes(spec, data)
    else:
        _check_outputs(spec, data)
    return data.task


def _check_outputs(spec: ModelSpec, data: SiteData) -> None:
    """The model's outputs fit a survival or regression data set: one log-risk per
    example for survival, one output per target column for regression. Torch would
    otherwise fail mid-training with a shape error of its own (whose text the agent
    does not send), or, for regression, broadcast the target over the outputs and
    train without error on the wrong loss.

    Raises:
        ValueError: naming the data set, its task and width, the model and the
            parameter that sets its output.
    """
    if spec.name not in ("linear", "mlp"):
        return  # cox_* build one output; a classifier never gets here (_task)
    outputs = spec.params.get("out_features", 1)
    if not isinstance(outputs, int) or isinstance(outputs, bool):
        return  # build_model names the bad parameter
    y = data.train.y
    if data.task == "survival":
        want, what = 1, "a survival task (one log-risk per example)"
    else:
        want = 1 if y.ndim < 2 else int(y.shape[1])
        what = f"a regression task with {want} target column{'' if want == 1 else 's'}"
    if outputs != want:
        raise ValueError(
            f"data set {data.name!r} is {what} at this site but model {spec.name!r} has "
            f"model.params.out_features = {outputs}: give it out_features = {want}")


def _check_classes(spec: ModelSpec, data: SiteData) -> None:
    """The model's output tells apart the site's classes: one logit for binary data,
    one logit per class (at least as many as the site's labels) for multiclass data.

    Raises:
        ValueError: naming the data set, its number of classes, the model and the
            parameter that sets its output.
    """
    if spec.name in ("logistic", "resnet_small"):
        k = spec.params.get("classes", 2)
        param = f"model.params.classes = {k}"
        logits = 1 if k == 2 else k
    else:
        k = logits = spec.params.get("out_features", 1)
        param = f"model.params.out_features = {k}"
    if not isinstance(logits, int) or isinstance(logits, bool):
        return  # build_model names the bad parameter
    if data.task == "binary" and logits != 1:
        raise ValueError(
            f"data set {data.name!r} is binary (labels 0/1) but model {spec.name!r} has "
            f"{param} ({logits} outputs); a binary model has one logit: "
            + ("classes = 2" if spec.name in ("logistic", "resnet_small") else "out_features = 1")
        )
    if data.task == "multiclass":
        if logits < 2 and spec.name in ("logistic", "resnet_small"):
            # classes = 2 always builds one logit: "one output per class" cannot be
            # followed for two classes, only by declaring the data binary
            raise ValueError(
                f"data set {data.name!r} is multiclass ({data.n_classes} classes at this "
                f"site) but model {spec.name!r} has {param}, which builds one logit "
                "(binary): for two classes declare the data set task = \"binary\" in each "
                "site's [[datasets]] table; for three or more, give the model classes >= 3"
            )
        if logits < 2:
            raise ValueError(
                f"data set {data.name!r} is multiclass ({data.n_classes} classes at this site) "
                f"but model {spec.name!r} has {param}, one logit (binary); give it one "
                "output per class (out_features >= 2), or for two classes declare the data "
                "set task = \"binary\" at the sites"
            )
        if data.n_classes > logits:
            raise ValueError(
                f"data set {data.name!r} has {data.n_classes} classes at this site (labels "
                f"0..{data.n_classes - 1}) but model {spec.name!r} has {logits} ({param})"
            )


def _loss_terms(task: str, reduction: str):  # type: ignore[no-untyped-def]
    """Per-example loss terms (vector) for the task; the batch loss is their mean/sum."""
    if task == "survival":

        def cox_terms(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            s = out.reshape(-1)
            return (cox_log_denominator(s, y[:, 1]) - s) * y[:, 0]

        return cox_terms
    if task == "binary":
        return lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(
            out.reshape(-1), y.reshape(-1).to(out.dtype), reduction="none"
        )
    if task == "multiclass":
        return lambda out, y: torch.nn.functional.cross_entropy(out, y.long(), reduction="none")
    return lambda out, y: ((out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1)) ** 2).mean(1)


def _batch_loss(task: str, reduction: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "survival":
        return cox_partial_likelihood(out, y[:, 1], y[:, 0], reduction=reduction)
    return _loss_terms(task, reduction)(out, y).mean()


def _nonfinite(value: float) -> str:
    return "NaN" if math.isnan(value) else "infinite"


def _step_where(step: int, steps: int, n: int, cfg: TrainConfig) -> str:
    """Where in the round step ``step`` (from 0) of ``steps`` falls, in the plan's
    terms: its epoch and step within it for an ``epochs`` plan, else its step."""
    if cfg.steps is None:
        per_epoch = max(1, math.ceil(n / cfg.batch_size))
        return (f"at epoch {step // per_epoch + 1} of {cfg.epochs}, step "
                f"{step % per_epoch + 1} of {per_epoch}")
    return f"at step {step + 1} of {steps}"


def _tensors(part: Split, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(part.x).to(device), torch.from_numpy(part.y).to(device)


def minibatches(
    n: int,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    start: DataCursor | None = None,
) -> tuple[list[torch.Tensor], DataCursor]:
    """``steps`` batches of row indices from a stream of shuffled epochs, and where the
    stream stands after them.

    Each epoch is a fresh permutation of the ``n`` rows cut into batches of
    ``batch_size``, the last one short when ``n`` is not a multiple (PyTorch's
    ``DataLoader(shuffle=True, drop_last=False)``). The walk starts at ``start``
    (a cursor left by an earlier call) or at a new epoch.
    """
    if start is not None and start.order.numel() == n and start.pos < n:
        order, pos = start.order, start.pos
    else:
        order, pos = torch.randperm(n, generator=generator), 0
    out: list[torch.Tensor] = []
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=generator), 0
        out.append(order[pos : pos + batch_size])
        pos += batch_size
    if pos >= n:  # the next call opens a fresh epoch, as a new iterator would
        order, pos = torch.randperm(n, generator=generator), 0
    return out, DataCursor(order, pos)


def _refuse_over_budget(
    state: ClientState, dp: DPConfig, *, round: int, steps: int, sampling_rate: float
) -> None:
    """The site refuses a round that would push its ε for this job past the target:
    its released runs plus this one (pending runs never left the site and are not
    counted; this one is, as if it were released)."""
    this_round = {"job": state.job, "round": round, "mechanism": DP_SGD,
                  "noise_multiplier": dp.noise_multiplier, "sampling_rate": sampling_rate,
                  "steps": steps}
    after = state.ledger.epsilon(dp.delta, job=state.job, including=this_round)
    assert dp.target_epsilon is not None
    if after > dp.target_epsilon:
        before = state.ledger.epsilon(dp.delta, job=state.job)
        raise PrivacyBudgetError(
            f"round {round} refused: epsilon would rise from {before:.3f} to {after:.3f}, "
            f"above target_epsilon {dp.target_epsilon:g} (delta={dp.delta:g})"
        )


def _refuse_plan_over_budget(
    state: ClientState, cfg: TrainConfig, *, rounds: int, min_site_examples: int | None,
    n: int, steps: int, sampling_rate: float,
) -> None:
    """Before this site spends anything on a job, it refuses a plan whose rounds its own
    data cannot fit: ``rounds`` runs of this round's mechanism (its own rows, so its
    own sampling rate and, with ``epochs``, its own steps a round) past the target.

    The coordinator checked the plan at the declared ``min_site_examples``; a site with
    fewer rows (a higher sampling rate), or whose epochs round up to more steps, can
    spend more. Refused by the per-round check alone, such a site would release rounds
    until the budget ran out and the job failed, its ε spent for nothing. All the
    plan's rounds are counted, not those left from ``round``: the plan's premise is
    that every site fits every round, and round numbers need not start at 1. Once a
    run of the job is released here the site has committed to it, and the per-round
    check governs. One composition (``epsilon_for``), whatever ``rounds`` is.

    Raises:
        PrivacyBudgetError: with the site's rows, the plan's min_site_examples, steps,
            sampling rate and the ε the plan would spend here.
    """
    dp = cfg.dp
    assert dp is not None and dp.target_epsilon is not None
    if state.ledger.released(job=state.job):
        return
    spent = epsilon_for(noise_multiplier=dp.noise_multiplier, sampling_rate=sampling_rate,
                        steps=rounds * steps, delta=dp.delta)
    if spent <= dp.target_epsilon:
        return
    why = f"this site has {n} training rows"
    if min_site_examples is not None and n < min_site_examples:
        why += f", below the plan's min_site_examples {min_site_examples}"
    elif min_site_examples is not None and cfg.steps is None:
        why += (f", not below the plan's min_site_examples {min_site_examples}, but its "
                f"epochs in batches of {cfg.batch_size} round up to {steps} steps a round")
    raise PrivacyBudgetError(
        f"job {state.job!r} refused before training: {why}: its {rounds} rounds of "
        f"{steps} steps at sampling rate {sampling_rate:.4g} would spend epsilon "
        f"{spent:.3f} > target_epsilon {dp.target_epsilon:g} (delta={dp.delta:g}); "
        "nothing was trained or spent"
    )


def local_train(
    spec: ModelSpec,
    global_flat: np.ndarray,
    data: SiteData,
    cfg: TrainConfig,
    *,
    round: int,
    state: ClientState | None = None,
    server_control: np.ndarray | None = None,
    rounds: int | None = None,
    min_site_examples: int | None = None,
    cancel: threading.Event | None = None,
    max_colluders: int = 0,
) -> TrainOutcome:
    """Train the global model on this site's training split for one round.

    ``state`` carries SCAFFOLD's client control variate and the privacy ledger
    between rounds (the agent persists it); ``server_control`` is SCAFFOLD's c
    from the coordinator. Deterministic for fixed (cfg.seed, round, site name)
    on one device, except under DP: the Poisson sampling and the noise of DP-SGD
    and DP-FedAvg come from keys fresh from the OS (fedge.train.privacy), since
    noise derived from the coordinator's seed could be subtracted by it. Under
    DP-SGD the noise-free ``train_loss`` and ``clipped_fraction`` of the batches
    are not released: they are in ``TrainOutcome.local_metrics``, for the site.
    Every run enters the ledger pending (``TrainOutcome.ledger_key``), with its
    mechanism: ``dp_sgd`` (``cfg.dp``; with ``cfg.client_dp`` as well, the DP-FedAvg
    step is post-processing of the DP-SGD weights, so the DP-SGD bound stands),
    ``dp_fedavg`` (``cfg.client_dp`` alone) or ``none`` (neither: the exact update,
    whose release makes the job's ε unbounded). It counts in ε once the caller
    releases it, before the update leaves the site.

    ``rounds`` and ``min_site_examples``: the plan's ``job.rounds`` and
    ``privacy.min_site_examples``. With a DP-SGD ``target_epsilon`` and ``rounds``, a
    site that has released nothing of this job yet refuses a plan whose rounds, at its
    own rows, would spend more than the target, before training
    (``_refuse_plan_over_budget``); every round is also refused if it alone would take
    the job's ε past the target.

    ``max_colluders``: the sites of a DP-FedAvg cohort this site assumes could collude
    with the coordinator (its agent.toml ``[privacy] max_colluders``): its noise share
    is sized for the cohort less them (``fedge.train.privacy.dp_fedavg_share_std``).

    ``cancel``: checked before every step (one mini-batch): once set, the run stops
    with ``TrainingCancelled`` within one step, records nothing in the ledger, and
    leaves ``state`` (the data cursors, SCAFFOLD's c_i) as it found it.

    Raises:
        ValueError: weights of the wrong length or non-finite, model/task mismatch,
            SCAFFOLD without ``server_control`` of the right length, ``rounds`` < 1, a
            DP-SGD plan whose delta is not below 1/n for this site's n training
            records (such a bound permits publishing a record outright), a DP-FedAvg
            cohort_size not above ``max_colluders`` (checked before training), or a DP plan
            whose ``target_epsilon`` this round, or with ``rounds`` the whole plan at
            this site, would exceed (``PrivacyBudgetError``); the loss or the weights
            became NaN or infinite (``TrainingDiverged``, naming where and the plan's
            learning rate).
        RuntimeError: ``device='cuda'`` without a GPU.
        TrainingCancelled: ``cancel`` was set.
    """
    cfg.validate()
    if cfg.client_dp is not None:
        honest_sites(cfg.client_dp, max_colluders)  # before any work
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int)
                               or rounds < 1):
        raise ValueError(f"rounds={rounds!r} must be an integer >= 1 (the plan's job.rounds)")
    task = _task(spec, data)
    device = _device(cfg.device)
    if device.type == "cuda":  # cuDNN's default convolution kernels are not reproducible
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    state = state if state is not None else ClientState()
    cursors = dict(state.cursors)  # put back if the run is cancelled

    def cancelled(done: int) -> None:
        if cancel is not None and cancel.is_set():
            state.cursors = cursors
            raise TrainingCancelled(f"training cancelled after {done} of {steps} steps")
    steps = 0
    cancelled(0)
    train = data.split("train")
    n = len(train)
    seed = _seed(cfg.seed, round, data.name, data.info.get("site"))
    gen = torch.Generator().manual_seed(seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        model = build_model(spec).to(device)
        flat = FlatParams(model, device)
        flat.load(global_flat)
        w_global = flat.data.clone()
        model.train()

        c = ci = None
        if cfg.scaffold:
            if server_control is None or np.asarray(server_control).size != flat.size:
                raise ValueError(
                    f"train.scaffold needs server_control of length {flat.size}, got "
                    f"{None if server_control is None else np.asarray(server_control).size}"
                )
            c = torch.from_numpy(np.asarray(server_control, np.float32)).to(device)
            if state.scaffold_ci is None:
                state.scaffold_ci = np.zeros(flat.size, dtype=np.float32)
            ci = torch.from_numpy(state.scaffold_ci.astype(np.float32)).to(device)

        stepper: SGDStepper | AdamStepper
        if cfg.optimizer == "sgd":
            stepper = SGDStepper(
                flat.size,
                device,
                momentum=cfg.momentum,
                weight_decay=cfg.weight_decay,
                prox_mu=cfg.prox_mu,
            )
        else:
            stepper = AdamStepper(
                flat.size,
                device,
                weight_decay=cfg.weight_decay,
                decoupled=cfg.optimizer == "adamw",
                prox_mu=cfg.prox_mu,
            )
        lr = cfg.lr * cfg.lr_decay**round
        steps = cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(n / cfg.batch_size)
        if cfg.dp is not None:
            if task == "survival" and not cfg.dp.cox_per_term:
                raise ValueError(COX_DP_RULE)
            if cfg.dp.delta >= 1 / n:
                raise ValueError(
                    f"train.dp.delta={cfg.dp.delta:g} is not below 1/n = {1 / n:.4g} for "
                    f"this site's n={n} training records: an (epsilon, delta) bound with "
                    "delta >= 1/n allows publishing a record outright; the plan must set "
                    "delta well below 1/n")
            q = min(1.0, cfg.batch_size / n)
            if cfg.dp.target_epsilon is not None:
                if rounds is not None:
                    _refuse_plan_over_budget(state, cfg, rounds=rounds,
                                             min_site_examples=min_site_examples, n=n,
                                             steps=steps, sampling_rate=q)
                # the safety net: a site already committed, or called without ``rounds``
                _refuse_over_budget(state, cfg.dp, round=round, steps=steps, sampling_rate=q)
        x_all, y_all = _tensors(train, device)
        terms = _loss_terms(task, cfg.loss_reduction)
        # Without DP the exact loss leaves anyway (train_loss): a run is stopped at the
        # step its loss turns NaN, and the refusal says which. Under DP the losses are
        # the raw batches' (outside the mechanism): only the weights are checked, at
        # the end, and the step is not told.
        exact = cfg.dp is None and cfg.client_dp is None
        losses: list[float] = []
        clipped: list[float] = []
        batches: list[torch.Tensor] = []
        if cfg.dp is None:
            # a site that sat out a round resumes where it stopped; a retried round
            # finds the cursor it started from again
            earlier = [r for r in state.cursors if r <= round] if cfg.steps is not None else []
            start = state.cursors[max(earlier)] if earlier else None
            batches, end = minibatches(n, cfg.batch_size, steps, gen, start)
            if cfg.steps is not None:
                kept = {r: cur for r, cur in state.cursors.items() if r == round}
                state.cursors = kept | {round + 1: end}
        for step in range(steps):
            cancelled(step)
            if cfg.dp is not None:
                mask = torch.from_numpy(secret_uniform(n) < q)
                idx = torch.nonzero(mask).reshape(-1)
            else:
                idx = batches[step]
            idx = idx.to(device)
            flat.zero_grad()
            if cfg.dp is not None:
                if idx.numel() == 0:
                    # an empty Poisson batch still releases noise (the mechanism ran)
                    std = cfg.dp.noise_multiplier * cfg.dp.max_grad_norm / (q * n)
                    flat.grad.copy_(torch.from_numpy(secret_gaussian(flat.size, std)))
                else:
                    xb, yb = x_all[idx], y_all[idx]
                    noisy, frac = private_gradient(
                        model, terms, xb, yb, coupled=task == "survival",
                        max_grad_norm=cfg.dp.max_grad_norm,
                        noise_multiplier=cfg.dp.noise_multiplier,
                        expected_batch=q * n,
                    )
                    flat.grad.copy_(noisy)
                    clipped.append(frac)
                    with torch.no_grad():
                        losses.append(float(terms(model(xb), yb).mean()))
            else:
                xb, yb = x_all[idx], y_all[idx]
                loss = _batch_loss(task, cfg.loss_reduction, model(xb), yb)
                losses.append(float(loss.detach()))
                if exact and not math.isfinite(losses[-1]):  # every later step is NaN
                    raise _diverged(f"the loss became {_nonfinite(losses[-1])}",
                                    _step_where(step, steps, n, cfg), cfg)
                loss.backward()
            stepper.step(
                flat.data,
                flat.grad,
                lr=lr,
                global_params=w_global if cfg.prox_mu else None,
                scaffold_c=c,
                scaffold_ci=ci,
            )
        cancelled(steps)
        if not torch.all(torch.isfinite(flat.data)):
            raise _diverged("the model's weights became NaN or infinite",
                            "at the last step" if exact else
                            "(under DP the step is not told)", cfg)

    weights = flat.numpy()
    extra: dict[str, np.ndarray] = {}
    if cfg.scaffold:
        assert c is not None and ci is not None
        # SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K * lr)
        ci_new = (ci - c + (w_global - flat.data) / (steps * lr)).cpu().numpy()
        extra["scaffold_delta_c"] = (ci_new - state.scaffold_ci).astype(np.float32)
        state.scaffold_ci = ci_new.astype(np.float32)
    local: dict[str, float] = {}
    metrics: dict[str, float] = {
        "train_loss": float(np.mean(losses)) if losses else 0.0,
        "steps": float(steps),
        "lr": float(lr),
    }
    if cfg.client_dp is not None:
        update = weights - w_global.cpu().numpy()
        private, norm = dp_fedavg_privatise(update, cfg.client_dp,  # a fresh OS key
                                            colluders=max_colluders)
        weights = (w_global.cpu().numpy() + private).astype(np.float32)
        # the raw update's norm and the raw batches' loss are outside the mechanism:
        # only the noised weights leave the site
        local["update_norm"] = norm
        local["train_loss"] = metrics.pop("train_loss")
    epsilon = delta = None
    # every run is recorded pending, with its mechanism: charged only once the caller
    # releases the update (the ledger's docstring); a run that never leaves the site
    # spends nothing, and one without DP that does leaves its job's ε unbounded
    if cfg.dp is None and cfg.client_dp is not None:
        ledger_key = state.ledger.record(
            job=state.job, round=round, mechanism=DP_FEDAVG,
            noise_multiplier=cfg.client_dp.noise_multiplier,
            clip_norm=cfg.client_dp.clip_norm, cohort_size=cfg.client_dp.cohort_size,
            pending=True)
    elif cfg.dp is None:
        ledger_key = state.ledger.record(job=state.job, round=round, mechanism=NO_DP,
                                         steps=steps, pending=True)
    else:
        per_term = task == "survival"
        # with client_dp as well, its clipping and noise are post-processing of these
        # DP-SGD weights: the DP-SGD bound stands, and is what is recorded
        ledger_key = state.ledger.record(
            job=state.job,
            round=round,
            mechanism=DP_SGD,
            noise_multiplier=cfg.dp.noise_multiplier,
            sampling_rate=q,
            steps=steps,
            per_loss_term=per_term,
            pending=True,
        )
        delta = cfg.dp.delta
        # the job's ε and the round's as they stand once this update is released
        this_run = state.ledger.entry(ledger_key)
        epsilon = state.ledger.epsilon(delta, job=state.job, including=this_run)
        # a Cox model's ε bounds one loss term, not one record: its name says so
        label = "_per_loss_term" if per_term else ""
        metrics[f"epsilon_round{label}"] = state.ledger.epsilon(delta, job=state.job,
                                                                round=round, including=this_run)
        metrics[f"epsilon{label}"] = epsilon
        # computed on the raw batches, outside the mechanism: kept at the site (with
        # client_dp too, already moved there)
        if "train_loss" in metrics:
            local["train_loss"] = metrics.pop("train_loss")
        local["clipped_fraction"] = float(np.mean(clipped)) if clipped else 0.0
    return TrainOutcome(weights, n, metrics, epsilon, delta, extra, local, ledger_key)


PREDICT_BATCH = 256  # rows per forward pass: a site's image set never sits in one


def predict(spec: ModelSpec, flat: np.ndarray, x: np.ndarray, *,
            batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Model outputs (log-risk, logits or values) for inputs ``x``, float64, computed
    ``batch_size`` rows at a time so memory does not grow with the split (the models
    hold no batch statistics: GroupNorm, not BatchNorm, so batching changes nothing).

    Raises:
        ValueError: weights of the wrong length or non-finite.
    """
    model = build_model(spec)
    load_flat(model, flat)
    model.eval()
    x32 = np.asarray(x, dtype=np.float32)
    parts = []
    with torch.no_grad():
        for start in range(0, max(len(x32), 1), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x32[start:start + batch_size]))
            parts.append(model(chunk).numpy().astype(np.float64))
    return np.concatenate(parts)


def evaluate(spec: ModelSpec, flat: np.ndarray, data: SiteData, split: str) -> EvalOutcome:
    """Metrics of ``flat`` on one split of this site.

    survival: c_index (Harrell), loss (Cox, Breslow, per event; absent when no event's
    risk set holds anyone else, so the partial likelihood says nothing of the model,
    like c_index when no pair is comparable); binary: accuracy, balanced_accuracy,
    roc_auc (when both classes occur), brier, loss; multiclass: accuracy,
    balanced_accuracy, loss; regression: mse.

    Raises:
        ValueError: unknown or absent split, wrong weights, model/task mismatch.
    """
    task = _task(spec, data)
    part = data.split(split)
    out = predict(spec, flat, part.x)
    y = part.y
    metrics: dict[str, float] = {}
    if task == "survival":
        risk = out.reshape(-1)
        # no comparable pair (no event in a tiny split): the key is left out, never NaN
        with contextlib.suppress(ValueError):
            metrics["c_index"] = M.concordance_index(y[:, 1], risk, y[:, 0])
        # Breslow's loss over the whole split, in O(n) memory (a large site's split
        # would need n x n matrices). Left out unless some event's risk set holds
        # someone besides the subject: with no event, or with every event alone in its
        # risk set (one death at the last time, a 1-row split), every term is 0 for any
        # weights, and a 0.0 would pull the sites' weighted mean towards 0 with this
        # split's whole weight.
        s = torch.from_numpy(risk)
        event = torch.from_numpy(y[:, 0].astype(np.float64))
        log_denominator, risk_set_size = cox_risk_sets(
            s, torch.from_numpy(y[:, 1].astype(np.float64))
        )
        if bool(torch.any((event > 0) & (risk_set_size > 1))):
            terms = (log_denominator - s) * event
            metrics["loss"] = float(terms.sum() / event.sum())
    elif task == "binary":
        logit = out.reshape(-1)
        prob = 1.0 / (1.0 + np.exp(-logit))
        pred = (prob >= 0.5).astype(np.float64)
        metrics["accuracy"] = M.accuracy(y, pred)
        metrics["balanced_accuracy"] = M.balanced_accuracy(y, pred)
        metrics["brier"] = M.brier_score(y, prob)
        if 0 < y.sum() < len(y):
            metrics["roc_auc"] = M.roc_auc(y, prob)
        eps = 1e-12
        metrics["loss"] = float(-np.mean(y * np.log(prob + eps) + (1 - y) * np.log(1 - prob + eps)))
    elif task == "multiclass":
        pred = out.argmax(axis=1)
        metrics["accuracy"] = M.accuracy(y, pred)
        metrics["balanced_accuracy"] = M.balanced_accuracy(y, pred)
        z = out - out.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        metrics["loss"] = float(-np.mean(logp[np.arange(len(y)), y.astype(int)]))
    else:
        metrics["mse"] = float(np.mean((out.reshape(len(y), -1) - y.reshape(len(y), -1)) ** 2))
    return EvalOutcome(len(part), metrics)
