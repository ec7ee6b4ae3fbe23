"""Request bodies held at once are bounded across connections
(--max-buffered-body-bytes): a request whose body does not fit now gets a 503 with
Retry-After and `connection: close` before any of its body is read, and the
budget comes back as requests are answered or their connections close.

Without it, each of up to 1000 connections could hold a --max-body-bytes body
(30 connections sending 60 MB each held 1.8 GB).
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.serve.conftest import N_FEATURES, RunningServer, serving

MAX_BODY = 1_500_000
BUDGET = 3_000_000
DIRECT = 1_000_000  # under 1 MiB: read by the direct lane
ASGI = 1_400_000  # over it: read by the ASGI lane


@pytest.fixture(scope="module")
def budget_server(
    tmp_path_factory: pytest.TempPathFactory, cox_v1: tuple[Path, torch.nn.Module]
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("repo")
    with serving(root, "--max-body-bytes", str(MAX_BODY), "--max-buffered-body-bytes",
                 str(BUDGET), "--inline-budget-ms", "1000", cox=cox_v1[0]) as s:
        yield s


def _body(size: int) -> bytes:
    """A valid inference request of exactly `size` bytes (JSON padded with spaces)."""
    doc = json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                  "shape": [1, N_FEATURES], "data": [0.5] * N_FEATURES}]})
    return doc.encode() + b" " * (size - len(doc))


def _begin(server: RunningServer, body: bytes, sent: int) -> socket.socket:
    """A connection with a request's head and the first `sent` bytes of its body."""
    host, port = server.host_port.split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body[:sent])
    return sock


def _response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head.lower())
    while length and len(rest) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head.lower() + b"\r\n\r\n" + rest


def _held(server: RunningServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(r"^fedge_serve_buffered_body_bytes (\S+)$", metrics, re.M)
    assert match, metrics
    return float(match.group(1))


def _wait_held(server: RunningServer, want: float) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _held(server) != want:
        time.sleep(0.05)
    assert _held(server) == want


def test_a_body_that_does_not_fit_the_budget_gets_503_before_it_is_read(
    budget_server: RunningServer,
) -> None:
    direct_body, asgi_body = _body(DIRECT), _body(ASGI)
    held_direct = _begin(budget_server, direct_body, 1000)
    held_asgi = _begin(budget_server, asgi_body, 1000)
    try:
        _wait_held(budget_server, DIRECT + ASGI)
        # 1.0 + 1.4 MB held, a third body of 1.0 MB does not fit in 3.0 MB
        refused = _begin(budget_server, direct_body, 0)
        with refused:
            answer = _response(refused)
            assert answer.startswith(b"http/1.1 503"), answer
            assert b"retry-after: 1\r\n" in answer and b"connection: close" in answer
            assert b"request bodies" in answer
            refused.settimeout(10)
            assert refused.recv(65536) == b""  # closed after it (within the linger)
        # the held requests, once complete, are answered as usual
        held_asgi.sendall(asgi_body[1000:])
        assert _response(held_asgi).startswith(b"http/1.1 200")
        _wait_held(budget_server, DIRECT)
        # and their room is free again
        again = _begin(budget_server, direct_body, len(direct_body))
        with again:
            assert _response(again).startswith(b"http/1.1 200")
        # a connection closed half-sent gives its room back too
        held_direct.close()
        _wait_held(budget_server, 0)
    finally:
        held_direct.close()
        held_asgi.close()
    metrics = httpx.get(f"{budget_server.url}/metrics", timeout=5).text
    assert 'fedge_serve_connections_closed_total{reason="busy"} 1.0' in metrics


def test_a_chunked_body_that_outgrows_the_budget_gets_503(
    budget_server: RunningServer,
) -> None:
    held = [_begin(budget_server, _body(ASGI), 1000) for _ in range(2)]
    try:
        _wait_held(budget_server, 2 * ASGI)
        host, port = budget_server.host_port.split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b" " * 100_000
            answer = b""
            sock.settimeout(0.2)
            for _ in range(14):  # 1.4 MB at most: within the body limit, not the 0.2 MB left
                try:
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    continue
                if answer:
                    break
            sock.settimeout(10)
            if answer and b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.lower().startswith(b"http/1.1 503"), answer
            assert b"retry-after: 1" in answer.lower()
        _wait_held(budget_server, 2 * ASGI)
    finally:
        for sock in held:
            sock.close()
    _wait_held(budget_server, 0)


def test_a_budget_below_the_body_limit_is_refused_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path),
         "--port", "0", "--max-body-bytes", "2000", "--max-buffered-body-bytes", "1000"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "max_buffered_body_bytes 1000 must be at least max_body_bytes 2000" in proc.stderr
