"""`fedge serve` as a real process on loopback: the v2 REST API, tritonclient, errors, metrics."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import N_FEATURES, RunningServer, serving


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _json_request(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                        "data": x.ravel().tolist()}]}


def test_tritonclient_default_settings_get_the_pytorch_answer(
    server: RunningServer, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    client = triton.InferenceServerClient(server.host_port)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cox")
    meta = client.get_model_metadata("cox")
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}]
    x = _rows(5)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # default: binary tensor extension
    result = client.infer("cox", [inp])
    out = result.as_numpy("output")
    assert out.shape == (5, 1)
    np.testing.assert_allclose(out, _torch(cox_v1[1], x), atol=1e-5)
    # binary in, binary out: the response used Inference-Header-Content-Length
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 20


def test_tritonclient_json_tensors_and_explicit_version(
    server: RunningServer, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    client = triton.InferenceServerClient(server.host_port)
    x = _rows(3, seed=1)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = triton.InferRequestedOutput("output", binary_data=False)
    result = client.infer("cox", [inp], model_version="1", outputs=[out], request_id="r-7")
    body = result.get_response()
    assert body["id"] == "r-7" and body["model_version"] == "1"
    assert "data" in body["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("output"), _torch(cox_v1[1], x), atol=1e-5)


def test_plain_http_json_request(
    server: RunningServer, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    x = _rows(2, seed=2)
    r = httpx.post(f"{server.url}/v2/models/cox/infer", json=_json_request(x), timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model_name"] == "cox"
    out = body["outputs"][0]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, _torch(cox_v1[1], x), atol=1e-5)


def test_gzip_request_body_is_accepted(server: RunningServer) -> None:
    client = triton.InferenceServerClient(server.host_port)
    x = _rows(4, seed=3)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    plain = client.infer("cox", [inp]).as_numpy("output")
    zipped = client.infer("cox", [inp], request_compression_algorithm="gzip").as_numpy("output")
    np.testing.assert_array_equal(plain, zipped)


def test_server_metadata_and_health(server: RunningServer) -> None:
    meta = httpx.get(f"{server.url}/v2", timeout=5).json()
    assert meta["name"] == "fedge" and "binary_tensor_data" in meta["extensions"]
    assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/v2/models/cox/versions/1/ready", timeout=5).status_code == 200


def test_model_config_carries_the_export_provenance(server: RunningServer) -> None:
    config = triton.InferenceServerClient(server.host_port).get_model_config("cox")
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["job_id"] == "job-1"
    assert float(params["parity_max_abs_diff"]) <= 1e-5


# -- the bad-input table: one case per row, each a 4xx with {"error": ...} ------------


def _assert_error(r: httpx.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    for needle in needles:
        assert needle in message, message
    return message


def test_wrong_input_name_is_400(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/v2/models/cox/infer",
                   json=_json_request(_rows(1), name="features"), timeout=5)
    _assert_error(r, 400, "'features'", "input")


def test_wrong_shape_is_400(server: RunningServer) -> None:
    x = np.zeros((2, N_FEATURES - 1), dtype=np.float32)
    r = httpx.post(f"{server.url}/v2/models/cox/infer", json=_json_request(x), timeout=5)
    _assert_error(r, 400, "shape [2, 38]", f"[-1, {N_FEATURES}]")


def test_shape_that_disagrees_with_the_data_is_400(server: RunningServer) -> None:
    req = _json_request(_rows(2))
    req["inputs"][0]["shape"] = [3, N_FEATURES]
    r = httpx.post(f"{server.url}/v2/models/cox/infer", json=req, timeout=5)
    _assert_error(r, 400, "78 data elements", "117")


def test_wrong_datatype_is_400(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/v2/models/cox/infer",
                   json=_json_request(_rows(1), datatype="FP64"), timeout=5)
    _assert_error(r, 400, "FP64", "FP32")


def test_wrong_datatype_through_tritonclient_is_an_error_not_a_crash(
    server: RunningServer,
) -> None:
    client = triton.InferenceServerClient(server.host_port)
    x = _rows(1).astype(np.float64)
    inp = triton.InferInput("input", list(x.shape), "FP64")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="FP64"):
        client.infer("cox", [inp])


@pytest.mark.parametrize("gzipped", [False, True], ids=["direct-lane", "asgi-lane"])
@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (None, "element 5 is null"),  # a missing lab value: was a NaN risk score, 200
        ("1.5", 'element 5 is the string "1.5"'),
        (True, "element 5 is true"),
        (1e300, "element 5 is the number 1e+300, beyond the range of FP32"),  # was Infinity
    ],
)
def test_json_data_that_is_not_an_fp32_number_is_400_naming_the_element(
    server: RunningServer, value: object, needle: str, gzipped: bool
) -> None:
    req = _json_request(_rows(1))
    req["inputs"][0]["data"][5] = value
    body = json.dumps(req).encode()
    headers = {"content-type": "application/json"}
    if gzipped:
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=body, headers=headers, timeout=5)
    _assert_error(r, 400, "input 'input' 'data' " + needle)


def test_malformed_json_is_400(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=b'{"inputs": [', timeout=5)
    _assert_error(r, 400, "malformed JSON")


def test_deeply_nested_json_is_400_on_either_lane(server: RunningServer) -> None:
    url = f"{server.url}/v2/models/cox/infer"
    # a small body with its length declared: the direct lane
    shallow = b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}"
    _assert_error(httpx.post(url, content=shallow, timeout=10), 400, "nested too deeply")
    # streamed without a length: the ASGI lane (uvicorn answered a plain-text 500)
    deep = b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = httpx.post(url, content=iter([deep]), timeout=10)
    _assert_error(r, 400, "nested too deeply")
    ok = httpx.post(url, json=_json_request(_rows(1)), timeout=5)
    assert ok.status_code == 200


def test_binary_size_beyond_the_body_is_400(server: RunningServer) -> None:
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, N_FEATURES],
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": 4 * N_FEATURES}}]})
    body = header.encode() + b"\0" * 10
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=body, timeout=5,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    _assert_error(r, 400, "156 bytes", "10 remain")


def test_oversized_body_is_413(server: RunningServer) -> None:
    body = b"{" + b" " * 1_000_001 + b"}"  # the fixture's limit is 1,000,000 bytes
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=body, timeout=10)
    _assert_error(r, 413, "exceeds the limit of 1000000 bytes")
    # without a Content-Length (chunked), the limit holds while the body streams in
    chunks = (b" " * 100_000 for _ in range(11))
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=chunks, timeout=10)
    _assert_error(r, 413, "exceeds the limit of 1000000 bytes")
    # a small gzip body that inflates past the limit is refused as well
    bomb = gzip.compress(b"{" + b" " * 2_000_000 + b"}")
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=bomb, timeout=10,
                   headers={"Content-Encoding": "gzip"})
    _assert_error(r, 413, "decompressed body exceeds the limit of 1000000 bytes")
    # the server is still fine afterwards
    ok = httpx.post(f"{server.url}/v2/models/cox/infer", json=_json_request(_rows(1)), timeout=5)
    assert ok.status_code == 200


@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "%EF%BC%91", "1" * 30, "01", "0001"])
def test_a_version_must_be_ascii_digits_else_404(server: RunningServer, version: str) -> None:
    # "²" (superscript two) answered 500 on infer and plain-text 500 on the other
    # routes; "١" (Arabic-Indic one) and "１" (fullwidth one) were served as version 1,
    # and so were "01" and "0001": no version directory is named so
    for method, path in [("GET", ""), ("GET", "/ready"), ("GET", "/config"),
                         ("POST", "/infer")]:
        r = httpx.request(method, f"{server.url}/v2/models/cox/versions/{version}{path}",
                          json=_json_request(_rows(1)) if method == "POST" else None, timeout=5)
        _assert_error(r, 404, "unknown version", "of model 'cox'")


def test_unknown_model_is_404(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/v2/models/nope/infer", json=_json_request(_rows(1)), timeout=5)
    _assert_error(r, 404, "unknown model 'nope'")
    r = httpx.get(f"{server.url}/v2/models/nope", timeout=5)
    _assert_error(r, 404, "unknown model 'nope'")


def test_unknown_version_is_404(server: RunningServer) -> None:
    r = httpx.post(f"{server.url}/v2/models/cox/versions/7/infer",
                   json=_json_request(_rows(1)), timeout=5)
    _assert_error(r, 404, "unknown version '7'", "loaded: 1")
    r = httpx.get(f"{server.url}/v2/models/cox/versions/7/ready", timeout=5)
    _assert_error(r, 404, "unknown version '7'")


def test_unknown_route_and_wrong_method_use_the_error_json(server: RunningServer) -> None:
    _assert_error(httpx.get(f"{server.url}/v3", timeout=5), 404)
    _assert_error(httpx.get(f"{server.url}/v2/models/cox/infer", timeout=5), 405)


def test_metrics_count_requests_per_model_and_status(server: RunningServer) -> None:
    httpx.post(f"{server.url}/v2/models/cox/infer", json=_json_request(_rows(1)), timeout=5)
    httpx.post(f"{server.url}/v2/models/cox/infer", content=b"[", timeout=5)
    text = httpx.get(f"{server.url}/metrics", timeout=5).text

    def value(prefix: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
        return float(line.rsplit(" ", 1)[1])

    assert value('fedge_serve_infer_requests_total{code="200",model="cox"}') >= 1
    assert value('fedge_serve_infer_requests_total{code="400",model="cox"}') >= 1
    assert value('fedge_serve_infer_duration_seconds_count{model="cox"}') >= 2
    assert value('fedge_serve_model_live_version{model="cox"}') == 1


def test_connection_close_still_delivers_the_whole_response(server: RunningServer) -> None:
    # Responses are written once per event-loop step; a closing connection must
    # flush that write before it closes.
    import socket

    x = _rows(1)
    body = json.dumps(_json_request(x)).encode()
    head = (f"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    host, port = server.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    header, _, payload = received.partition(b"\r\n\r\n")
    assert header.startswith(b"HTTP/1.1 200")
    assert json.loads(payload)["outputs"][0]["shape"] == [1, 1]


def test_a_version_that_failed_to_load_is_a_404_that_says_why(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    # "unknown model 'broken'" for a model on disk left its operator guessing
    # broken's only version; cox's version 2, under the one installed (3, above it)
    for name, version in (("broken", 1), ("cox", 2)):
        (tmp_path / name / str(version)).mkdir(parents=True)
        (tmp_path / name / str(version) / "model.onnx").write_bytes(b"not onnx")
    with serving(tmp_path, cox=cox_v1[0]) as server:
        deadline = time.monotonic() + 20
        while "not serving cox version 2" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        for path in ("", "/ready", "/config"):
            r = httpx.get(f"{server.url}/v2/models/broken{path}", timeout=5)
            _assert_error(r, 404, "unknown model 'broken': not serving broken version 1: "
                                  "cannot load ")
        r = httpx.post(f"{server.url}/v2/models/broken/infer", json=_json_request(_rows(1)),
                       timeout=5)
        _assert_error(r, 404, "unknown model 'broken': not serving broken version 1")
        r = httpx.get(f"{server.url}/v2/models/cox/versions/2", timeout=5)
        _assert_error(r, 404, "unknown version '2' of model 'cox' (loaded: 3): not serving cox "
                              "version 2: cannot load ")
        r = httpx.post(f"{server.url}/v2/models/cox/versions/2/infer",
                       json=_json_request(_rows(1)), timeout=5)
        _assert_error(r, 404, "not serving cox version 2")
        # a version never on disk, and the live one, answer as before
        _assert_error(httpx.get(f"{server.url}/v2/models/cox/versions/4", timeout=5), 404,
                      "unknown version '4' of model 'cox' (loaded: 3)")
        assert httpx.get(f"{server.url}/v2/models/cox", timeout=5).status_code == 200
        # the health checks keep their meaning: ready, with cox loaded
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200


def _reshaping_model() -> bytes:
    """ONNX: input [-1, -1] reshaped to [-1, 4]. It loads (the smoke input [1, 32]
    reshapes) and fails in onnxruntime on a valid-looking [1, 5]: a 500."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k", 4])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_model_failures_are_500s_logged_with_a_traceback_at_most_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from fedge.serve.repository import ModelRepository
    from fedge.serve.server import InferenceServer

    ModelRepository(tmp_path).install("m", _reshaping_model())
    app = InferenceServer(tmp_path)
    app.store.sync(app.repo)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32",
                                   "data": [0.5] * 5}]}).encode()

    async def infer() -> tuple[int, bytes, dict[str, str]]:
        try:
            return await app.infer("m", None, body, {"headers": []})
        except Exception as exc:
            from fedge.serve.protocol import ProtocolError

            assert isinstance(exc, ProtocolError)
            return exc.status, exc.body(), {}

    with caplog.at_level(logging.ERROR, logger="fedge.serve"):
        answers = [asyncio.run(infer()) for _ in range(5)]
    assert [status for status, _, _ in answers] == [500] * 5
    assert "inference failed in model 'm' version 1" in json.loads(answers[0][1])["error"]
    failures = [r for r in caplog.records if r.getMessage().startswith("inference failed")]
    assert len(failures) == 1 and failures[0].exc_info is not None


def test_one_failing_model_does_not_hide_another_s_first_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from fedge.serve.protocol import ProtocolError
    from fedge.serve.repository import ModelRepository
    from fedge.serve.server import InferenceServer

    for name in ("m", "n"):
        ModelRepository(tmp_path).install(name, _reshaping_model())
    app = InferenceServer(tmp_path)
    app.store.sync(app.repo)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32",
                                   "data": [0.5] * 5}]}).encode()

    async def infer(name: str) -> int:
        try:
            return (await app.infer(name, None, body, {"headers": []}))[0]
        except ProtocolError as exc:
            return exc.status

    with caplog.at_level(logging.ERROR, logger="fedge.serve"):
        statuses = [asyncio.run(infer(name)) for name in ("m", "m", "n", "m", "n")]
    assert statuses == [500] * 5
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("inference")]
    assert logged == ["inference failed for m version 1", "inference failed for n version 1"]
