"""Error texts name what was wrong in the client's or operator's terms: the address
that cannot be listened on, a number that is too long (not Python's internal
hint to call sys.set_int_max_str_digits())."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.serve.conftest import N_FEATURES, RunningServer


def test_an_address_in_use_is_named_with_its_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fedge.cli", "serve", "--repository", str(tmp_path),
             "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr


def test_a_number_too_long_is_said_plainly(server: RunningServer) -> None:
    data = ", ".join(["9" * 5000] + ["0.5"] * (N_FEATURES - 1))
    body = ('{"inputs": [{"name": "input", "datatype": "FP32", '
            f'"shape": [1, {N_FEATURES}], "data": [{data}]}}]}}')
    r = httpx.post(f"{server.url}/v2/models/cox/infer", content=body,
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400
    error = r.json()["error"]
    assert "a number too long" in error, error
    assert "set_int_max_str_digits" not in error
