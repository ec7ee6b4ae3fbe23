"""ModelRepository.install refuses bytes that parse as ONNX but are not a valid model
(onnx.checker's complaint named), and installs nothing: an empty file (it parses as an
empty ModelProto) and a graph whose node reads an input that does not exist. Kills
mutation M44 (``onnx.checker.check_model`` skipped at install)."""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper

from fedge.serve.repository import ModelRepository


def dangling_input_model() -> bytes:
    """A model whose only node reads 'nope', which nothing defines."""
    node = helper.make_node("Relu", ["nope"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize(("data", "complaint"), [
    (b"", "ir_version"),
    (dangling_input_model(), "nope"),
], ids=["empty", "node-reads-an-undefined-input"])
def test_a_model_that_parses_but_fails_the_checker_is_refused_and_nothing_installed(
    tmp_path: Path, data: bytes, complaint: str,
) -> None:
    repo = ModelRepository(tmp_path)
    with pytest.raises(ValueError, match=r"refusing to install 'cox': not a valid ONNX "
                                         rf"model \(.*{complaint}"):
        repo.install("cox", data)
    assert repo.versions("cox") == []
    assert list(tmp_path.iterdir()) == []
