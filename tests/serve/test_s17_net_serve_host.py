"""`fedge serve --host` takes an IPv6 address in brackets, and a name is listened on at
every address it has (s17 endpoints L4).

``--host [::1]`` was looked up as a name: "cannot listen on [[::1]]:P: Name or service
not known". ``--host localhost`` (or any name) was resolved for IPv4 only, so it did not
answer on ::1 where the name has that address too. The real command, an empty
repository (/v2/health/live answers at once).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.transport.test_s17_net_ipv6_sockets import needs_ipv6

pytestmark = pytest.mark.timeout(120)


def serving(tmp_path: Path, host: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "serve", "--repository",
                             str(tmp_path / "repo"), "--host", host, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        pytest.fail(f"fedge serve --host {host} did not start: {proc.communicate()[1]}")
    return proc, line.strip()


def live(address: str, port: int) -> int:
    host = f"[{address}]" if ":" in address else address
    return httpx.get(f"http://{host}:{port}/v2/health/live", timeout=10).status_code


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


@needs_ipv6
def test_an_ipv6_address_in_brackets_is_listened_on(tmp_path) -> None:
    proc, line = serving(tmp_path, "[::1]")
    try:
        m = re.match(r"fedge serve listening on http://\[::1\]:(\d+) \(repository ", line)
        assert m, line
        assert live("::1", int(m.group(1))) == 200
    finally:
        stop(proc)


def test_a_name_is_listened_on_at_every_address_it_has(tmp_path) -> None:
    have = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(
        "localhost", 0, type=socket.SOCK_STREAM)))
    proc, line = serving(tmp_path, "localhost")
    try:
        m = re.match(r"fedge serve listening on http://localhost:(\d+) on (.*) \(repository ",
                     line)
        assert m, line
        assert m.group(2) == ", ".join(f"[{a}]" if ":" in a else a for a in have)
        for address in have:  # 127.0.0.1, and ::1 where localhost has it
            assert live(address, int(m.group(1))) == 200, address
    finally:
        stop(proc)
    if "::1" not in have:
        pytest.skip("localhost has no IPv6 address here: only its IPv4 one was tried")


def test_a_name_that_does_not_resolve_is_named(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedge.cli", "serve", "--repository",
                           str(tmp_path), "--host", "fl-serve.invalid", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "cannot listen on fl-serve.invalid:0: " in proc.stderr, proc.stderr
