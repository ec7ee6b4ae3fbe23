"""``[admin]`` without its own endpoint listens at the provision file's
``admin_endpoint`` as written when this host can, and is left off otherwise, saying why
and naming the line to add (s17 endpoints M2; s17 diff review M3, after a976330; s17
diff review 2 R1: refusing it stopped the whole coordinator after an upgrade).

The provision file's ``admin_endpoint`` is what the console dials: on the coordinator
its name may not resolve, or be no address of it (split DNS, NAT); the channel then
failed to bind and restarted every 20 s while `fedge coordinator check` said ok.
a976330 listened at bind's host instead (0.0.0.0 by default), which moved a channel
written for one address (``tcp://10.0.5.2:7801``) to every interface, unasked. Now an
address of this host, or a name resolving here to one, is bound as written (loopback
too: the console on this host); anything else leaves the channel off (``admin_off``),
which `fedge coordinator check` warns of, with ``endpoint = "tcp://0.0.0.0:PORT"``
(every interface) or the address to listen at. A name other than loopback's resolving to a loopback
address (Debian's 127.0.1.1) is warned of: only this host reaches it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore
from fedge.coordinator.config import load_config
from tests.coordinator.test_s17_coord_config_bom import provision
from tests.coordinator.test_s17_v6_dual_stack_localhost import in_namespace, namespaces_permitted
from tests.transport.test_s17_net_ipv6_sockets import needs_ipv6

REPO = Path(__file__).resolve().parents[2]
NAME = "fl-coordinator.invalid"  # resolves nowhere (RFC 6761)


def local_ipv4() -> str | None:
    """An IPv4 address of this host other than loopback, if it has one."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:  # SIOCGIFADDR
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        address = socket.inet_ntoa(raw[20:24])
        if not address.startswith("127."):
            return address
    return None


LOCAL = local_ipv4()
needs_local = pytest.mark.skipif(LOCAL is None, reason="this host has no IPv4 address but "
                                 "loopback")


def config(tmp_path: Path, admin_endpoint: str, text: str) -> Path:
    prov = provision(tmp_path)
    prov.write_text(json.dumps(json.loads(prov.read_text())
                               | {"admin_endpoint": admin_endpoint}))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('state_dir = "st"\nprovision = "prov.json"\n' + text)
    return cfg


@pytest.mark.parametrize(("told", "bind"), [
    pytest.param(f"tcp://{LOCAL}:7701", "", marks=needs_local),  # 0.0.0.0, bind's default
    pytest.param(f"tcp://{LOCAL}:7701", 'bind = "tcp://*:7700"\n', marks=needs_local),
    # the console on this host: the channel stays on loopback
    ("tcp://localhost:7701", ""),
    ("tcp://127.0.0.1:7701", 'bind = "tcp://0.0.0.0:7700"\n'),
    pytest.param("tcp://[::1]:7701", 'bind = "tcp://*:7700"\n', marks=needs_ipv6),
])
def test_an_admin_endpoint_of_this_host_is_listened_at_as_written(tmp_path, told, bind):
    cfg = load_config(config(tmp_path, told, bind + "[admin]\n"))
    assert cfg.admin == {"enabled": True, "endpoint": told}
    assert not cfg.warnings


@pytest.mark.parametrize(("told", "why"), [
    (f"tcp://{NAME}:7701", f"{NAME} does not resolve here ("),
    ("tcp://203.0.113.7:7701", "203.0.113.7 is not an address of this host"),  # NAT
    ("tcp://[2001:db8::7]:7701", "[2001:db8::7] is not an address of this host"),
])
def test_an_admin_endpoint_this_host_cannot_listen_at_is_left_off_naming_the_fix(
        tmp_path, told, why):
    cfg = config(tmp_path, told, 'bind = "tcp://0.0.0.0:7700"\n[admin]\n')
    loaded = load_config(cfg)
    assert loaded.admin == {}  # off: nothing bound, nothing widened
    said = loaded.admin_off
    assert "\n" not in said
    assert said.startswith(
        f"coordinator config {cfg}: [admin] names no endpoint, and this host cannot listen "
        f"at the provision file's admin_endpoint {told} (what the console dials; "
        f"provision file {tmp_path / 'prov.json'}): {why}"), said
    assert said.endswith(
        'Add under [admin]: endpoint = "tcp://0.0.0.0:7701" (every interface) or endpoint = '
        '"tcp://ADDRESS:7701" with the address of this host to listen at. The admin channel '
        'is off: the console cannot reach this coordinator until it is fixed'), said
    # `fedge coordinator check` warns of it; `run` logs it and serves the federation
    done = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "check",
                           "--config", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"ok: {cfg}\n")
    assert done.stderr == f"warning: {said}\n"


def test_an_admin_endpoint_of_its_own_is_bound_as_written(tmp_path):
    cfg = load_config(config(tmp_path, f"tcp://{NAME}:7701", 'bind = "tcp://*:7700"\n'
                             '[admin]\nendpoint = "tcp://127.0.0.1:7701"\n'))
    assert cfg.admin["endpoint"] == "tcp://127.0.0.1:7701"


def test_a_name_of_this_host_on_loopback_is_bound_with_a_warning(tmp_path):
    """Debian's /etc/hosts gives the host's own name 127.0.1.1: the channel listens
    there, which a console on another host does not reach."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tcoordhost\n")
    why = namespaces_permitted(hosts)
    if why is not None:
        pytest.skip(f"no private mount namespace here ({why})")
    cfg = config(tmp_path, "tcp://coordhost:7701", "[admin]\n")
    done = subprocess.run(in_namespace(hosts, sys.executable, "-m", "fedge.cli", "coordinator",
                                       "check", "--config", str(cfg)),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"ok: {cfg}\n"), done.stderr
    assert done.stderr == (
        "warning: [admin] names no endpoint, so the admin channel listens at the provision "
        f"file's admin_endpoint tcp://coordhost:7701 (provision file {tmp_path / 'prov.json'}"
        "), and coordhost resolves here to 127.0.1.1, a loopback address: only this host "
        "reaches it. Where the console runs on another host, add under [admin]: endpoint = "
        '"tcp://0.0.0.0:7701" (every interface) or endpoint = "tcp://ADDRESS:7701" with '
        "the address of this host to listen at\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_local
def test_a_coordinator_listens_at_the_one_address_its_provision_names(tmp_path):
    """Not at every interface: the console reaches it at that address, not at
    127.0.0.1 (a976330 listened at 0.0.0.0)."""
    port, admin_port = free_port(), free_port()
    console = ConsoleStore.init(tmp_path / "console",
                                coordinator_endpoint=f"tcp://{LOCAL}:{port}",
                                admin_endpoint=f"tcp://{LOCAL}:{admin_port}")
    (tmp_path / "prov.json").write_text(json.dumps(console.provision()))
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "st"\nprovision = "prov.json"\n'
                   f'bind = "tcp://127.0.0.1:{port}"\ntick_s = 0.05\n[admin]\n')
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "st" / "endpoint").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the coordinator did not start in 60 s"
            time.sleep(0.05)
        client = AdminClient.from_store(console, "admin", timeout_s=15)
        assert client.endpoint == f"tcp://{LOCAL}:{admin_port}"
        who, _ = client.call("whoami")
        assert who["name"] == "admin"
        with pytest.raises(TimeoutError):  # nothing listens there
            dataclasses.replace(client, endpoint=f"tcp://127.0.0.1:{admin_port}",
                                timeout_s=1).call("whoami")
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert "admin channel stopped" not in err and "Traceback" not in err, err
