"""SIGHUP to fedge serve: logged and ignored, never the end of the server.

Left to its default, SIGHUP ended the server at once without a word, and systemd
counts a death by SIGHUP as clean: Restart=on-failure did not start it again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import torch

from fedge.serve.repository import ModelRepository
from tests.serve.conftest import start_server, stop_server


def test_sighup_is_logged_and_the_server_keeps_serving(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    ModelRepository(tmp_path / "repo").install("cox", cox_v1[0])
    server = start_server(tmp_path / "repo")
    try:
        for n in (1, 2):
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and server.log().count("SIGHUP received") < n:
                assert server.process.poll() is None, server.log()
                time.sleep(0.05)
            assert server.log().count("SIGHUP received") == n, server.log()
            assert "reload is not supported" in server.log()
            assert server.process.poll() is None, server.log()
            r = httpx.get(f"{server.url}/v2/models/cox/ready", timeout=5)
            assert r.status_code == 200, r.text
    finally:
        stop_server(server)
    assert server.process.returncode in (0, -signal.SIGTERM), server.log()
