"""A federated model made servable at one site: its own standardisation in the graph.

A federated job's tabular features were standardised at each site with constants
fitted on that site's own training split; those constants never leave the site, so
the model the coordinator exports does not standardise (its ``preprocessing``
metadata says ``per-site standardisation``, ``in_graph: false``). Served as it comes,
it gives wrong outputs for the raw rows a hospital's application sends.

`standardise_onnx` prepends ``(x - mean) / scale`` to the graph's input at the ONNX
level (Sub and Div on the original input name; the rest of the graph untouched), checks
with onnxruntime that the new graph on raw rows equals the old one on standardised
rows, and rewrites ``preprocessing`` to say where the constants came from. The
appliance does this when it installs a model pushed to it (fedge.agent.updates).

`name_classes` does the same for what the coordinator cannot know either: the class
names of an image data set, written into the model's ``output`` metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["SiteStandardisationError", "name_classes", "needs_site_standardisation",
           "standardise_onnx", "trained_dataset"]

PARITY_TOLERANCE = 1e-4
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}


class SiteStandardisationError(ValueError):
    """The model cannot take this site's standardisation (the message says why)."""


def _metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def needs_site_standardisation(metadata: dict[str, str]) -> str | None:
    """The data set whose site constants the model expects, when its graph does not
    standardise by itself; None for a model that needs nothing (images, a graph with
    the constants folded in, a model of another origin)."""
    prep = _preprocessing(metadata)
    if prep.get("kind") != "per-site standardisation" or prep.get("in_graph") is not False:
        return None
    return trained_dataset(metadata)


def _set_metadata(proto: onnx.ModelProto, key: str, value: str) -> None:
    for entry in proto.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = key, value


def trained_dataset(metadata: dict[str, str]) -> str | None:
    """The data set a federated model was trained on, as its export names it (in
    ``preprocessing``, for tabular and image models alike); None if it names none."""
    dataset = _preprocessing(metadata).get("dataset")
    return dataset if isinstance(dataset, str) and dataset else None


def _preprocessing(metadata: dict[str, str]) -> dict[str, Any]:
    """The model's ``preprocessing`` metadata as a dict ({} if absent or not one)."""
    try:
        prep = json.loads(metadata.get("preprocessing", "{}"))
    except json.JSONDecodeError:
        return {}
    return prep if isinstance(prep, dict) else {}


def name_classes(data: bytes, classes: Sequence[str], *, provenance: str) -> bytes | None:
    """The model with its ``output`` metadata naming each logit's class, or None when
    its output is not one logit (binary) or one logit per class, as many as
    ``classes``. The graph is untouched.

    The coordinator never sees the sites' class names: a federated classifier's
    export numbers its labels (fedge.serve.jobs). An image data set's classes are
    declared at every site, the same list in label order (fedge.train.data), so the
    site serving the model can name them; ``provenance`` says where they came from.
    """
    proto = onnx.load_from_string(data)
    try:
        out = json.loads(_metadata(proto).get("output", "{}"))
    except json.JSONDecodeError:
        return None
    if not isinstance(out, dict):
        return None
    names = [str(c) for c in classes]
    if out.get("kind") == "logit" and len(names) == 2:
        out["meaning"] = (f"one logit per example: the log-odds of label 1 ({names[1]!r}, "
                          f"against label 0, {names[0]!r}); sigmoid(logit) is its "
                          "probability (not applied in the graph)")
    elif out.get("kind") == "logits" and out.get("classes") == len(names):
        out["meaning"] = (f"{len(names)} logits per example, one per class in this order: "
                          f"{', '.join(repr(n) for n in names)}; softmax gives the "
                          "probabilities (not applied in the graph)")
    else:
        return None
    out["class_names"] = names
    out["class_names_from"] = provenance
    _set_metadata(proto, "output", json.dumps(out))
    return proto.SerializeToString()


