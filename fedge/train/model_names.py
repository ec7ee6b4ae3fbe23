"""The model names a plan may use, the task each is trained for, and the parameters
each reads from ``model.params``, without torch.

The coordinator checks a plan's ``model.name`` and ``model.params`` at submit time
and never imports torch; ``fedge.train.models`` builds exactly these names (its
``MODELS`` has one constructor per name here, and a test holds the two together)
and reads each parameter through `model_param`, so a builder cannot read a
parameter that is not declared here, nor a plan pass one that no builder reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "MODEL_NAMES",
    "MODEL_PARAMS",
    "TASKS_OF_KIND",
    "TASK_OF_MODEL",
    "ModelParam",
    "ModelParamError",
    "check_model_params",
    "model_param",
]

# The task a model's output is trained for; "classification" resolves to binary
# or multiclass from `classes`; mlp follows the data set's task.
TASK_OF_MODEL: dict[str, str] = {
    "linear": "regression",
    "logistic": "classification",
    "mlp": "any",
    "cox_linear": "survival",
    "cox_mlp": "survival",
    "resnet_small": "classification",
}

MODEL_NAMES: tuple[str, ...] = tuple(TASK_OF_MODEL)

# The data-set tasks (fedge.train.data.TASKS) each kind of model above trains on, with
# the loss of the data set's task: a survival model only on survival data (its loss
# needs times and events); a classifier only on labels (on a regression target it
# would train as a regression under the classifier's name, and its exported model
# would say its output is a logit); a regression model also on labels (its outputs
# serve as the logits). The sites refuse the rest before training (fedge.train.api),
# the coordinator at submit (fedge.coordinator.service).
TASKS_OF_KIND: dict[str, tuple[str, ...]] = {
    "survival": ("survival",),
    "classification": ("binary", "multiclass"),
    "regression": ("regression", "binary", "multiclass"),
    "any": ("survival", "binary", "multiclass", "regression"),
}


@dataclass(frozen=True)
class ModelParam:
    """One parameter a model reads: the rule its value follows, and the value a plan
    that leaves it out gets (``default=None``: the plan must give it)."""

    kind: Literal["integer", "positive integers", "fraction"]
    default: Any = None
    minimum: int | None = None  # "integer" only; None: any integer

    @property
    def rule(self) -> str:
        if self.kind == "integer":
            return "must be an integer" + ("" if self.minimum is None else f" >= {self.minimum}")
        if self.kind == "positive integers":
            return "must be a list of positive integers"
        return "must lie in [0, 1)"

    def admits(self, value: Any) -> bool:
        if self.kind == "integer":
            return _is_int(value) and (self.minimum is None or value >= self.minimum)
        if self.kind == "positive integers":
            return isinstance(value, list | tuple) and all(_is_int(h) and h > 0 for h in value)
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and 0.0 <= float(value) < 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The starting weights' seed: every model takes one (the coordinator builds round 0
# with job.seed unless the plan pins model.params.seed; bench and the demo set it).
_SEED = ModelParam("integer", 0)
_IN_FEATURES = ModelParam("integer", minimum=1)
_HIDDEN = ModelParam("positive integers", (64,))
_DROPOUT = ModelParam("fraction", 0.0)
_OUT_FEATURES = ModelParam("integer", 1, minimum=1)
_CLASSES = ModelParam("integer", 2, minimum=2)  # 2: one logit (sigmoid); k > 2: k logits

MODEL_PARAMS: dict[str, dict[str, ModelParam]] = {
    "linear": {"in_features": _IN_FEATURES, "out_features": _OUT_FEATURES, "seed": _SEED},
    "logistic": {"in_features": _IN_FEATURES, "classes": _CLASSES, "seed": _SEED},
    "mlp": {"in_features": _IN_FEATURES, "hidden": _HIDDEN, "out_features": _OUT_FEATURES,
            "dropout": _DROPOUT, "seed": _SEED},
    "cox_linear": {"in_features": _IN_FEATURES, "seed": _SEED},
    "cox_mlp": {"in_features": _IN_FEATURES, "hidden": _HIDDEN, "dropout": _DROPOUT,
                "seed": _SEED},
    "resnet_small": {
        "in_channels": ModelParam("integer", 1, minimum=1),
        "classes": _CLASSES,
        "width": ModelParam("integer", 16, minimum=1),
        # what the sites' images are scaled to (the data sets' default, 64); the
        # network pools over any size, the exported model's input shape does not
        "image_size": ModelParam("integer", 64, minimum=1),
        "seed": _SEED,
    },
}


class ModelParamError(ValueError):
    """A model parameter that is unknown, missing or breaks its rule. ``rule`` says
    what was wrong without the model's name and the value (a plan error names them
    by their place: model.params.<key>)."""

    def __init__(self, model: str, key: str, value: Any, rule: str, message: str) -> None:
        self.model = model
        self.key = key
        self.value = value
        self.rule = rule
        super().__init__(message)


def check_model_params(name: str, params: Mapping[str, Any]) -> None:
    """Refuse a parameter ``name`` does not read (a typo would otherwise leave the
    default silently in its place) and a given value that breaks its rule. Missing
    required parameters are the builder's to name (`model_param`).

    Raises:
        KeyError: ``name`` is not a registered model.
        ModelParamError: naming the model, the parameter and the rule.
    """
    declared = MODEL_PARAMS[name]
    for key, value in params.items():
        if key not in declared:
            takes = ", ".join(sorted(declared))
            raise ModelParamError(
                name, key, value, f"unknown parameter of model {name!r}; it takes {takes}",
                f"model {name!r}: unknown parameter {key!r}; {name} takes {takes}")
        _check(name, key, value, declared[key])


def model_param(name: str, params: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` for model ``name``: the plan's, checked, or the default.

    Raises:
        KeyError: ``key`` is not a parameter of ``name`` (a builder reading an
            undeclared parameter: a bug here, not in the plan).
        ModelParamError: a required parameter is missing, or the value breaks its rule.
    """
    param = MODEL_PARAMS[name][key]
    if key not in params:
        if param.default is None:
            raise ModelParamError(name, key, None, "required parameter is missing",
                                  f"model {name!r}: missing required parameter {key!r}")
        return param.default
    return _check(name, key, params[key], param)


def _check(name: str, key: str, value: Any, param: ModelParam) -> Any:
    if not param.admits(value):
        raise ModelParamError(name, key, value, param.rule,
                              f"model {name!r}: parameter {key}={value!r} {param.rule}")
    return value
