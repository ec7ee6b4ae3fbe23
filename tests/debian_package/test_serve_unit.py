"""fedge-serve.service as systemd runs it: its command line, environment and
notifications, through a real `fedge serve` process and real HTTP.

systemd itself is not PID 1 here, so this does what it would: the unit's
Environment= then the EnvironmentFile= (conffile) lines, ${VAR} as one word and
$VAR split at whitespace, a bound NOTIFY_SOCKET and WATCHDOG_USEC, SIGTERM to stop.
The repository path and /usr/bin/fedge are the only things replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
UNIT = PACKAGING / "systemd" / "fedge-serve.service"
SERVE_ENV = PACKAGING / "debian" / "etc" / "serve.env"


def unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]


def unit_environment(env_file_text: str, cache_root: str = "%C") -> dict[str, str]:
    """Environment= assignments (the specifier %C, /var/cache, replaced by
    ``cache_root``), then the EnvironmentFile='s KEY=value lines over them."""
    env: dict[str, str] = {}
    for line in unit_values("Environment"):
        for word in shlex.split(line):
            key, value = word.split("=", 1)
            env[key] = value.replace("%C", cache_root)
    for line in env_file_text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key.strip()] = value.strip()
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """systemd.service(5) "Command lines": ${VAR} stays one word, a word that is just
    $VAR is split at whitespace into zero or more words."""
    argv: list[str] = []
    for word in shlex.split(command):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            argv += env.get(m.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                               lambda v: env.get(v.group(1), ""), word))
    return argv


def test_packaged_defaults_are_fedge_serves_own() -> None:
    """serve.env ships every setting commented out: the unit's defaults apply, and
    they are the command's own (this host only, port 8000)."""
    from fedge.serve.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    defaults = parser.parse_args(["serve"])
    argv = expand(unit_values("ExecStart")[0], unit_environment(SERVE_ENV.read_text()))
    assert argv == ["/usr/bin/fedge", "serve", "--repository", "/var/lib/fedge/models",
                    "--host", defaults.host, "--port", str(defaults.port)]
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8000)
    # the conffile's commented lines name exactly the variables the unit reads
    named = set(re.findall(r"^# (FEDGE_SERVE_[A-Z]+)=", SERVE_ENV.read_text(), re.M))
    assert named == {"FEDGE_SERVE_HOST", "FEDGE_SERVE_PORT", "FEDGE_SERVE_ARGS"}


def test_prestart_creates_the_repository_only_when_it_is_missing(tmp_path: Path) -> None:
    (pre,) = unit_values("ExecStartPre")
    assert pre.startswith("+")  # as root: /var/lib/fedge is the fedge user's, 0700
    repo = tmp_path / "models"
    me = f"-o {os.getuid()} -g {os.getgid()}"
    argv = [a.replace("/var/lib/fedge/models", str(repo)).replace("-o fedge -g fedge", me)
            for a in shlex.split(pre[1:])]
    assert subprocess.run(argv, timeout=30).returncode == 0
    assert repo.is_dir() and (repo.stat().st_mode & 0o777) == 0o700
    (repo / "risk").mkdir()
    repo.chmod(0o750)
    assert subprocess.run(argv, timeout=30).returncode == 0
    assert (repo / "risk").is_dir() and (repo.stat().st_mode & 0o777) == 0o750  # untouched


