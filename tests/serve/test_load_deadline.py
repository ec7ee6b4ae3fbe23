"""A new version's check has a deadline: a model whose inference never ends is not
served, and neither holds up later versions nor keeps a restarted server from
listening, serving the older version and stopping on SIGTERM.

The model is valid ONNX (it passes `onnx.checker`, so `install` takes it): a
`Loop` of 10^12 trips, which onnxruntime would run for days.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import onnx
import torch
from onnx import TensorProto, helper

from fedge.serve.repository import ModelRepository
from fedge.serve.runtime import ModelStore
from tests.serve.conftest import N_FEATURES, RunningServer, start_server, stop_server


def never_ending_model() -> bytes:
    """Same signature as the Cox models (input [N, 39] -> output [N, 1])."""
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
        [helper.make_node("Loop", ["trips", "cond", "v0"], ["v_final"], body=body),
         helper.make_node("ReduceSum", ["input", "axis"], ["s"], keepdims=1),
         helper.make_node("Add", ["s", "v_final"], ["output"])],
        "never_ends",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [10**12]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
         helper.make_tensor("v0", TensorProto.FLOAT, [1], [0.0]),
         helper.make_tensor("axis", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


def _live_version(server: RunningServer) -> str | None:
    r = httpx.get(f"{server.url}/v2/models/cox/ready", timeout=5)
    return r.json()["version"] if r.status_code == 200 else None


def _index(server: RunningServer) -> dict[str, dict[str, str]]:
    r = httpx.post(f"{server.url}/v2/repository/index", timeout=5)
    return {e["version"]: e for e in r.json()}


def _checks_running(repo: Path) -> list[int]:
    """Pids of check processes for models in `repo` (the repository path is in
    their command line)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"_child_check" in cmdline and str(repo).encode() in cmdline:
            found.append(int(pid))
    return found


def test_the_store_fails_a_version_whose_check_misses_its_deadline(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    repo = ModelRepository(tmp_path)
    repo.install("cox", cox_v1[0])
    repo.install("cox", never_ending_model())
    store = ModelStore(threads=1, load_timeout_s=2)
    start = time.monotonic()
    assert store.sync(repo) == [("cox", 1)]  # the older version is served instead
    assert time.monotonic() - start < 60  # child start-up included, on a busy host
    assert "cox version 2: its check" in store.failures[("cox", 2)]
    assert "did not end within 2 s" in store.failures[("cox", 2)]
    # the same file is not checked again: the next scan is quick
    start = time.monotonic()
    assert store.sync(repo) == []
    assert time.monotonic() - start < 2
    assert _checks_running(tmp_path) == []


def test_a_never_ending_version_does_not_hold_up_the_next_one(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module], cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    root = tmp_path / "repo"
    ModelRepository(root).install("cox", cox_v1[0])
    server = start_server(root, "--load-timeout", "2")
    try:
        _wait_for(lambda: _live_version(server) == "1", 60, "version 1 served")
        assert server.repo.install("cox", never_ending_model()) == 2
        assert server.repo.install("cox", cox_v2[0]) == 3
        _wait_for(lambda: _live_version(server) == "3", 90, "version 3 served")
        index = _index(server)
        assert index["2"]["state"] == "UNAVAILABLE"
        assert "did not end within 2 s" in index["2"]["reason"]
        assert index["3"]["state"] == "READY"
        # the server kept answering meanwhile, and says once why version 2 is not served
        assert server.log().count("not serving cox version 2") == 1
        # a rollback still works: the watcher is not stuck
        server.repo.retire("cox", 3)
        _wait_for(lambda: _live_version(server) == "1", 30, "rolled back to version 1")
    finally:
        stop_server(server)
    assert _checks_running(root) == []


def test_a_restart_with_a_never_ending_version_listens_and_serves_the_one_before(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    root = tmp_path / "repo"
    repo = ModelRepository(root)
    repo.install("cox", cox_v1[0])
    repo.install("cox", never_ending_model())
    # it used to check version 2 on the event loop before listening, for good
    server = start_server(root, "--load-timeout", "2")
    try:
        _wait_for(lambda: _live_version(server) == "1", 90, "version 1 served")
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        assert "did not end within 2 s" in _index(server)["2"]["reason"]
    finally:
        stop_server(server)
    assert server.process.returncode in (0, -signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sigterm_during_a_check_stops_the_server_and_its_check(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    ModelRepository(root).install("cox", never_ending_model())
    port = _free_port()
    # the check will not end by itself; the URL is announced only once the
    # repository is loaded, so this test finds the server by its port
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(root),
         "--host", "127.0.0.1", "--port", str(port), "--load-timeout", "600"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def live() -> bool:
            try:
                return httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        # listening and live while version 1 is checked (it used to be checked first,
        # on the event loop, with the socket not yet listening)
        _wait_for(live, 60, "the server live")
        _wait_for(lambda: _checks_running(root) != [], 30, "the check running")
        r = httpx.get(f"{url}/v2/health/ready", timeout=5)
        assert r.status_code == 400 and r.json() == {"error": "no model is loaded yet"}
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)  # it used to ignore SIGTERM for good
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode in (0, -signal.SIGTERM)
    _wait_for(lambda: _checks_running(root) == [], 10, "the check process gone")
