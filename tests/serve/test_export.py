"""export_onnx: opset, dynamic batch, provenance in metadata_props, parity or refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fedge import __version__
from fedge.serve.export import ExportRefused, Standardisation, export_onnx, read_metadata

META = {
    "job_id": "brca-7",
    "round": "12",
    "model_digest": "ab" * 32,
    "feature_names": json.dumps([f"f{i}" for i in range(5)]),
    "metrics": json.dumps({"c_index": 0.74}),
}
NONE = {"kind": "none"}  # preprocessing has no default: inputs taken as they are


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


class SignBranch(torch.nn.Module):
    """Data-dependent control flow: a tracer freezes whichever branch the example took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


def test_export_writes_opset_17_with_dynamic_batch_and_provenance(tmp_path: Path) -> None:
    model = _mlp()
    result = export_onnx(model, torch.randn(3, 5), META, tmp_path / "m.onnx",
                         preprocessing=NONE)
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert result.path.stat().st_mode & 0o777 == 0o644
    props = read_metadata(result.path)
    for key, value in META.items():
        assert props[key] == value
    assert props["fedge_version"] == __version__
    assert json.loads(props["preprocessing"]) == {"kind": "none"}
    assert float(props["parity_max_abs_diff"]) == result.parity_max_abs_diff <= 1e-5
    assert int(props["parity_batch"]) == result.parity_batch == 6  # not the traced 3
    # any batch size runs and agrees with PyTorch
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((17, 5)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)


def test_parity_failure_is_refused_with_the_numbers_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "branch.onnx"
    positive = torch.ones(2, 4)
    held_out = -torch.ones(3, 4)  # takes the other branch
    refusal = r"max \|onnxruntime - pytorch\| = 3 .*batch of 3.*1e-05"
    with pytest.raises(ExportRefused, match=refusal) as err:
        export_onnx(SignBranch(), positive, {}, target, held_out=held_out, preprocessing=NONE)
    assert err.value.max_abs_diff == pytest.approx(3.0)
    assert err.value.tolerance == 1e-5
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


