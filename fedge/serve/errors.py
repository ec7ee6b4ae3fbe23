"""Errors of fedge.serve that light modules (the CLI) catch without importing torch."""

from __future__ import annotations


class ExportRefused(ValueError):
    """The exported graph does not reproduce the PyTorch model closely enough.

    `tolerance` and `rtol` are the absolute and relative parts of the tolerance
    (fedge.serve.export: atol + rtol * the output's largest magnitude).
    """

    def __init__(self, message: str, *, max_abs_diff: float, tolerance: float, batch: int,
                 rtol: float = 0.0):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.rtol = rtol
        self.batch = batch
