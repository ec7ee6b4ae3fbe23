"""The model registry: names a plan may use, and the code behind them.

Model code never travels over the federation wire: a plan names a model and
its parameters (``ModelSpec``), every party builds the same module from this
registry, and only flat float32 weights move. Construction is deterministic
(``params["seed"]``, default 0), so a coordinator and an agent that build the
same spec get bit-identical initial weights. The parameters each model takes, their
rules and defaults are declared in ``fedge.train.model_names.MODEL_PARAMS``; any
other parameter is refused, so a misspelt one cannot leave its default in place.

| name          | task                     | output             | required params                |
|---------------|--------------------------|--------------------|--------------------------------|
| linear        | regression               | (n, out_features)  | in_features                    |
| logistic      | binary / multiclass      | logits (n, k)      | in_features                    |
| mlp           | any tabular              | (n, out_features)  | in_features                    |
| cox_linear    | survival (Cox PH)        | log-risk (n, 1)    | in_features                    |
| cox_mlp       | survival (Cox PH)        | log-risk (n, 1)    | in_features                    |
| resnet_small  | images 1x64x64 (or CxHxW)| logits (n, k)      | (none: in_channels=1, classes) |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedge.train.model_names import TASK_OF_MODEL, check_model_params, model_param

__all__ = [
    "MODELS",
    "TASK_OF_MODEL",
    "ModelSpec",
    "build_model",
    "cox_log_denominator",
    "cox_partial_likelihood",
    "cox_risk_sets",
    "input_shape",
]


@dataclass(frozen=True)
class ModelSpec:
    """A model named in the plan: registry name plus constructor parameters."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """Build from a plan's ``[model]`` table.

        Raises:
            ValueError: ``name`` missing or not registered, ``params`` not a table,
                or a parameter the model does not take or whose value breaks its rule.
        """
        if "name" not in d:
            raise ValueError("model: missing required key 'name'")
        params = d.get("params", {})
        if not isinstance(params, Mapping):
            raise ValueError(f"model.params must be a table, got {type(params).__name__}")
        spec = cls(str(d["name"]), dict(params))
        _check_spec(spec)
        return spec


def _param(spec: ModelSpec, key: str) -> Any:
    # every value a builder reads goes through the declared table (KeyError: a builder
    # reading a parameter model_names does not declare for this model)
    return model_param(spec.name, spec.params, key)


def _mlp(d_in: int, hidden: list[int], d_out: int, dropout: float) -> nn.Module:
    layers: list[nn.Module] = []
    prev = d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = h
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        # GroupNorm, not BatchNorm: no running statistics that FedAvg would mix; up to 8
        # groups that divide the channels (any width works)
        # across sites and that DP-SGD per-example gradients cannot handle.
        self.norm1 = nn.GroupNorm(math.gcd(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(math.gcd(8, c_out), c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return torch.relu(h + self.skip(x))


class ResNetSmall(nn.Module):
    """A small residual CNN for single-channel scans (64x64 by default): 3 stages."""

    def __init__(self, in_channels: int, classes: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.GroupNorm(math.gcd(8, width), width),
            nn.ReLU(),
        )
        self.stages = nn.Sequential(
            _ResidualBlock(width, width, 2),
            _ResidualBlock(width, 2 * width, 2),
            _ResidualBlock(2 * width, 4 * width, 2),
        )
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(torch.mean(h, dim=(2, 3)))


def _build_linear(spec: ModelSpec) -> nn.Module:
    return nn.Linear(_param(spec, "in_features"), _param(spec, "out_features"))


def _build_logistic(spec: ModelSpec) -> nn.Module:
    # classes=2 → one logit (sigmoid); classes=k>2 → k logits (softmax).
    classes = _param(spec, "classes")
    return nn.Linear(_param(spec, "in_features"), 1 if classes == 2 else classes)


def _build_mlp(spec: ModelSpec) -> nn.Module:
    return _mlp(
        _param(spec, "in_features"),
        list(_param(spec, "hidden")),
        _param(spec, "out_features"),
        float(_param(spec, "dropout")),
    )


def _build_cox_linear(spec: ModelSpec) -> nn.Module:
    return nn.Linear(_param(spec, "in_features"), 1)


def _build_cox_mlp(spec: ModelSpec) -> nn.Module:
    return _mlp(_param(spec, "in_features"), list(_param(spec, "hidden")), 1,
                float(_param(spec, "dropout")))


def _build_resnet_small(spec: ModelSpec) -> nn.Module:
    classes = _param(spec, "classes")
    return ResNetSmall(_param(spec, "in_channels"), 1 if classes == 2 else classes,
                       _param(spec, "width"))


# One constructor per name in fedge.train.model_names (MODEL_NAMES, TASK_OF_MODEL,
# MODEL_PARAMS), which holds the names and parameters without torch so that the
# coordinator can refuse an unknown model or parameter at submit time;
# tests/train/test_model_names.py holds the two together.
MODELS: dict[str, Callable[[ModelSpec], nn.Module]] = {
    "linear": _build_linear,
    "logistic": _build_logistic,
    "mlp": _build_mlp,
    "cox_linear": _build_cox_linear,
    "cox_mlp": _build_cox_mlp,
    "resnet_small": _build_resnet_small,
}


def input_shape(spec: ModelSpec) -> tuple[int, ...]:
    """The shape of one example the model takes: ``(in_features,)`` for the tabular
    models, ``(in_channels, image_size, image_size)`` for resnet_small (its optional
    ``image_size`` parameter, default 64, is what the sites' images are scaled to;
    the network itself pools over any size).

    Raises:
        ValueError: unknown name, or an unknown, missing or out-of-range parameter (named).
    """
    _check_spec(spec)
    if spec.name == "resnet_small":
        size = _param(spec, "image_size")
        return _param(spec, "in_channels"), size, size
    return (_param(spec, "in_features"),)


def _check_spec(spec: ModelSpec) -> None:
    """Raises: ValueError: an unregistered name; ModelParamError (a ValueError): a
    parameter the model does not read, or a value that breaks its rule."""
    if spec.name not in MODELS:
        raise ValueError(f"model name {spec.name!r} is not registered; known: {sorted(MODELS)}")
    check_model_params(spec.name, spec.params)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the registered model, deterministically from ``params["seed"]`` (default 0).

    Raises:
        ValueError: unknown name, or an unknown, missing or out-of-range parameter (named).
    """
    _check_spec(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_param(spec, "seed"))
        model = MODELS[spec.name](spec)
    return model.float()


