"""Under Debian's default /etc/hosts (``localhost`` is 127.0.0.1 and ::1) an agent
and the console dialling ``tcp://localhost:P`` reach a coordinator bound as packaged,
``tcp://0.0.0.0:P`` (s17 diff review H2, after 64749ed).

64749ed turned ZMQ_IPV6 on for every socket; libzmq then resolved ``localhost`` for
IPv6 and dialled ::1 alone, where nothing listened: the agent never connected and said
nothing. A listening socket on a name (the admin channel's loopback default,
``tcp://localhost:A``) took ::1 alone too, so an IPv4 client missed it.

The hosts file is Debian's, bind-mounted over /etc/hosts in a private mount namespace
(``unshare -rm``), so this host's own is not touched; skipped where namespaces are not
permitted. Inside it: fedge's transport, and a real ``fedge coordinator run`` with the
console and an enrolled appliance. Real processes, CurveZMQ and SQLite on loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)

DEBIAN_HOSTS = """127.0.0.1\tlocalhost
127.0.1.1\tcoordhost

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
"""


def in_namespace(hosts: Path, *argv: str) -> list[str]:
    """``argv`` run with ``hosts`` bind-mounted over /etc/hosts in a private mount (and
    user) namespace."""
    return ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(hosts), *argv]


def namespaces_permitted(hosts: Path) -> str | None:
    """Why ``in_namespace`` cannot run here, or None."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    try:
        done = subprocess.run(in_namespace(hosts, "true"), capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -rm: {exc}"
    return None if done.returncode == 0 else f"unshare -rm: {done.stderr.strip()}"


def start(tmp: Path, console: Any, bind: str) -> tuple[subprocess.Popen[str], str]:
    """`fedge coordinator run` at ``bind``, ``[admin]`` naming no endpoint; the
    process and the endpoint it bound."""
    (tmp / "prov.json").write_text(json.dumps(console.provision()))
    cfg = tmp / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\nbind = "{bind}"\n'
                   'tick_s = 0.05\n[admin]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    endpoint_file = tmp / "st" / "endpoint"
    deadline = time.monotonic() + 60
    while not endpoint_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the coordinator exited {proc.returncode}: "
                                 f"{proc.communicate()[1]}")
        assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
        time.sleep(0.05)
    return proc, endpoint_file.read_text().strip()


def scenario(tmp: Path) -> dict[str, object]:
    """What runs inside the namespace: each case's outcome, by name."""
    import dataclasses
    import socket

    from fedge.console.client import AdminClient
    from fedge.console.enrolment import create_enrolment
    from fedge.console.store import ConsoleStore
    from fedge.transport import CurveKeyPair
    from tests.coordinator.test_s17_net_ipv6_coordinator import connects, free_port, stop
    from tests.transport.test_s17_net_ipv6_sockets import exchange

    found: dict[str, object] = {"localhost": sorted(
        {str(a[4][0]) for a in socket.getaddrinfo("localhost", 1, type=socket.SOCK_STREAM)})}

    def outcome(coro: object) -> object:
        try:
            return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]
        except Exception as exc:  # the old code: no connection within 10 s
            return f"{type(exc).__name__}: {exc}"

    async def peers(bind: str, host: str) -> list[str]:
        return (await exchange(bind, [host]))[1]

    # the addresses the server saw the message come from, or why none came
    found["agent dials localhost, bound 0.0.0.0"] = outcome(peers("tcp://0.0.0.0:0",
                                                                  "localhost"))
    found["agent dials 127.0.0.1, bound localhost"] = outcome(peers("tcp://localhost:0",
                                                                    "127.0.0.1"))

    port, admin_port = free_port(), free_port()
    console = ConsoleStore.init(tmp / "console", coordinator_endpoint=f"tcp://localhost:{port}",
                                admin_endpoint=f"tcp://localhost:{admin_port}")
    # as packaged: bind 0.0.0.0; [admin] without an endpoint binds tcp://localhost:A
    proc, bound = start(tmp, console, f"tcp://0.0.0.0:{port}")
    try:
        found["bound"] = bound
        client = AdminClient.from_store(console, "admin", timeout_s=10)
        for endpoint in (client.endpoint, f"tcp://127.0.0.1:{admin_port}"):
            try:
                who, _ = dataclasses.replace(client, endpoint=endpoint).call("whoami")
                found[f"console dials {endpoint}"] = who["name"]
            except Exception as exc:
                found[f"console dials {endpoint}"] = f"{type(exc).__name__}: {exc}"
        _, e = create_enrolment(console, "hospital-a", valid_for=timedelta(days=1))
        client.call("enrol", *console.enrol_request("hospital-a"))
        found["agent dials localhost"] = outcome(connects(
            CurveKeyPair(e.curve_public, e.curve_secret), console.coordinator_public_key,
            f"tcp://localhost:{port}"))
    finally:
        found["stderr"] = stop(proc)
    return found


def test_a_name_with_ipv6_and_ipv4_addresses_reaches_an_ipv4_coordinator(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(DEBIAN_HOSTS)
    why = namespaces_permitted(hosts)
    if why is not None:
        pytest.skip(f"no private mount namespace here ({why})")
    code = ("import json, sys; from pathlib import Path; "
            "from tests.coordinator.test_s17_v6_dual_stack_localhost import scenario; "
            "print(json.dumps(scenario(Path(sys.argv[1]))))")
    done = subprocess.run(in_namespace(hosts, sys.executable, "-c", code, str(tmp_path)),
                          cwd=REPO, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["localhost"] == ["127.0.0.1", "::1"], found  # the hosts file took
    assert found["bound"].startswith("tcp://0.0.0.0:"), found
    assert found["agent dials localhost, bound 0.0.0.0"] == ["127.0.0.1"], found
    assert found["agent dials 127.0.0.1, bound localhost"] == ["127.0.0.1"], found
    assert found["agent dials localhost"] is True, found
    consoles = {k: v for k, v in found.items() if k.startswith("console dials")}
    assert set(consoles.values()) == {"admin"}, consoles
    assert "admin channel stopped" not in found["stderr"], found["stderr"]