def onnx_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    tmp = tempfile.mkdtemp(prefix="fsrv", dir="/tmp")  # AF_UNIX paths: 108 bytes at most
    path = os.path.join(tmp, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path, sock
    finally:
        sock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def receive(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(m.split("\n")[0].startswith(wanted) for m in got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted} within {timeout}s; got {got}")
        sock.settimeout(left)
        got.append(sock.recv(4096).decode())
    return got


@pytest.mark.timeout(120)
def test_the_unit_command_serves_the_agents_models_and_feeds_the_watchdog(
        tmp_path: Path, notify_socket: tuple[str, socket.socket]) -> None:
    """Type=notify with WatchdogSec=: READY=1 once serving, WATCHDOG=1 every half
    interval from the server itself, STOPPING=1 and a clean exit on SIGTERM; in between a
    model installed as the agent installs it is served over KServe v2."""
    from fedge.serve.repository import ModelRepository

    repo = tmp_path / "models"
    ModelRepository(repo).install("risk", onnx_model())
    cache_root = tmp_path / "var-cache"  # CacheDirectory=, made by systemd before the start
    (cache_root / unit_values("CacheDirectory")[0]).mkdir(parents=True)
    # an administrator's serve.env: another port (0: any free one here) and more options
    env = unit_environment(SERVE_ENV.read_text() + "FEDGE_SERVE_PORT=0\n"
                           "FEDGE_SERVE_ARGS=--poll-interval 0.2 --threads 1\n",
                           cache_root=str(cache_root))
    argv = expand(unit_values("ExecStart")[0], env)
    assert argv[:2] == ["/usr/bin/fedge", "serve"]
    assert argv[-4:] == ["--poll-interval", "0.2", "--threads", "1"]
    argv = [sys.executable, "-m", "fedge.cli", *argv[1:]]
    argv[argv.index("/var/lib/fedge/models")] = str(repo)
    path, sock = notify_socket
    watchdog_usec = 1_000_000
    run_env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "JOURNAL_STREAM")}
    run_env.update(env, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(watchdog_usec))
    proc = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        base = f"http://127.0.0.1:{m.group(1)}"
        receive(sock, "READY=1", 60)
        t0 = time.monotonic()
        receive(sock, "WATCHDOG=1", 5)
        receive(sock, "WATCHDOG=1", 5)
        # two pings in about one interval: well inside WatchdogSec
        assert time.monotonic() - t0 < watchdog_usec / 1e6 * 1.5
        with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{base}/v2/models/risk", timeout=10) as r:
            meta = json.load(r)
        assert meta["name"] == "risk" and meta["versions"] == ["1"]
        ModelRepository(repo).install("risk", onnx_model())  # a pushed update: no restart
        deadline = time.monotonic() + 10
        while meta["versions"] != ["1", "2"] and time.monotonic() < deadline:
            time.sleep(0.2)
            with urllib.request.urlopen(f"{base}/v2/models/risk", timeout=10) as r:
                meta = json.load(r)
        assert meta["versions"] == ["1", "2"], meta
        proc.send_signal(signal.SIGTERM)
        receive(sock, "STOPPING=1", 30)
        # uvicorn re-raises the SIGTERM it handled once shut down; systemd counts a
        # death by SIGTERM as a clean exit (systemd.service(5), SuccessExitStatus=),
        # so Restart=on-failure does not restart a stopped server
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


TELEMETRY_PROBE = """
import sys
import fedge.serve.runtime  # what `fedge serve` loads models with
import onnxruntime
session = onnxruntime.InferenceSession(sys.stdin.buffer.read(),
                                       providers=["CPUExecutionProvider"])
session.run(None, {"x": [[1.0, 2.0, 3.0]]})
"""


def test_fedge_serve_turns_onnxruntime_telemetry_off_before_it_starts(tmp_path: Path) -> None:
    """onnxruntime (1.32 here) writes a device id and a telemetry queue under
    $HOME/.cache/Microsoft as soon as it is imported, for upload to Microsoft;
    onnxruntime.disable_telemetry_events() comes too late for both. Run from a fresh
    HOME with nothing set in the environment, a session through fedge.serve writes
    nothing there. (onnxruntime imported before fedge.serve: the units' environment,
    test_units.py::test_every_daemon_starts_with_onnxruntime_telemetry_off.)"""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", "CI", "GITHUB_ACTIONS",
                        "TF_BUILD", "ORT_RUNNING_UNIT_TESTS")}
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-c", TELEMETRY_PROBE], input=onnx_model(), env=env,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


def test_fedge_imports_onnxruntime_only_through_fedge_serve() -> None:
    """fedge/serve/__init__.py turns the telemetry off before its modules import
    onnxruntime; an import elsewhere in fedge could come first."""
    root = PACKAGING.parent / "fedge"
    elsewhere = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "serve" not in p.relative_to(root).parts[:1]
                 and re.search(r"^\s*(import|from)\s+onnxruntime\b", p.read_text(), re.M)]
    assert elsewhere == []
