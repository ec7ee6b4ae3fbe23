"""A request whose declared body is over --max-body-bytes gets its 413 before the
body, with `connection: close`, and the connection is closed soon after: the
server does not read (and drop) an upload it has refused until the request
timeout."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.serve.conftest import RunningServer, serving


@pytest.fixture(scope="module")
def small_limit_server(
    tmp_path_factory: pytest.TempPathFactory, cox_v1: tuple[Path, torch.nn.Module]
) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("repo")
    with serving(root, "--max-body-bytes", "100000", cox=cox_v1[0]) as s:
        yield s


def _connect(server: RunningServer) -> socket.socket:
    host, port = server.host_port.split(":")
    return socket.create_connection((host, int(port)), timeout=10)


@pytest.mark.parametrize("declared", [100001, 10**15])
def test_a_declared_oversized_body_gets_413_with_connection_close_and_is_not_drained(
    small_limit_server: RunningServer, declared: int
) -> None:
    with _connect(small_limit_server) as sock:
        sock.sendall(b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(declared).encode() + b"\r\n\r\n")
        sock.settimeout(0.2)
        response = b""
        closed_after = None
        start = time.monotonic()
        sent = 0
        # keep uploading, as a client that does not read until it has sent all does
        while time.monotonic() - start < 20:
            try:
                sent += sock.send(b"x" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - start
                break
            except TimeoutError:
                pass
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                closed_after = time.monotonic() - start
                break
            if not chunk:
                closed_after = time.monotonic() - start
                break
            response += chunk
    head = response.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 413"), response
    assert b"connection: close" in head, response
    assert b"exceeds the limit of 100000 bytes" in response
    # closed within the linger time (2 s), not at the request timeout (60 s)
    assert closed_after is not None and closed_after < 15, (closed_after, sent)
