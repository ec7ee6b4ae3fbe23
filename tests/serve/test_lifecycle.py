"""Process lifecycle, and the pieces behind the request path tested in-process."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from fedge.serve.repository import ModelRepository
from fedge.serve.runtime import ModelLoadError, ModelStore, load_model
from fedge.serve.server import InferenceServer
from tests.serve.conftest import N_FEATURES, start_server, stop_server


def test_systemd_gets_ready_watchdog_and_stopping(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    ModelRepository(tmp_path / "repo").install("cox", cox_v1[0])
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.2)
        server = start_server(tmp_path / "repo",
                              env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
        received: list[str] = []
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (
                any("READY=1" in m for m in received)
                and sum("WATCHDOG=1" in m for m in received) >= 2
            ):
                with contextlib.suppress(TimeoutError):
                    received.append(sock.recv(4096).decode())
        finally:
            stop_server(server)
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    ready = next(m for m in received if "READY=1" in m)
    assert "STATUS=serving 1 model(s)" in ready
    assert sum("WATCHDOG=1" in m for m in received) >= 2
    assert any("STOPPING=1" in m for m in received)
    # uvicorn shuts down gracefully, then re-raises SIGTERM: systemd counts that as clean
    assert server.process.returncode in (0, -signal.SIGTERM)


def test_the_log_says_which_version_is_served_and_why_one_is_not(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    import re

    root = tmp_path / "repo"
    ModelRepository(root).install("cox", cox_v1[0])
    server = start_server(root)
    try:
        # a version copied in by hand that does not load (staged: it appears whole)
        staging = root / "cox" / ".by-hand"
        staging.mkdir()
        (staging / "model.onnx").write_bytes(b"half a file")
        staging.rename(root / "cox" / "2")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "not serving" not in server.log():
            time.sleep(0.05)
    finally:
        stop_server(server)
    # journald under systemd; here, one timestamped line per record on stderr
    pid = server.process.pid
    log = server.log()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"  # UTC, fedge.systemd
    assert re.search(rf"^{stamp} fedge-serve\[{pid}\] INFO fedge.serve: serving cox version 1$",
                     log, re.M), log
    assert re.search(rf"^{stamp} fedge-serve\[{pid}\] WARNING fedge.serve: not serving cox "
                     r"version 2: cannot load", log, re.M), log


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path),
             "--port", str(port)], capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 1
    assert "fedge serve:" in proc.stderr and "in use" in proc.stderr


def test_tiny_models_get_one_intra_op_thread(cox_v1: tuple[Path, torch.nn.Module]) -> None:
    model = load_model("cox", 1, cox_v1[0], threads=2)
    assert model.threads == 1
    assert model.metadata["job_id"] == "job-1"


def test_a_non_onnx_file_is_a_load_error_naming_the_version(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelLoadError, match="cox version 4: cannot load"):
        load_model("cox", 4, bad, threads=1)


def test_store_keeps_the_two_newest_versions(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    store = ModelStore(threads=1)
    for expected in (1, 2, 3):
        repo.install("cox", cox_v1[0])
        assert store.sync(repo) == [("cox", expected)]
    assert store.versions("cox") == [2, 3]
    assert store.get("cox").version == 3
    assert store.sync(repo) == []  # nothing new, nothing swapped


def test_a_version_whose_file_is_replaced_is_loaded_again(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module], cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    store = ModelStore(threads=1)
    repo.install("cox", cox_v1[0])
    repo.install("cox", cox_v1[0])
    assert store.sync(repo) == [("cox", 2)]
    x = np.ones((1, N_FEATURES), dtype=np.float32)

    def served(version: str | None = None) -> np.ndarray:
        return store.get("cox", version).run({"input": x}, ["output"])[0]

    with torch.no_grad():
        want_v1 = cox_v1[1](torch.from_numpy(x)).numpy()
        want_v2 = cox_v2[1](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served(), want_v1, atol=1e-5)
    # version 2's file replaced by hand (a new inode): the old session was served on
    staged = repo.path("cox", 2).with_name("model.onnx.new")
    staged.write_bytes(cox_v2[0].read_bytes())
    staged.replace(repo.path("cox", 2))
    assert store.sync(repo) == [("cox", 2)]
    np.testing.assert_allclose(served(), want_v2, atol=1e-4)
    # rewritten in place (same inode, a new mtime): loaded again as well
    repo.path("cox", 1).write_bytes(cox_v2[0].read_bytes())
    assert store.sync(repo) == []  # the live version did not change
    np.testing.assert_allclose(served("1"), want_v2, atol=1e-4)


def test_starlette_infer_route_works_without_the_fast_path(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    ModelRepository(tmp_path).install("cox", cox_v1[0])
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)
    x = np.ones((2, N_FEATURES), dtype=np.float32)
    body = {"inputs": [{"name": "input", "shape": [2, N_FEATURES], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=server.app)  # Starlette alone
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.post("/v2/models/cox/infer", json=body),
                    await client.post("/v2/models/cox/infer", content=b"{"))

    r, bad = asyncio.run(calls())
    with torch.no_grad():
        want = cox_v1[1](torch.from_numpy(x)).numpy().ravel()
    np.testing.assert_allclose(r.json()["outputs"][0]["data"], want, atol=1e-5)
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]


def _reshape_to_one_row_model() -> bytes:
    """Claims any batch size, but reshapes to one row: fails for batch > 1."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "one_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_a_model_failing_on_a_valid_request_is_a_500_with_the_error_json(
    tmp_path: Path,
) -> None:
    ModelRepository(tmp_path).install("fragile", _reshape_to_one_row_model())
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)

    def body(rows: int) -> dict:
        return {"inputs": [{"name": "x", "shape": [rows, 3], "datatype": "FP32",
                            "data": [0.5] * (3 * rows)}]}

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=server)  # the fast path in front of Starlette
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.post("/v2/models/fragile/infer", json=body(1)),
                    await client.post("/v2/models/fragile/infer", json=body(2)))

    ok, failed = asyncio.run(calls())
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [0.5] * 3
    assert failed.status_code == 500
    assert "inference failed in model 'fragile' version 1" in failed.json()["error"]


