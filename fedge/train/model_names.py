"""The model names a plan may use, and the task each is trained for, without torch.

The coordinator checks a plan's ``model.name`` at submit time and never imports
torch; ``fedge.train.models`` builds exactly these names (its ``MODELS`` has one
constructor per name here, and a test holds the two together).
"""

from __future__ import annotations

__all__ = ["MODEL_NAMES", "TASK_OF_MODEL"]

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