class OffOnOneBranch(torch.nn.Module):
    """A linear risk score on raw (large) inputs; eager PyTorch scales it by 1 + 1e-4
    on inputs that sum below zero, a branch the tracer never sees: the exported
    graph is wrong there by 1e-4 of the output, ten times the relative tolerance."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.linear = torch.nn.Linear(39, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if x.sum() > 0:
            return y
        return y * (1 + 1e-4)


def test_large_outputs_are_compared_relative_to_their_magnitude(tmp_path: Path) -> None:
    # a linear risk score on raw values in the thousands: outputs up to 3000 on the
    # held-out batch, where onnxruntime and PyTorch differ by 3.7e-4 (1.2e-7 of it,
    # one float32 rounding); a fixed 1e-5 refused this correct export
    torch.manual_seed(0)
    model = torch.nn.Linear(39, 1)
    example = torch.randn(4, 39) * 1000
    result = export_onnx(model, example, META, tmp_path / "raw.onnx", preprocessing=NONE)
    assert 1e-5 < result.parity_max_abs_diff <= 1e-5 + 1e-5 * 3000
    props = read_metadata(result.path)
    assert (props["parity_tolerance"], props["parity_rtol"]) == ("1e-05", "1e-05")
    assert float(props["parity_max_abs_diff"]) == result.parity_max_abs_diff
    # a wrong graph on the same scale is still refused
    target = tmp_path / "wrong.onnx"
    positive = torch.rand(4, 39) * 1000
    with pytest.raises(ExportRefused, match=r"in output 'output' .* exceeds the tolerance "
                                            r"1e-05 \+ 1e-05 x max \|pytorch\|") as err:
        export_onnx(OffOnOneBranch(), positive, {}, target, held_out=-positive,
                    preprocessing=NONE)
    with torch.no_grad():
        largest = float(OffOnOneBranch()(-positive).abs().max())
    assert err.value.max_abs_diff > 5 * 1e-5 * largest
    assert (err.value.tolerance, err.value.rtol) == (1e-5, 1e-5)
    assert not target.exists()


def test_standardisation_is_folded_into_the_graph(tmp_path: Path) -> None:
    model = _mlp()
    mean = [1.0, -2.0, 0.5, 10.0, 0.0]
    std = [2.0, 0.5, 1.0, 4.0, 3.0]
    result = export_onnx(model, torch.randn(2, 5), {}, tmp_path / "s.onnx",
                         preprocessing=Standardisation(mean, std))
    raw = np.random.default_rng(2).normal(5, 3, (4, 5)).astype(np.float32)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = model((torch.from_numpy(raw) - torch.tensor(mean)) / torch.tensor(std)).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": raw})[0], want, atol=1e-5)
    prep = json.loads(read_metadata(result.path)["preprocessing"])
    assert prep["mean"] == mean and prep["std"] == std


def _node_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(
    ("model", "nodes"),
    [
        (torch.nn.Linear(5, 1), ["Gemm"]),  # cox_linear
        (torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)),
         ["Gemm", "Relu", "Gemm"]),  # cox_mlp
    ],
    ids=["linear", "mlp"],
)
def test_standardisation_folds_into_a_first_linear_layer(
    tmp_path: Path, model: torch.nn.Module, nodes: list[str]
) -> None:
    torch.manual_seed(3)
    mean = [40.0, -2.0, 0.5, 10.0, 0.0]
    std = [12.0, 0.5, 1.0, 4.0, 3.0]
    prep = Standardisation(mean, std)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    raw = torch.tensor(mean) + torch.randn(64, 5) * torch.tensor(std)
    result = export_onnx(model, raw[:4], META, tmp_path / "f.onnx", held_out=raw[4:],
                         preprocessing=prep)
    assert _node_types(result.path) == nodes  # no Sub or Div left in front of the Gemm
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = (torch.tensor(mean) + torch.randn(16, 5) * torch.tensor(std)).numpy()
    with torch.no_grad():
        want = model((torch.from_numpy(x) - torch.tensor(mean)) / torch.tensor(std)).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)
    props = read_metadata(result.path)
    assert json.loads(props["preprocessing"]) == {
        "kind": "standardise", "where": "folded into the first Linear layer's weights and bias",
        "mean": mean, "std": std,
    }
    assert float(props["parity_max_abs_diff"]) <= 1e-5
    assert props["job_id"] == "brca-7"
    for name, value in model.state_dict().items():  # the caller's model is left as it was
        assert torch.equal(value, before[name]), name


def test_standardisation_stays_in_front_when_folding_would_lose_parity(tmp_path: Path) -> None:
    # Features around 1e6: (W / std) x - (W / std) mean cancels in float32, far
    # beyond 1e-5, while (x - mean) / std followed by W stays exact enough.
    torch.manual_seed(4)
    model = torch.nn.Linear(5, 1)
    mean = [1.0e6] * 5
    std = [1.0] * 5
    raw = torch.tensor(mean) + torch.randn(40, 5)
    result = export_onnx(model, raw[:4], {}, tmp_path / "u.onnx", held_out=raw[4:],
                         preprocessing=Standardisation(mean, std))
    assert _node_types(result.path) == ["Sub", "Div", "Gemm"]
    prep = json.loads(read_metadata(result.path)["preprocessing"])
    assert prep["where"] == "folded into the graph"
    assert result.parity_max_abs_diff <= 1e-5


def test_standardisation_of_other_models_stays_in_the_graph(tmp_path: Path) -> None:
    model = SignBranch()  # does not start with a Linear layer: nothing to fold into
    prep = Standardisation([1.0] * 3, [2.0] * 3)
    example = torch.full((2, 3), 5.0)
    result = export_onnx(model, example, {}, tmp_path / "o.onnx",
                         held_out=torch.full((3, 3), 7.0), preprocessing=prep)
    assert {"Sub", "Div"} <= set(_node_types(result.path))
    assert json.loads(read_metadata(result.path)["preprocessing"])["where"] == \
        "folded into the graph"


def test_training_mode_is_restored(tmp_path: Path) -> None:
    model = _mlp().train()
    export_onnx(model, torch.randn(2, 5), {}, tmp_path / "m.onnx", preprocessing=NONE)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"metadata": {"round": 3}}, TypeError, "metadata\\['round'\\] is int"),
        ({"metadata": {"fedge_version": "x"}}, ValueError, "written by export_onnx"),
        ({"opset": 13}, ValueError, "opset 13 is below the minimum 17"),
        ({"tolerance": -1.0}, ValueError, "tolerance -1.0"),
        ({"rtol": float("nan")}, ValueError, "rtol nan must be a finite number >= 0"),
        ({"example_input": torch.zeros(0, 5)}, ValueError, "axis 0 must be >= 1"),
        ({"held_out": torch.zeros(3, 4)}, ValueError, "held_out shape \\(3, 4\\)"),
        ({"preprocessing": Standardisation([0.0], [1.0])}, ValueError, "1 features"),
    ],
)
def test_bad_arguments_name_what_was_wrong(
    tmp_path: Path, kwargs: dict, error: type[Exception], needle: str
) -> None:
    args = {"model": _mlp(), "example_input": torch.randn(2, 5), "metadata": {},
            "path": tmp_path / "m.onnx", "preprocessing": NONE, **kwargs}
    with pytest.raises(error, match=needle):
        export_onnx(**args)
    assert not (tmp_path / "m.onnx").exists()


def test_standardisation_rejects_a_zero_std() -> None:
    with pytest.raises(ValueError, match=r"std\[1\] = 0.0; must be finite and > 0"):
        Standardisation([0.0, 0.0], [1.0, 0.0])
