"""A new version appears while 8 clients hammer the server: zero failed requests.

Also: a broken version is skipped (the old one stays live), and retiring the
live version rolls back to the previous one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from tests.serve.conftest import N_FEATURES, RunningServer, serving


@pytest.fixture
def fresh_server(tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]) -> Iterator[RunningServer]:
    root = tmp_path / "repo"
    root.mkdir()
    with serving(root) as s:
        yield s


def _wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached within the timeout")


def _live_version(server: RunningServer) -> str | None:
    r = httpx.get(f"{server.url}/v2/models/cox/ready", timeout=5)
    return r.json()["version"] if r.status_code == 200 else None


def test_server_starts_empty_then_serves_an_installed_model(
    fresh_server: RunningServer, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    r = httpx.get(f"{fresh_server.url}/v2/health/ready", timeout=5)
    assert r.status_code == 400 and r.json() == {"error": "no model is loaded yet"}
    assert httpx.get(f"{fresh_server.url}/v2/models/cox/ready", timeout=5).status_code == 404
    fresh_server.repo.install("cox", cox_v1[0])
    _wait_for(lambda: _live_version(fresh_server) == "1")
    assert httpx.get(f"{fresh_server.url}/v2/health/ready", timeout=5).status_code == 200


def test_hot_swap_under_concurrent_requests_fails_no_request(
    fresh_server: RunningServer,
    cox_v1: tuple[Path, torch.nn.Module],
    cox_v2: tuple[Path, torch.nn.Module],
) -> None:
    fresh_server.repo.install("cox", cox_v1[0])
    _wait_for(lambda: _live_version(fresh_server) == "1")
    x = np.random.default_rng(0).standard_normal((4, N_FEATURES)).astype(np.float32)
    with torch.no_grad():
        expected = {"1": cox_v1[1](torch.from_numpy(x)).numpy(),
                    "2": cox_v2[1](torch.from_numpy(x)).numpy()}
    stop = threading.Event()
    failures: list[str] = []
    seen: list[str] = []
    per_client: list[list[str]] = [[] for _ in range(8)]
    lock = threading.Lock()

    def client_loop(mine: list[str]) -> None:
        client = triton.InferenceServerClient(fresh_server.host_port)
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            while not stop.is_set():
                try:
                    result = client.infer("cox", [inp])
                    version = result.get_response()["model_version"]
                    if not np.allclose(result.as_numpy("output"), expected[version], atol=1e-4):
                        raise AssertionError(f"version {version} gave the wrong answer")
                    mine.append(version)
                    with lock:
                        seen.append(version)
                except Exception as exc:  # every failure counts
                    with lock:
                        failures.append(repr(exc))
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(mine,)) for mine in per_client]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: len(seen) >= 50)
        assert fresh_server.repo.install("cox", cox_v2[0]) == 2
        _wait_for(lambda: seen.count("2") >= 50 and all("2" in v for v in per_client))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert failures == []
    assert seen.index("1") < seen.index("2")
    # each client's requests are sequential: once one was answered by version 2,
    # none of its later requests goes back to version 1
    for versions in per_client:
        assert "2" in versions
        assert "1" not in versions[versions.index("2") :]
    # the previous version stays loaded for rollback and explicit requests
    meta = httpx.get(f"{fresh_server.url}/v2/models/cox", timeout=5).json()
    assert meta["versions"] == ["1", "2"]


def test_a_broken_version_is_skipped_and_the_old_one_stays_live(
    fresh_server: RunningServer,
    cox_v1: tuple[Path, torch.nn.Module],
    cox_v2: tuple[Path, torch.nn.Module],
) -> None:
    fresh_server.repo.install("cox", cox_v1[0])
    _wait_for(lambda: _live_version(fresh_server) == "1")
    # copied in by hand, bypassing install()'s checks (staged, so it appears whole
    # and fails exactly once)
    staging = fresh_server.repo.root / "cox" / ".by-hand"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half a file")
    broken = fresh_server.repo.root / "cox" / "2"
    staging.rename(broken)
    time.sleep(0.5)  # several scans
    assert _live_version(fresh_server) == "1"
    metrics = httpx.get(f"{fresh_server.url}/metrics", timeout=5).text
    assert 'fedge_serve_model_load_failures_total{model="cox"} 1.0' in metrics
    index = triton.InferenceServerClient(fresh_server.host_port).get_model_repository_index()
    assert index[0] == {"name": "cox", "version": "1", "state": "READY"}
    assert index[1]["version"] == "2" and index[1]["state"] == "UNAVAILABLE"
    assert "cox version 2: cannot load" in index[1]["reason"]
    # the copy completes: the same version directory now loads
    (broken / "model.onnx").write_bytes(cox_v2[0].read_bytes())
    _wait_for(lambda: _live_version(fresh_server) == "2")


def test_retiring_the_live_version_rolls_back(
    fresh_server: RunningServer,
    cox_v1: tuple[Path, torch.nn.Module],
    cox_v2: tuple[Path, torch.nn.Module],
) -> None:
    fresh_server.repo.install("cox", cox_v1[0])
    _wait_for(lambda: _live_version(fresh_server) == "1")
    fresh_server.repo.install("cox", cox_v2[0])
    _wait_for(lambda: _live_version(fresh_server) == "2")
    fresh_server.repo.retire("cox", 2)
    _wait_for(lambda: _live_version(fresh_server) == "1")
    r = httpx.get(f"{fresh_server.url}/v2/models/cox/versions/2/ready", timeout=5)
    assert r.status_code == 404
    # the fixed model pushed after the rollback is a new version, and it is served
    assert fresh_server.repo.install("cox", cox_v1[0]) == 3
    _wait_for(lambda: _live_version(fresh_server) == "3")
