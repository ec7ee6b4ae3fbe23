"""A coordinator on IPv6 (s17 endpoints H1): `fedge coordinator run` with
``bind = "tcp://*:P"`` and ``[admin] endpoint = "tcp://*:A"`` takes the console and an
appliance over ::1 and over 127.0.0.1; with ``bind = "tcp://[::1]:0"`` it starts.

It refused ``tcp://[::1]:P`` ("cannot bind ...: No such device", exit 1), a wildcard
bind listened on IPv4 alone, and the console and the agents never reached an IPv6
address: no fedge socket set ZMQ_IPV6. Real processes, CurveZMQ and SQLite on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.console.client import AdminClient
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from fedge.transport import ClientSocket, CurveKeyPair, HeartbeatConfig
from tests.transport.test_s17_net_ipv6_sockets import needs_ipv6

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path: Path, console: ConsoleStore, bind: str, admin: str
          ) -> tuple[subprocess.Popen[str], str]:
    (tmp_path / "prov.json").write_text(json.dumps(console.provision()))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\nbind = "{bind}"\n'
                   f'tick_s = 0.05\n[admin]\nendpoint = "{admin}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    endpoint_file = tmp_path / "st" / "endpoint"
    deadline = time.monotonic() + 60
    while not endpoint_file.exists():
        if proc.poll() is not None:
            pytest.fail(f"the coordinator exited {proc.returncode}: {proc.communicate()[1]}")
        assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
        time.sleep(0.05)
    return proc, endpoint_file.read_text().strip()


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    return proc.communicate(timeout=30)[1]


async def connects(keys: CurveKeyPair, server_key: str, endpoint: str) -> bool:
    client = ClientSocket(keys, server_key, endpoint, heartbeat=HeartbeatConfig(0.5, 5.0))
    client.start()
    try:
        await client.wait_connected(15)
        return True
    finally:
        await client.close()


@needs_ipv6
def test_a_wildcard_coordinator_takes_console_and_agent_over_ipv6_and_ipv4(tmp_path):
    port, admin_port = free_port(), free_port()
    console = ConsoleStore.init(tmp_path / "console",
                                coordinator_endpoint=f"tcp://[::1]:{port}",
                                admin_endpoint=f"tcp://[::1]:{admin_port}")
    proc, bound = start(tmp_path, console, f"tcp://*:{port}", f"tcp://*:{admin_port}")
    try:
        assert bound == f"tcp://[::]:{port}"
        over_ipv6 = AdminClient.from_store(console, "admin", timeout_s=15)
        over_ipv4 = dataclasses.replace(over_ipv6, endpoint=f"tcp://127.0.0.1:{admin_port}")
        for client in (over_ipv6, over_ipv4):
            who, _ = client.call("whoami")
            assert who == {"name": "admin", "role": "admin"}, client.endpoint
        _, e = create_enrolment(console, "hospital-a", valid_for=timedelta(days=1))
        over_ipv6.call("enrol", *console.enrol_request("hospital-a"))
        keys = CurveKeyPair(e.curve_public, e.curve_secret)
        server_key = console.coordinator_public_key
        for host in ("[::1]", "127.0.0.1"):
            assert asyncio.run(connects(keys, server_key, f"tcp://{host}:{port}")), host
    finally:
        err = stop(proc)
    assert "admin channel stopped" not in err, err


@needs_ipv6
def test_a_coordinator_bound_to_the_ipv6_loopback_starts(tmp_path):
    admin_port = free_port()
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://[::1]:7700",
                                admin_endpoint=f"tcp://[::1]:{admin_port}")
    proc, bound = start(tmp_path, console, "tcp://[::1]:0", f"tcp://[::1]:{admin_port}")
    try:
        assert bound.startswith("tcp://[::1]:"), bound
        client = AdminClient.from_store(console, "admin", timeout_s=15)
        assert client.call("whoami")[0]["name"] == "admin"
    finally:
        err = stop(proc)
    assert "cannot bind" not in err and "admin channel stopped" not in err, err