def _fresh_name(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def standardise_onnx(
    data: bytes,
    mean: Sequence[float],
    scale: Sequence[float],
    *,
    feature_names: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
) -> bytes:
    """`data` (an ONNX model) with ``(x - mean) / scale`` before its first input.

    ``feature_names`` (the site's column order) is compared with the model's
    ``feature_names`` metadata when the model names its features: a different order or
    set would standardise the wrong columns, and is refused. A model that names none
    (every federated one: the sites never send their column names) gets the site's
    written into its ``feature_names`` (and ``input_columns`` says so): the
    standardisation now in its graph fixes what column j is. ``provenance`` is merged
    into the new ``preprocessing`` metadata (site, data set).

    Raises:
        SiteStandardisationError: not an ONNX model; no input, or an input that is not
            a float tensor whose last axis has len(mean) features; mean and scale of
            different lengths, or not finite, or a scale <= 0; feature names that
            differ from the model's, or not one per feature; the new graph's outputs differ
            from the old one's.
    """
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError
        raise SiteStandardisationError(f"not an ONNX model ({exc})") from None
    mean_v = np.asarray(mean, dtype=np.float64)
    scale_v = np.asarray(scale, dtype=np.float64)
    if mean_v.ndim != 1 or mean_v.shape != scale_v.shape or mean_v.size == 0:
        raise SiteStandardisationError(
            f"standardisation has {mean_v.size} means and {scale_v.size} scales; "
            "they must have one value per feature"
        )
    if not (np.all(np.isfinite(mean_v)) and np.all(np.isfinite(scale_v)) and np.all(scale_v > 0)):
        raise SiteStandardisationError("standardisation constants must be finite, scales > 0")

    graph = proto.graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise SiteStandardisationError(
            f"the model has {len(inputs)} inputs; a site standardisation needs exactly one"
        )
    first = inputs[0]
    ttype = first.type.tensor_type
    np_type = _FLOAT_TYPES.get(ttype.elem_type)
    if np_type is None:
        raise SiteStandardisationError(
            f"input {first.name!r} is {TensorProto.DataType.Name(ttype.elem_type)}; "
            "only FLOAT or DOUBLE inputs can be standardised"
        )
    dims = ttype.shape.dim
    last = dims[-1].dim_value if len(dims) >= 2 and dims[-1].HasField("dim_value") else None
    if len(dims) != 2 or last != mean_v.size:
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
        raise SiteStandardisationError(
            f"input {first.name!r} has shape {shape}; the site's standardisation is for "
            f"rows of {mean_v.size} features"
        )
    meta = _metadata(proto)
    site_names = [str(n) for n in feature_names] if feature_names else []
    if site_names and len(site_names) != mean_v.size:
        raise SiteStandardisationError(
            f"this site names {len(site_names)} features but its standardisation has "
            f"{mean_v.size} values"
        )
    if site_names:
        try:
            model_names = json.loads(meta.get("feature_names", "[]"))
        except json.JSONDecodeError:
            model_names = []
        if model_names and list(model_names) != site_names:
            raise SiteStandardisationError(
                f"the model's features {model_names} are not this site's "
                f"{site_names} (same names, same order)"
            )
        if not model_names:
            # A federated model names no features (the sites never send theirs), yet
            # the graph now standardises column j with this site's constants for its
            # column j: the site's names are the order a client must send, and fedge
            # serve shows them (parameters.feature_names of the model's config).
            _set_metadata(proto, "feature_names", json.dumps(site_names))
            if "input_columns" in meta:
                _set_metadata(proto, "input_columns", (
                    "this site's feature columns, in the order feature_names lists them "
                    "(its agent.toml's [[datasets]] features, or else the data file's "
                    "column order), written by the site when it installed the model; "
                    "the prepended standardisation takes column j to be feature_names[j]"))

    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {i.name for i in graph.input} | {o.name for o in graph.output} | initialisers
    inner = _fresh_name(f"{first.name}__standardised", taken)
    centred = _fresh_name(f"{first.name}__centred", taken | {inner})
    mean_name = _fresh_name("site_standardisation_mean", taken | {inner, centred})
    scale_name = _fresh_name("site_standardisation_scale", taken | {inner, centred, mean_name})
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == first.name:
                node.input[k] = inner
    for out in graph.output:  # an identity model: its output was the input itself
        if out.name == first.name:
            raise SiteStandardisationError(f"the graph outputs its input {first.name!r} as is")
    graph.initializer.extend([
        numpy_helper.from_array(mean_v.astype(np_type), mean_name),
        numpy_helper.from_array(scale_v.astype(np_type), scale_name),
    ])
    prepend = [
        helper.make_node("Sub", [first.name, mean_name], [centred], name="site_standardise_sub"),
        helper.make_node("Div", [centred, scale_name], [inner], name="site_standardise_div"),
    ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(prepend + nodes)

    prep: dict[str, Any] = {
        "kind": "standardise",
        "where": "prepended to the graph by the serving site (Sub, Div)",
        "in_graph": True,
        "mean": [float(v) for v in mean_v],
        "std": [float(v) for v in scale_v],
        **(provenance or {}),
    }
    _set_metadata(proto, "preprocessing", json.dumps(prep))
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise SiteStandardisationError(f"the standardised graph is invalid ({exc})") from None
    out = proto.SerializeToString()
    _check_parity(data, out, first.name, mean_v, scale_v, np_type)
    return out


def _check_parity(before: bytes, after: bytes, input_name: str, mean: np.ndarray,
                  scale: np.ndarray, np_type: type) -> None:
    """The new graph on raw rows must give what the old one gives on standardised rows."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    raw = (mean + scale * rng.standard_normal((7, mean.size))).astype(np_type)
    standardised = ((raw.astype(np.float64) - mean) / scale).astype(np_type)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        old = ort.InferenceSession(before, opts, providers=["CPUExecutionProvider"])
        new = ort.InferenceSession(after, opts, providers=["CPUExecutionProvider"])
        expected = old.run(None, {input_name: standardised})
        got = new.run(None, {input_name: raw})
    except Exception as exc:  # onnxruntime's own errors: a graph it cannot run
        raise SiteStandardisationError(f"onnxruntime cannot run the model ({exc})") from None
    for e, g in zip(expected, got, strict=True):
        e64, g64 = np.asarray(e, dtype=np.float64), np.asarray(g, dtype=np.float64)
        diff = float(np.max(np.abs(e64 - g64))) if e64.size else 0.0
        bound = PARITY_TOLERANCE * max(1.0, float(np.max(np.abs(e64))) if e64.size else 1.0)
        if not math.isfinite(diff) or diff > bound:
            raise SiteStandardisationError(
                f"the standardised graph differs from the model on standardised rows by "
                f"{diff:.3g} (> {bound:.3g})"
            )
