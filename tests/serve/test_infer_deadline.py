"""An inference run has a deadline (`fedge serve --infer-timeout`).

A model can pass its load check and still run for days on some inputs: here a
`Loop` whose trip count comes from the input (0 trips for ordinary rows, 10^15
for a row holding a value over 1000). Such a request is stopped and answered
with 504 naming the setting; the server keeps answering everyone else meanwhile
(a run on the event loop is moved to the worker thread after a second), and
serves the same model normally afterwards.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper

from fedge.serve.runtime import RunDeadlines, load_model
from tests.serve.conftest import N_FEATURES, serving

TIMEOUT_S = 5.0


def input_driven_loop(path: Path) -> Path:
    """input [N, 39] -> output [N, 1] = row sums + trips, with
    trips = relu(max(input) - 1000) * 1e12: 0 for ordinary rows."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["input"], ["top"], keepdims=0),
         helper.make_node("Sub", ["top", "threshold"], ["over"]),
         helper.make_node("Relu", ["over"], ["positive"]),
         helper.make_node("Mul", ["positive", "scale"], ["many"]),
         helper.make_node("Cast", ["many"], ["trips"], to=TensorProto.INT64),
         helper.make_node("Loop", ["trips", "cond", "v0"], ["v_final"], body=body),
         helper.make_node("ReduceSum", ["input", "axis"], ["s"], keepdims=1),
         helper.make_node("Add", ["s", "v_final"], ["output"])],
        "input_driven_loop",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("threshold", TensorProto.FLOAT, [], [1000.0]),
         helper.make_tensor("scale", TensorProto.FLOAT, [], [1e12]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
         helper.make_tensor("v0", TensorProto.FLOAT, [1], [0.0]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def _rows(n: int, seed: int, poison: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)
    if poison:
        x[0, 0] = 5000.0
    return x


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}


def _binary(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary-tensor request (the ASGI lane once it is over 1 MiB)."""
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": "output", "parameters": {"binary_data": False}}]})
    return head.encode() + x.tobytes(), {"Inference-Header-Content-Length": str(len(head)),
                                         "Content-Type": "application/octet-stream"}


def _sums(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)


def test_run_deadlines_stop_a_run_past_due_and_only_that_one(tmp_path: Path) -> None:
    model = load_model("slow", 1, input_driven_loop(tmp_path / "m.onnx"), threads=1)
    deadlines = RunDeadlines()
    ordinary = deadlines.start(30.0)
    stopped = deadlines.start(0.5)
    t0 = time.monotonic()
    try:
        model.run({"input": _rows(2, 0, poison=True)}, ["output"], stopped)
        raise AssertionError("the poisoned run was not stopped")
    except Exception as exc:  # onnxruntime's Fail
        assert "terminate" in str(exc)
    assert 0.4 < time.monotonic() - t0 < 10
    assert stopped.terminate and not ordinary.terminate
    out = model.run({"input": _rows(3, 1)}, ["output"], ordinary)
    np.testing.assert_allclose(out[0][:, 0], _rows(3, 1).sum(axis=1), rtol=1e-5, atol=1e-4)
    deadlines.stop(ordinary)
    deadlines.stop(stopped)
    assert deadlines.watched == 0


def test_a_run_past_the_infer_timeout_gets_504_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    onnx_path = input_driven_loop(tmp_path / "slow.onnx")
    with serving(tmp_path / "repo", "--infer-timeout", str(TIMEOUT_S), cox=onnx_path) as server:
        url = f"{server.url}/v2/models/cox/infer"
        ok = _rows(4, 1)
        assert np.allclose(_sums(httpx.post(url, json=_body(ok), timeout=30)),
                           ok.sum(axis=1), rtol=1e-5, atol=1e-4)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            t0 = time.monotonic()
            # the direct lane (small JSON body, estimated to run on the event loop)
            poisoned = pool.submit(httpx.post, url, json=_body(_rows(2, 2, poison=True)),
                                   timeout=60)
            # the ASGI lane (a binary body over 1 MiB, run on the worker thread)
            big = _rows(8000, 3, poison=True)
            content, headers = _binary(big)
            assert len(content) > 1024 * 1024
            poisoned_big = pool.submit(httpx.post, url, content=content, headers=headers,
                                       timeout=60)
            time.sleep(0.5)
            # while the poisoned runs are under way, the event loop answers at once
            # (a run on the loop is stopped and moved within 1 s: none waits for 5)
            for _ in range(3):
                t_live = time.monotonic()
                assert httpx.get(f"{server.url}/v2/health/live", timeout=30).status_code == 200
                assert time.monotonic() - t_live < 2.5
            # and ordinary requests on the direct lane are answered
            ordinary = [pool.submit(httpx.post, url, json=_body(_rows(3, 10 + i)), timeout=60)
                        for i in range(4)]
            for i, future in enumerate(ordinary):
                np.testing.assert_allclose(_sums(future.result()),
                                           _rows(3, 10 + i).sum(axis=1), rtol=1e-5, atol=1e-4)
            for future in (poisoned, poisoned_big):
                r = future.result()
                assert r.status_code == 504, r.text
                assert "--infer-timeout" in r.json()["error"]
                assert f"{TIMEOUT_S:g} s" in r.json()["error"]
            # both stopped at the deadline (one after the other on the worker), not
            # left running: well within the 60 s the client would wait
            assert time.monotonic() - t0 < 4 * TIMEOUT_S + 10

        # the same model serves ordinary rows afterwards, on either lane
        again = _rows(5, 4)
        np.testing.assert_allclose(_sums(httpx.post(url, json=_body(again), timeout=30)),
                                   again.sum(axis=1), rtol=1e-5, atol=1e-4)
        fine_big = _rows(8000, 5)
        content, headers = _binary(fine_big)
        np.testing.assert_allclose(
            _sums(httpx.post(url, content=content, headers=headers, timeout=60)),
            fine_big.sum(axis=1), rtol=1e-4, atol=1e-3)
        assert server.process.poll() is None
    assert "was stopped after" in server.log()


def test_a_burst_sharing_a_batch_with_a_poisoned_request_is_answered(tmp_path: Path) -> None:
    """Requests read in one loop step run as one batch: when that batch is stopped,
    each request is answered on its own (the poisoned one 504, the others 200)."""
    onnx_path = input_driven_loop(tmp_path / "slow.onnx")
    with serving(tmp_path / "repo", "--infer-timeout", str(TIMEOUT_S), cox=onnx_path) as server:
        url = f"{server.url}/v2/models/cox/infer"
        with httpx.Client(timeout=60) as warm:  # the model is batchable: checked at load
            assert warm.get(f"{server.url}/v2/models/cox/ready").status_code == 200
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            rows = [_rows(2, 20 + i, poison=(i == 5)) for i in range(12)]
            futures = [pool.submit(httpx.post, url, json=_body(x), timeout=60) for x in rows]
            for i, (x, future) in enumerate(zip(rows, futures, strict=True)):
                r = future.result()
                if i == 5:
                    assert r.status_code == 504, r.text
                else:
                    np.testing.assert_allclose(_sums(r), x.sum(axis=1), rtol=1e-5, atol=1e-4)


def _post_bytes(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)) + data


def test_pipelined_requests_behind_a_run_moved_to_the_worker_keep_their_order(
    tmp_path: Path,
) -> None:
    """HTTP/1.1 answers in request order: a request pipelined behind one whose run was
    moved off the event loop waits for it, or a client would take the second
    request's predictions (another patient's) as the first's."""
    onnx_path = input_driven_loop(tmp_path / "slow.onnx")
    with serving(tmp_path / "repo", "--infer-timeout", str(TIMEOUT_S), cox=onnx_path) as server:
        host, port = server.host_port.split(":")
        ordinary = _rows(3, 7)
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(_post_bytes(_body(_rows(2, 2, poison=True)))
                         + _post_bytes(_body(ordinary))
                         + b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            deadline = time.monotonic() + 60
            while data.count(b"HTTP/1.1 ") < 3 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3})", data)
        assert statuses == [b"504", b"200", b"200"], data[:500]
        second = data.split(b"HTTP/1.1 ")[2]
        payload = json.loads(second.split(b"\r\n\r\n", 1)[1])
        np.testing.assert_allclose(payload["outputs"][0]["data"], ordinary.sum(axis=1),
                                   rtol=1e-5, atol=1e-4)
