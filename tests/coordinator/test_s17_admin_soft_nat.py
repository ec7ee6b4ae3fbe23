"""A provision file's ``admin_endpoint`` this host cannot listen at (NAT, split DNS)
leaves the admin channel off and the coordinator serving (s17 diff review 2, R1).

8608855 refused such a configuration at load: after an upgrade `fedge coordinator
run` exited 2 and the unit crash-looped, stopping every site's training, and the
shell commands (status, audit) refused too, each after up to NAME_LOOKUP_S of DNS,
though none uses the channel. Now run logs the refusal's text as one ERROR line at
start, binds nothing for the channel and serves the federation; check warns of it
and exits 0; status and audit do not look the address up at all. 203.0.113.7
(TEST-NET-3, RFC 5737) is never an address of this host: binding it fails at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedge.console.store import ConsoleStore
from fedge.coordinator.store import Store
from tests.sdnotify import notify_socket

REPO = Path(__file__).resolve().parents[2]
NAT = "203.0.113.7"
NAME = "fl-coordinator.invalid"  # resolves nowhere (RFC 6761)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(tmp_path: Path, admin_host: str) -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    console = ConsoleStore.init(tmp_path / "console",
                                coordinator_endpoint=f"tcp://127.0.0.1:{port}",
                                admin_endpoint=f"tcp://{admin_host}:{admin_port}")
    (tmp_path / "prov.json").write_text(json.dumps(console.provision()))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n'
                   f'bind = "tcp://127.0.0.1:{port}"\ntick_s = 0.05\n[admin]\n')
    return cfg, port, admin_port


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def off_line(cfg: Path, admin_port: int) -> str:
    return (f"coordinator config {cfg}: [admin] names no endpoint, and this host cannot "
            f"listen at the provision file's admin_endpoint tcp://{NAT}:{admin_port} (what "
            f"the console dials; provision file {cfg.parent / 'prov.json'}): {NAT} is not an "
            f'address of this host. Add under [admin]: endpoint = "tcp://0.0.0.0:{admin_port}" '
            f'(every interface) or endpoint = "tcp://ADDRESS:{admin_port}" with the address '
            "of this host to listen at. The admin channel is off: the console cannot reach "
            "this coordinator until it is fixed")


def test_a_coordinator_whose_admin_endpoint_is_not_here_serves_without_the_channel(
        tmp_path):
    cfg, port, admin_port = setup(tmp_path, NAT)
    with notify_socket() as notify:
        notify.settimeout(0.2)
        lines: list[str] = []
        done = threading.Event()

        def drain() -> None:
            while not done.is_set():
                try:
                    lines.extend(notify.recv(4096).decode().splitlines())
                except TimeoutError:
                    continue

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "coordinator", "run", "--config", str(cfg)],
            cwd=REPO, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "st" / "endpoint").exists():
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
                time.sleep(0.05)
            # the appliances' port is served
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            # the shell's commands work beside it
            status = fedge("status", "--config", str(cfg))
            assert status.returncode == 0, status.stderr
            time.sleep(1)  # the loop turns on; nothing retries the channel
            assert proc.poll() is None
        finally:
            proc.terminate()
            err = proc.communicate(timeout=30)[1]
            done.set()
            reader.join(5)
    assert proc.returncode == 0, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    assert errors[0].endswith(f"ERROR fedge.coordinator: {off_line(cfg, admin_port)}"), err
    assert "admin channel stopped" not in err and "Traceback" not in err, err
    statuses = [x.removeprefix("STATUS=") for x in lines if x.startswith("STATUS=")]
    assert statuses[:1] == [
        f"listening on tcp://127.0.0.1:{port}; admin channel off: the console cannot reach "
        "it (see the log)"], statuses


def test_check_warns_that_the_console_cannot_reach_it_and_exits_0(tmp_path):
    cfg, _, admin_port = setup(tmp_path, NAT)
    done = fedge("check", "--config", str(cfg))
    assert (done.returncode, done.stdout) == (0, f"ok: {cfg}\n"), done.stderr
    assert done.stderr == f"warning: {off_line(cfg, admin_port)}\n"


def test_status_and_audit_do_not_look_the_admin_endpoint_up(tmp_path):
    for host in (NAT, NAME):
        cfg, _, _ = setup(tmp_path / host, host)
        Store(cfg.parent / "st").close()  # as run leaves it
        for command in ("status", "audit"):
            started = time.monotonic()
            done = fedge(command, "--config", str(cfg))
            took = time.monotonic() - started
            assert done.returncode == 0, (host, command, done.stderr)
            assert "admin" not in done.stderr, (host, command, done.stderr)
            assert took < 3, (host, command, took)