def _scalar_model() -> bytes:
    """y = 2 * x for a rank-0 x: an input without a batch axis."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        initializer=[numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_a_rank_0_input_is_served_on_the_asgi_lane(tmp_path: Path) -> None:
    ModelRepository(tmp_path).install("scalar", _scalar_model())
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)
    body = {"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1.5]}]}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=server)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v2/models/scalar/infer", json=body)

    r = asyncio.run(call())  # the batch size was read from a shape that has no axis 0
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [], "data": [3.0]}


def test_an_unexpected_error_on_the_asgi_lane_is_a_500_with_the_error_json(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    ModelRepository(tmp_path).install("cox", cox_v1[0])
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)

    async def broken_stream() -> AsyncIterator[bytes]:
        yield b'{"inputs": ['
        raise RuntimeError("the request stream broke")  # ASGI receive() raises this

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=server)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v2/models/cox/infer", content=broken_stream())

    r = asyncio.run(call())  # uvicorn answered this with a plain-text traceback
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "internal error: the request stream broke"}


def test_a_repository_that_is_a_file_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    not_a_dir = tmp_path / "models"
    not_a_dir.write_text("oops")
    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(not_a_dir),
         "--port", "0"], capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert f"--repository {not_a_dir} exists but is not a directory" in proc.stderr


def test_free_image_axes_are_checked_at_a_usable_size(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    kernel = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "k"], ["y"], kernel_shape=[3, 3])],  # no padding
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, "h2", "w2"])],
        initializer=[kernel],
    )
    path = tmp_path / "conv.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    model = load_model("conv", 1, path, threads=1)  # a 1x1 image would fail the 3x3 kernel
    assert model.inputs[0].shape == (-1, 1, -1, -1)
