"""standardise_onnx: a federated model made to take one site's raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from fedge.serve.export import export_onnx
from fedge.serve.jobs import _site_preprocessing
from fedge.serve.sitelocal import (
    SiteStandardisationError,
    needs_site_standardisation,
    standardise_onnx,
)

NAMES = ["age", "stage", "grade", "size"]


def _federated_onnx(
    tmp_path: Path, names: list[str] | None = None
) -> tuple[bytes, torch.nn.Module]:
    """A model as the coordinator exports a federated tabular job: no standardisation
    in its graph, metadata saying each site must apply its own."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    props = {
        "feature_names": json.dumps(NAMES if names is None else names),
        "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1)),
    }
    out = tmp_path / "model.onnx"
    export_onnx(model, torch.zeros(2, 4), props, out)
    return out.read_bytes(), model


def _meta(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_the_site_graph_on_raw_rows_equals_the_model_on_the_sites_standardised_rows(
    tmp_path: Path,
) -> None:
    data, model = _federated_onnx(tmp_path)
    assert needs_site_standardisation(_meta(data)) == "risk_rows"
    mean = np.array([61.0, 2.0, 1.5, 23.0], dtype=np.float32)
    scale = np.array([11.0, 0.9, 0.5, 14.0], dtype=np.float32)
    site = standardise_onnx(data, mean, scale, feature_names=NAMES,
                            provenance={"site": "h1", "dataset": "risk_rows"})
    raw = np.array([[70, 3, 2, 40], [45, 1, 1, 8], [61, 2, 1.5, 23]], dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy((raw - mean) / scale)).numpy()
    np.testing.assert_allclose(_run(site, raw), expected, rtol=1e-5, atol=1e-5)
    # served as it came, the raw rows give something else: what this fixes
    assert not np.allclose(_run(data, raw), expected, atol=1e-2)
    prep = json.loads(_meta(site)["preprocessing"])
    assert prep["in_graph"] is True and prep["site"] == "h1" and prep["dataset"] == "risk_rows"
    assert prep["mean"] == pytest.approx(mean.tolist()) and prep["std"] == pytest.approx(
        scale.tolist())
    # installed twice (a re-push), it is not standardised twice
    assert needs_site_standardisation(_meta(site)) is None
    # the rest of the provenance is kept
    assert json.loads(_meta(site)["feature_names"]) == NAMES


def test_a_model_whose_features_are_not_the_sites_is_refused_by_name(tmp_path: Path) -> None:
    data, _ = _federated_onnx(tmp_path)
    with pytest.raises(SiteStandardisationError, match="not this site's"):
        standardise_onnx(data, [0.0] * 4, [1.0] * 4, feature_names=["stage", "age", "grade",
                                                                   "size"])
    with pytest.raises(SiteStandardisationError, match="rows of 5 features"):
        standardise_onnx(data, [0.0] * 5, [1.0] * 5)
    with pytest.raises(SiteStandardisationError, match="scales > 0"):
        standardise_onnx(data, [0.0] * 4, [1.0, 0.0, 1.0, 1.0])
    with pytest.raises(SiteStandardisationError, match="not an ONNX model"):
        standardise_onnx(b"\x00garbage", [0.0] * 4, [1.0] * 4)


def test_an_integer_input_or_a_name_clash_is_handled(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["n", 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    ints = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SiteStandardisationError, match="INT64"):
        standardise_onnx(ints.SerializeToString(), [0.0, 0.0], [1.0, 1.0])

    # a graph already using the names the prepended nodes would take
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    k = helper.make_tensor("x__standardised", TensorProto.FLOAT, [1], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x__standardised"], ["x__centred"]),
         helper.make_node("Identity", ["x__centred"], ["y"])], "g", [x], [y], [k])
    clash = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    clash.ir_version = 8
    out = standardise_onnx(clash.SerializeToString(), [1.0, 3.0], [2.0, 4.0])
    raw = np.array([[5.0, 7.0]], dtype=np.float32)
    np.testing.assert_allclose(_run(out, raw), [[4.0, 2.0]])  # ((5-1)/2, (7-3)/4) * 2


def test_models_that_need_nothing_are_recognised() -> None:
    assert needs_site_standardisation({}) is None
    assert needs_site_standardisation({"preprocessing": "not json"}) is None
    assert needs_site_standardisation(
        {"preprocessing": json.dumps(_site_preprocessing("scans", 3))}) is None  # images
    assert needs_site_standardisation(
        {"preprocessing": json.dumps({"kind": "standardise", "in_graph": True})}) is None
