"""Export a trained PyTorch model to ONNX, with its provenance and a parity check.

Exporter choice: torch 2.13's `torch.onnx.export` defaults to the dynamo path
(torch.export + onnxscript). For the small fedge models (Cox, MLP, a small CNN)
the TorchScript tracer (`dynamo=False`) writes opset 17 directly, takes ~0.2 s
instead of ~4 s, and needs no version conversion (the dynamo path emits opset 18
and falls back to the onnx C API converter to reach 17). Both are checked the
same way afterwards: `onnx.checker` and numerical parity against eager PyTorch
on a held-out batch whose size differs from the example's, so that the dynamic
batch axis is exercised too. A tracer that silently froze a data-dependent
branch is caught by that parity check and the export is refused.

The written file carries its provenance in `metadata_props` (all strings):
`job_id`, `round`, `model_digest`, `feature_names` (JSON list, in input order),
`preprocessing` (JSON), `metrics` (JSON), whatever else the caller passes, plus
`fedge_version`, `exporter`, `parity_max_abs_diff`, `parity_tolerance`,
`parity_rtol` and `parity_batch`, which export_onnx adds itself.

`preprocessing` has no default: every caller says what the model's input must go
through, a `Standardisation` folded into the graph, or a description (a dict with a
`kind`: `{"kind": "none"}` for inputs taken as they are, fedge.serve.jobs's
`per-site standardisation` for a federated tabular model), as the `preprocessing=`
argument or the `preprocessing` metadata entry. A default of "none" once labelled a
model trained on standardised rows as taking raw ones (the demo's model.onnx): an
appliance installing it served it on raw rows, its risk scores 30-60 times too large.

Parity tolerance: for each output, max |onnxruntime - pytorch| <= atol + rtol *
max |pytorch| over the held-out batch (atol `parity_tolerance`, default 1e-5;
rtol `parity_rtol`, default 1e-5). Both compute in float32 but not in the same
order (onnxruntime fuses and blocks its sums differently), so they differ by a
few float32 roundings of the largest terms summed: about 3e-7 of the output's
magnitude here, 4.9e-4 absolute for a Cox model whose risk scores reach 1600,
which a fixed 1e-5 refused. The scale is the output's largest magnitude, not
each element's: an element that is a small difference of large terms carries
the rounding of those terms (elementwise, a correct export came within 20% of
being refused). A wrong graph (another branch, other weights) is off by a
fraction of the output itself, thousands of times more.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fedge import __version__
from fedge.serve.errors import ExportRefused

DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-5  # absolute part of the parity tolerance
# relative part, of the output's largest magnitude: about 80 float32 roundings
# (2**-23 = 1.2e-7), where a correct export differs by 2 or 3
DEFAULT_RTOL = 1e-5

# metadata_props keys export_onnx writes itself; a caller may not set them.
__all__ = ["ExportRefused", "ExportResult", "Standardisation", "export_onnx", "read_metadata"]

RESERVED_KEYS = frozenset(
    {"fedge_version", "exporter", "parity_max_abs_diff", "parity_tolerance", "parity_rtol",
     "parity_batch"}
)


@dataclass(frozen=True)
class Standardisation:
    """Per-feature `(x - mean) / std`, folded into the exported graph."""

    mean: Sequence[float]
    std: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"standardisation mean has {len(self.mean)} values but std has "
                f"{len(self.std)}; they must have one value per feature"
            )
        for i, s in enumerate(self.std):
            if not (math.isfinite(float(s)) and float(s) > 0):
                raise ValueError(f"standardisation std[{i}] = {s!r}; must be finite and > 0")
        for i, m in enumerate(self.mean):
            if not math.isfinite(float(m)):
                raise ValueError(f"standardisation mean[{i}] = {m!r}; must be finite")

    def describe(self, where: str = "folded into the graph") -> dict[str, object]:
        return {
            "kind": "standardise",
            "where": where,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
        }


class _Standardised(torch.nn.Module):
    """`model((x - mean) / std)`: the preprocessing travels inside the graph."""

    def __init__(self, model: torch.nn.Module, prep: Standardisation, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(prep.mean), dtype=dtype))
        self.register_buffer("std", torch.tensor(list(prep.std), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


FOLDED_WHERE = "folded into the first Linear layer's weights and bias"


def _fold_into_first_linear(
    model: torch.nn.Module, prep: Standardisation
) -> torch.nn.Module | None:
    """A copy of `model` whose first Linear layer takes raw features, or None.

    `W ((x - mean) / std) + b = (W / std) x + (b - (W / std) mean)`: the graph
    keeps one Gemm instead of Sub, Div and Gemm, which at batch 1 is a third of
    onnxruntime's work. Computed in float64; export_onnx checks the result
    against the unfolded model like any export and falls back to the unfolded
    graph if float32 rounding breaks parity (features with huge means).
    Only `nn.Linear` itself or an `nn.Sequential` that starts with one qualifies:
    anything else may use its input before that layer.
    """
    if isinstance(model, torch.nn.Linear):
        folded = copy.deepcopy(model)
        first = folded
    elif (isinstance(model, torch.nn.Sequential) and len(model) > 0
          and isinstance(model[0], torch.nn.Linear)):
        folded = copy.deepcopy(model)
        first = folded[0]
    else:
        return None
    if first.in_features != len(prep.mean):
        return None
    with torch.no_grad():
        weight = first.weight.detach().double() / torch.tensor(prep.std, dtype=torch.float64)
        bias = (first.bias.detach().double() if first.bias is not None
                else torch.zeros(first.out_features, dtype=torch.float64))
        bias = bias - weight @ torch.tensor(prep.mean, dtype=torch.float64)
        first.weight.copy_(weight.to(first.weight.dtype))
        first.bias = torch.nn.Parameter(bias.to(first.weight.dtype))
    return folded


@dataclass(frozen=True)
class ExportResult:
    path: Path
    opset: int
    input_name: str
    output_names: tuple[str, ...]
    parity_max_abs_diff: float
    parity_batch: int
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)


def _as_outputs(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(
        f"model returned {type(value).__name__}; export needs a tensor or a tuple of tensors"
    )


def _validate_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"metadata key {key!r} must be a non-empty str")
        if not isinstance(value, str):
            raise TypeError(
                f"metadata[{key!r}] is {type(value).__name__}; metadata values must be str "
                "(encode lists and dicts as JSON)"
            )
        if key in RESERVED_KEYS:
            raise ValueError(f"metadata key {key!r} is written by export_onnx itself")
        out[key] = value
    return out


def _described_preprocessing(
    props: Mapping[str, str], preprocessing: Standardisation | Mapping[str, Any] | None
) -> str | None:
    """The `preprocessing` metadata (JSON) a caller stated as a description, checked;
    None when `preprocessing` is a `Standardisation` (export_onnx describes it once it
    knows where it went).

    Raises: ValueError: not stated, stated twice, not an object with a str `kind`, or
        a description claiming a standardisation the graph would not hold."""
    stated = "preprocessing" in props
    if isinstance(preprocessing, Standardisation):
        if stated:
            raise ValueError(
                "preprocessing is given twice, as a Standardisation to fold into the graph "
                "and as metadata['preprocessing']; the metadata would not describe the graph"
            )
        return None
    if preprocessing is None:
        if not stated:
            raise ValueError(
                "export_onnx needs the model's preprocessing stated: a Standardisation to "
                "fold into the graph, or a description such as {'kind': 'none'} (inputs "
                "taken as they are) or fedge.serve.jobs's per-site standardisation, as "
                "preprocessing= or metadata['preprocessing']; there is no default, since a "
                "wrong one makes a server feed the model what it was not trained on"
            )
        text = props["preprocessing"]
        try:
            prep = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(
                f"metadata['preprocessing'] {text[:80]!r} is not JSON") from None
        where = "metadata['preprocessing']"
    elif isinstance(preprocessing, Mapping):
        if stated:
            raise ValueError(
                "preprocessing is given twice, as preprocessing= and as "
                "metadata['preprocessing']; give one")
        prep, where = dict(preprocessing), "preprocessing"
        try:
            text = json.dumps(prep)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"preprocessing {prep!r} cannot be written as JSON: {exc}") from None
    else:
        raise TypeError(
            f"preprocessing is {type(preprocessing).__name__}; expected a Standardisation "
            "or a dict describing the input")
    if not isinstance(prep, dict) or not isinstance(prep.get("kind"), str) or not prep["kind"]:
        raise ValueError(
            f"{where} must be a JSON object with a non-empty str 'kind' (e.g. "
            f"{{'kind': 'none'}}); got {text[:80]!r}")
    if prep["kind"] == "standardise":
        raise ValueError(
            f"{where} says kind 'standardise', which only a Standardisation folded into "
            "the graph may claim: pass preprocessing=Standardisation(mean, std)")
    return text


def _held_out_batch(example: torch.Tensor) -> torch.Tensor:
    """A batch the tracer never saw: another size, fresh values on the example's scale."""
    gen = torch.Generator().manual_seed(20240611)
    batch = example.shape[0] + 3
    shape = (batch, *example.shape[1:])
    if example.dtype.is_floating_point:
        scale = float(example.abs().max()) if example.numel() else 1.0
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        return (torch.randn(shape, generator=gen) * scale).to(example.dtype)
    return torch.randint(0, 2, shape, generator=gen).to(example.dtype)


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    metadata: Mapping[str, str],
    path: str | os.PathLike[str],
    *,
    held_out: torch.Tensor | None = None,
    preprocessing: Standardisation | Mapping[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    rtol: float = DEFAULT_RTOL,
    opset: int = DEFAULT_OPSET,
    input_name: str = "input",
    output_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export `model` to ONNX at `path` (atomically) after checking it against PyTorch.

    `example_input` is traced (batch axis 0 is dynamic in the graph); `held_out`
    (default: a generated batch of another size) is run through both PyTorch and
    onnxruntime, and for each output the largest absolute difference must be
    <= `tolerance` + `rtol` * the output's largest magnitude (see the module's
    docstring).

    `preprocessing` must be stated (module docstring): a `Standardisation` to fold
    into the graph, or a description of what the input must go through (a dict
    with a str `kind`, written as JSON), given here or as `metadata["preprocessing"]`
    (JSON), not both.

    Raises:
        TypeError: `example_input`/`held_out` not tensors, metadata values not str,
            or the model returns something other than tensors.
        ValueError: opset < 17, tolerance or rtol not a finite non-negative number, an empty
            or batchless example, a reserved metadata key, a held-out batch whose
            trailing shape differs from the example's; preprocessing not stated, stated
            twice, not a JSON object with a str `kind`, or a description claiming a
            standardisation in the graph (only a `Standardisation` puts one there).
        ExportRefused: an ONNX graph's output differs from PyTorch's by more than
            that (or is not finite); nothing is written at `path`.
        onnx.checker.ValidationError: the exported graph is invalid.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input is {type(example_input).__name__}; expected a tensor")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(
            f"example_input shape {tuple(example_input.shape)} has no batch: axis 0 must be >= 1"
        )
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is below the minimum {DEFAULT_OPSET}")
    for what, value in (("tolerance", tolerance), ("rtol", rtol)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{what} {value!r} must be a finite number >= 0")
    props = _validate_metadata(metadata)
    if held_out is None:
        held_out = _held_out_batch(example_input)
    elif not isinstance(held_out, torch.Tensor):
        raise TypeError(f"held_out is {type(held_out).__name__}; expected a tensor")
    elif held_out.shape[1:] != example_input.shape[1:] or held_out.dim() < 1:
        raise ValueError(
            f"held_out shape {tuple(held_out.shape)} does not match example_input "
            f"{tuple(example_input.shape)} beyond the batch axis"
        )
    held_out = held_out.to(example_input.dtype)
    described = _described_preprocessing(props, preprocessing)
    if described is not None:
        props["preprocessing"] = described
        preprocessing = None

    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        reference: torch.nn.Module = model  # what the exported graph must compute
        # (graph to trace, where the preprocessing went), best first
        candidates: list[tuple[torch.nn.Module, str | None]] = [(model, None)]
        if preprocessing is not None:
            if len(preprocessing.mean) != example_input.shape[-1]:
                raise ValueError(
                    f"standardisation has {len(preprocessing.mean)} features but the input's "
                    f"last axis has {example_input.shape[-1]}"
                )
            reference = _Standardised(model, preprocessing, example_input.dtype)
            candidates = [(reference, "folded into the graph")]
            folded = _fold_into_first_linear(model, preprocessing)
            if folded is not None:
                candidates.insert(0, (folded, FOLDED_WHERE))

        with torch.no_grad():
            n_out = len(_as_outputs(reference(example_input)))
            names = list(output_names) if output_names is not None else (
                ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
            )
            if len(names) != n_out:
                raise ValueError(f"output_names has {len(names)} names; the model returns {n_out}")
            expected = [t.detach().cpu().numpy() for t in _as_outputs(reference(held_out))]

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            for i, (graph_model, where) in enumerate(candidates):
                try:
                    proto, diff = _trace_and_check(
                        graph_model, example_input, held_out, expected, tmp,
                        opset=opset, input_name=input_name, names=names, tolerance=tolerance,
                        rtol=rtol,
                    )
                except ExportRefused:
                    if i == len(candidates) - 1:
                        raise
                    continue  # the folded graph lost parity: export the unfolded one
                prep_where = where
                break
            if preprocessing is not None:
                assert prep_where is not None and "preprocessing" not in props
                props["preprocessing"] = json.dumps(preprocessing.describe(prep_where))

            props.update(
                fedge_version=__version__,
                exporter=f"torch {torch.__version__} torchscript tracer, opset {opset}",
                parity_max_abs_diff=repr(diff),
                parity_tolerance=repr(tolerance),
                parity_rtol=repr(rtol),
                parity_batch=str(held_out.shape[0]),
            )
            del proto.metadata_props[:]
            for key in sorted(props):
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, props[key]
            data = proto.SerializeToString()
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; servers may run as another user
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    finally:
        model.train(was_training)

    return ExportResult(
        path=path,
        opset=opset,
        input_name=input_name,
        output_names=tuple(names),
        parity_max_abs_diff=diff,
        parity_batch=int(held_out.shape[0]),
        sha256=hashlib.sha256(data).hexdigest(),
        metadata=props,
    )


def _trace_and_check(
    graph_model: torch.nn.Module,
    example_input: torch.Tensor,
    held_out: torch.Tensor,
    expected: list[np.ndarray],
    tmp: Path,
    *,
    opset: int,
    input_name: str,
    names: list[str],
    tolerance: float,
    rtol: float,
) -> tuple[onnx.ModelProto, float]:
    """Trace `graph_model` to `tmp`, check it, and compare it with `expected` on `held_out`.

    Returns the checked graph and the largest absolute difference.

    Raises:
        onnx.checker.ValidationError: the graph is invalid.
        ExportRefused: an output's shape differs, or its difference exceeds `tolerance`
            + `rtol` * its largest magnitude.
    """
    dynamic_axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph_model,
            (example_input,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=names,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(names, {input_name: held_out.cpu().numpy()})
    batch = held_out.shape[0]
    diff = 0.0
    for name, e, g in zip(names, expected, got, strict=True):
        if e.shape != g.shape:
            raise ExportRefused(
                f"ONNX output {name!r} has shape {g.shape} on the held-out batch but "
                f"PyTorch gives {e.shape}",
                max_abs_diff=math.inf, tolerance=tolerance, rtol=rtol, batch=batch,
            )
        if not e.size:
            continue
        want = e.astype(np.float64)
        d = float(np.max(np.abs(want - g.astype(np.float64))))
        scale = float(np.max(np.abs(want)))
        allowed = tolerance + rtol * scale
        if not (math.isfinite(d) and math.isfinite(scale) and d <= allowed):
            d = d if math.isfinite(d) else math.inf
            raise ExportRefused(
                f"export refused: max |onnxruntime - pytorch| = {d:.3g} in output {name!r} "
                f"on a held-out batch of {batch} exceeds the tolerance {tolerance:.3g} + "
                f"{rtol:.3g} x max |pytorch| ({scale:.3g}) = {allowed:.3g}",
                max_abs_diff=d, tolerance=tolerance, rtol=rtol, batch=batch,
            )
        diff = max(diff, d)
    return proto, diff


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `metadata_props` of an ONNX file as a dict (without loading weights twice).

    Raises:
        FileNotFoundError: no file at `path`.
        onnx.onnx_cpp2py_export.checker.ValidationError / google.protobuf DecodeError:
            the file is not an ONNX model.
    """
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
