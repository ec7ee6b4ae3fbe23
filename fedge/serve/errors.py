"""Errors of fedge.serve that light modules (the CLI) catch without importing torch."""

from __future__ import annotations


class ExportRefused(ValueError):
    """The exported graph does not reproduce the PyTorch model closely enough."""

    def __init__(self, message: str, *, max_abs_diff: float, tolerance: float, batch: int):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.batch = batch
