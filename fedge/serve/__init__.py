"""fedge.serve: ONNX export, the versioned model repository, the v2 inference server.

Public API (imported lazily so that `import fedge.serve` stays cheap):

- `export_onnx(model, example_input, metadata, path, ...) -> ExportResult`
  (`ExportRefused` when parity with PyTorch fails; `Standardisation` to fold
  preprocessing into the graph) — fedge.serve.export
- `ModelRepository(root).install(name, onnx_path_or_bytes) -> version`,
  `.versions(name)`, `.retire(name, version)` — fedge.serve.repository
- `InferenceServer(root)` (the ASGI app), `serve(root, host=, port=)` — fedge.serve.server
- `export_job(state_dir, job_id, out)` — fedge.serve.jobs

Importing this package turns onnxruntime's telemetry off for the process, before
any fedge module imports onnxruntime (they all live here). Its Linux wheels (1.32
here; POSIX telemetry came with microsoft/onnxruntime#27379) write a device id and
an event queue (OS, CPU, interpreter path) under
``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` and upload them; an appliance in
a hospital network talks to its coordinator and nothing else. The opt-out that
stops all of it is ``ORT_DISABLE_TELEMETRY=1`` in the environment when onnxruntime
initialises, which is at import: ``onnxruntime.disable_telemetry_events()`` comes
too late for the device id and the first event, so it is only the fallback for an
onnxruntime imported before this package. An explicit ``ORT_DISABLE_TELEMETRY`` in
the environment is left as it is; the units set it as well.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
_disable = getattr(sys.modules.get("onnxruntime"), "disable_telemetry_events", None)
if _disable is not None:
    _disable()

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