def cox_log_denominator(s: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """``log sum_{j: T_j >= T_i} exp(s_j)`` for every i, stable for any spread of scores.

    A log-sum-exp per row over its risk set (which always holds i itself), so a
    subject whose score lies far below the batch maximum gets a finite term instead
    of log(0) (one shared shift underflows once scores spread by more than ~87 in
    float32, as raw features under large learning rates reach).
    """
    at_risk = time.reshape(1, -1) >= time.reshape(-1, 1)  # [i, j]: j at risk at T_i
    masked = s.reshape(1, -1).expand(s.numel(), -1).masked_fill(~at_risk, -torch.inf)
    return torch.logsumexp(masked, dim=1)


def cox_risk_sets(s: torch.Tensor, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every subject's risk set, in O(n) memory: ``log sum_{j: T_j >= T_i} exp(s_j)``
    (the same Breslow denominator as ``cox_log_denominator``) and ``|{j: T_j >= T_i}|``.

    For evaluation over a whole split, where ``cox_log_denominator``'s n x n matrices
    would need gigabytes (16,000 rows: 4 GiB): the scores are summed, as a running
    log-sum-exp, in order of decreasing time, and subject i reads the running sum at
    the last subject whose time is >= T_i, so every subject tied with i is in i's
    risk set, as in Breslow. O(n log n) time. Training keeps ``cox_log_denominator``
    (batch-sized, and it works under torch.func), so its results do not move.
    """
    s = s.reshape(-1)
    time = time.reshape(-1)
    descending = torch.argsort(time, descending=True, stable=True)
    running = torch.logcumsumexp(s[descending], dim=0)
    ascending_times = torch.flip(time[descending], dims=(0,))
    size = time.numel() - torch.searchsorted(ascending_times, time, right=False)
    return running[size - 1], size


def cox_partial_likelihood(
    log_risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Breslow's handling of tied times.

    For each subject i with an event: ``-(s_i - log sum_{j: T_j >= T_i} exp(s_j))``.
    ``reduction="mean"`` divides by the batch size (FLamby's scaling, so learning
    rates carry over); ``"events"`` divides by the number of events; ``"sum"``.
    Works under torch.func (no data-dependent Python control flow).

    Raises:
        ValueError: unknown reduction.
    """
    s = log_risk.reshape(-1)
    terms = cox_log_denominator(s, time) - s
    terms = terms * event.reshape(-1)
    if reduction == "mean":
        return terms.sum() / s.numel()
    if reduction == "events":
        return terms.sum() / torch.clamp(event.sum(), min=1.0)
    if reduction == "sum":
        return terms.sum()
    raise ValueError(f"reduction {reduction!r} must be one of 'mean', 'events', 'sum'")
