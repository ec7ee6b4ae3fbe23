"""fedge.serve: ONNX export, the versioned model repository, the v2 inference server.

Public API (imported lazily so that `import fedge.serve` stays cheap):

- `export_onnx(model, example_input, metadata, path, ...) -> ExportResult`
  (`ExportRefused` when parity with PyTorch fails; `Standardisation` to fold
  preprocessing into the graph) — fedge.serve.export
- `ModelRepository(root).install(name, onnx_path_or_bytes) -> version`,
  `.versions(name)`, `.retire(name, version)` — fedge.serve.repository
- `InferenceServer(root)` (the ASGI app), `serve(root, host=, port=)` — fedge.serve.server
- `export_job(state_dir, job_id, out)` — fedge.serve.jobs
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "export_onnx": "fedge.serve.export",
    "ExportResult": "fedge.serve.export",
    "ExportRefused": "fedge.serve.export",
    "Standardisation": "fedge.serve.export",
    "read_metadata": "fedge.serve.export",
    "ModelRepository": "fedge.serve.repository",
    "InferenceServer": "fedge.serve.server",
    "serve": "fedge.serve.server",
    "export_job": "fedge.serve.jobs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
