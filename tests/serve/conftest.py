"""Fixtures for the serving tests: small exported models and a real `fedge serve` process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from fedge.serve.export import export_onnx
from fedge.serve.repository import ModelRepository

N_FEATURES = 39  # Fed-TCGA-BRCA's clinical features


class ShiftedCox(torch.nn.Module):
    """A linear risk score plus a known offset, so tests can tell versions apart."""

    def __init__(self, seed: int, offset: float):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(N_FEATURES, 1)
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


def export_cox(path: Path, *, seed: int = 0, offset: float = 0.0) -> tuple[Path, torch.nn.Module]:
    model = ShiftedCox(seed, offset).eval()
    export_onnx(model, torch.randn(4, N_FEATURES), {"job_id": f"job-{seed}"}, path,
                preprocessing={"kind": "none"})
    return path, model


@pytest.fixture(scope="session")
def cox_v1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return export_cox(tmp_path_factory.mktemp("onnx") / "cox1.onnx", seed=1, offset=0.0)


@pytest.fixture(scope="session")
def cox_v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return export_cox(tmp_path_factory.mktemp("onnx") / "cox2.onnx", seed=2, offset=100.0)


@dataclass
class RunningServer:
    url: str
    host_port: str
    repo: ModelRepository
    process: subprocess.Popen[str]
    # every line it has written (stdout and stderr), read as it comes: a server
    # that logs into a pipe nobody reads stops once the pipe is full
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.output)


_ANNOUNCE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def start_server(
    repo_root: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> RunningServer:
    """`fedge serve` on a free loopback port; waits (bounded) until it is live."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(repo_root),
         "--host", "127.0.0.1", "--port", "0", "--poll-interval", "0.1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, preexec_fn=preexec_fn,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    port = None
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = _ANNOUNCE.search(line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        proc.kill()
        raise AssertionError(f"fedge serve did not announce its port: {''.join(lines)}")
    url = f"http://127.0.0.1:{port}"
    running = RunningServer(url, f"127.0.0.1:{port}", ModelRepository(repo_root), proc, lines)
    running.reader = threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True)
    running.reader.start()
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v2/health/live", timeout=1).status_code == 200:
                return running
        except httpx.TransportError:
            pass
        assert proc.poll() is None, "fedge serve exited during start-up"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("fedge serve did not become live within 60 s")


def _drain(stream: Iterable[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def stop_server(server: RunningServer) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=5)
    if server.reader is not None:
        server.reader.join(timeout=10)  # the pipe ends with the process
    if server.process.stdout:
        server.process.stdout.close()


@contextmanager
def serving(root: Path, *extra: str, cox: Path | None = None) -> Iterator[RunningServer]:
    """`fedge serve` over the repository at ``root`` (with ``cox`` installed as "cox"
    when given) for the duration of the block."""
    if cox is not None:
        ModelRepository(root).install("cox", cox)
    running = start_server(root, *extra)
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, cox_v1: tuple[Path, torch.nn.Module]
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("repo")
    with serving(root, "--max-body-bytes", "1000000", cox=cox_v1[0]) as s:
        yield s
