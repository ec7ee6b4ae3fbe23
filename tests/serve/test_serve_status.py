"""`fedge serve`'s STATUS= as `systemctl status` shows it: the models and versions it
serves now and how many failed to load, updated as the repository changes, and sent
only when it changed (a real server, systemd's side a bound NOTIFY_SOCKET)."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import torch

from fedge.serve.repository import ModelRepository
from tests.sdnotify import notify_socket
from tests.serve.conftest import start_server, stop_server


def test_status_follows_the_repository_and_never_repeats_itself(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module], cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    root = tmp_path / "repo"
    repo = ModelRepository(root)
    repo.install("cox", cox_v1[0])
    with notify_socket() as notify:
        notify.settimeout(0.2)
        lines: list[str] = []
        done = threading.Event()

        def drain() -> None:  # as systemd does: every datagram at once
            while not done.is_set():
                try:
                    lines.extend(notify.recv(4096).decode().splitlines())
                except TimeoutError:
                    continue

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()

        def statuses() -> list[str]:
            return [x.removeprefix("STATUS=") for x in list(lines) if x.startswith("STATUS=")]

        def wait_status(prefix: str, tail: str) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                last = statuses()[-1:]
                if last and last[0].startswith(prefix) and last[0].endswith(tail):
                    return
                time.sleep(0.05)
            raise AssertionError(f"no STATUS={prefix}...{tail}: {statuses()}")

        server = start_server(root, env={"NOTIFY_SOCKET": notify.getsockname(),
                                         "WATCHDOG_USEC": "2000000"})
        try:
            wait_status("serving 1 model(s), 1 version(s)", "; 0 version(s) failed to load")
            repo.install("cox", cox_v2[0])  # version 2: both stay loaded
            wait_status("serving 1 model(s), 2 version(s)", "; 0 version(s) failed to load")
            repo.install("risk", cox_v1[0])  # a second model
            wait_status("serving 2 model(s), 3 version(s)", "; 0 version(s) failed to load")
            # a version copied in by hand that does not load (staged: it appears whole)
            staging = root / "cox" / ".by-hand"
            staging.mkdir()
            (staging / "model.onnx").write_bytes(b"half a file")
            staging.rename(root / "cox" / "3")
            wait_status("serving 2 model(s), 3 version(s)", "; 1 version(s) failed to load")
            time.sleep(2.5)  # more refreshes with nothing new: nothing more is said
        finally:
            stop_server(server)
            done.set()
            reader.join(5)
    seen = statuses()
    assert seen[0].startswith("serving 1 model(s), 1 version(s) from ")
    assert any("READY=1" in x for x in lines)
    repeated = [a for a, b in itertools.pairwise(seen) if a == b]
    assert not repeated, seen
    assert len(seen) <= 6, seen  # ready, three changes, the failure, shutting down
