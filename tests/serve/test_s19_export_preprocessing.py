"""export_onnx has no default preprocessing: every caller says what the input goes
through. A silent {"kind": "none"} once labelled a model trained on standardised rows
as taking raw ones (the demo's model.onnx), and an appliance served it on raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedge.serve.export import Standardisation, export_onnx, read_metadata
from fedge.serve.jobs import _site_preprocessing


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def test_a_model_whose_preprocessing_is_not_stated_is_not_exported(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=r"needs the model's preprocessing stated.*no default"):
        export_onnx(_model(), torch.zeros(2, 3), {"job_id": "j"}, target)
    assert not target.exists()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("argument-none", {"kind": "none"}),
        ("metadata-none", {"kind": "none"}),
        ("argument-site", _site_preprocessing("rows", 1)),
        ("metadata-site", _site_preprocessing("rows", 1)),
    ],
)
def test_a_stated_description_is_written_as_given(
    tmp_path: Path, how: str, expected: dict
) -> None:
    meta, kwargs = {"job_id": "j"}, {}
    if how.startswith("argument"):
        kwargs["preprocessing"] = expected
    else:
        meta["preprocessing"] = json.dumps(expected)
    result = export_onnx(_model(), torch.zeros(2, 3), meta, tmp_path / "m.onnx", **kwargs)
    assert json.loads(read_metadata(result.path)["preprocessing"]) == expected


@pytest.mark.parametrize(
    ("meta", "preprocessing", "needle"),
    [
        ({"preprocessing": json.dumps({"kind": "none"})}, Standardisation([0.0] * 3, [1.0] * 3),
         "given twice, as a Standardisation"),
        ({"preprocessing": json.dumps({"kind": "none"})}, {"kind": "none"}, "given twice"),
        ({"preprocessing": "none"}, None, "is not JSON"),
        ({"preprocessing": json.dumps(["none"])}, None, "non-empty str 'kind'"),
        ({}, {"what": "none"}, "non-empty str 'kind'"),
        ({}, {"kind": "standardise", "mean": [0.0] * 3, "std": [1.0] * 3},
         "only a Standardisation folded into the graph may claim"),
    ],
    ids=["standardisation-and-metadata", "argument-and-metadata", "not-json", "not-an-object",
         "no-kind", "standardise-claimed-not-folded"],
)
def test_a_contradictory_or_malformed_statement_is_refused(
    tmp_path: Path, meta: dict, preprocessing: object, needle: str
) -> None:
    target = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match=needle):
        export_onnx(_model(), torch.zeros(2, 3), meta, target,
                    preprocessing=preprocessing)  # type: ignore[arg-type]
    assert not target.exists()


def test_a_folded_standardisation_is_described_by_export_onnx(tmp_path: Path) -> None:
    result = export_onnx(_model(), torch.zeros(2, 3), {}, tmp_path / "m.onnx",
                         preprocessing=Standardisation([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]))
    prep = json.loads(read_metadata(result.path)["preprocessing"])
    assert prep["kind"] == "standardise" and prep["mean"] == [1.0, 2.0, 3.0]
