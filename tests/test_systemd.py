"""fedge.systemd: the sd_notify protocol as systemd sees it, through a real socket.

The test binds the NOTIFY_SOCKET datagram socket itself (what systemd does for
a Type=notify unit) and runs a real daemon subprocess built on
``fedge.systemd.run_service``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedge import systemd as fsd

DAEMON = textwrap.dedent(
    """
    import asyncio, sys, time
    from fedge.systemd import run_service

    STALL = float(sys.argv[1])

    async def main(shutdown, notifier):
        notifier.ready("serving")
        rnd = 0
        while not shutdown.requested:
            rnd += 1
            notifier.status(f"job demo round {rnd}")
            if rnd == 4 and STALL:
                notifier.status("stalling")
                time.sleep(STALL)  # blocking code: the event loop is stuck
                notifier.status("resumed")
            try:
                await asyncio.wait_for(shutdown.wait(), 0.05)
            except TimeoutError:
                pass
        notifier.status(f"round {rnd} abandoned")

    sys.exit(run_service("fedge-test", main))
    """
)


class NotifySocket:
    """The systemd side: a bound AF_UNIX datagram socket collecting notifications."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def recv(self, timeout: float = 5.0) -> tuple[float, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        return time.monotonic(), data.decode()

    def recv_until(self, predicate, timeout: float = 10.0) -> list[tuple[float, str]]:
        """Collect datagrams until one satisfies ``predicate`` (bounded by ``timeout``)."""
        got: list[tuple[float, str]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching notification within {timeout}s; got {got}")
            got.append(self.recv(left))
            if predicate(got[-1][1]):
                return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    # AF_UNIX paths are limited to 108 bytes, so not pytest's long tmp_path.
    tmp = tempfile.mkdtemp(prefix="fsd", dir="/tmp")
    ns = NotifySocket(os.path.join(tmp, "notify"))
    try:
        yield ns
    finally:
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _daemon_env(notify_path: str, watchdog_usec: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=notify_path, WATCHDOG_USEC=str(watchdog_usec), PYTHONUNBUFFERED="1")
    return env


def _start_daemon(ns: NotifySocket, stall: float, watchdog_usec: int = 200_000):
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(stall)],
        env=_daemon_env(ns.path, watchdog_usec),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kinds(messages: list[tuple[float, str]]) -> list[str]:
    return [m.split("\n")[0].split("=")[0] for _, m in messages]


def test_daemon_sends_ready_watchdog_status_then_stopping_on_sigterm_and_exits_0(
    notify_socket: NotifySocket,
) -> None:
    proc = _start_daemon(notify_socket, stall=0.0)
    try:
        first = notify_socket.recv(timeout=20)[1]  # interpreter start-up on a busy machine
        assert first.split("\n") == ["READY=1", "STATUS=serving"]
        seen = notify_socket.recv_until(lambda m: m == "STATUS=job demo round 3")
        seen += notify_socket.recv_until(lambda m: m == "WATCHDOG=1")
        assert "STATUS" in _kinds(seen) and "WATCHDOG" in _kinds(seen)
        proc.send_signal(signal.SIGTERM)
        tail = notify_socket.recv_until(lambda m: m.startswith("STOPPING=1"))
        assert tail[-1][1] == "STOPPING=1\nSTATUS=stopping (SIGTERM)"
        _, out_err = proc.communicate(timeout=10)
        assert proc.returncode == 0, out_err
        # After STOPPING the daemon abandoned its stage and said so, then nothing else.
        rest = []
        notify_socket.sock.setblocking(False)
        while True:
            try:
                rest.append(notify_socket.sock.recv(4096).decode())
            except BlockingIOError:
                break
        assert not any(m.startswith("READY") for m in rest)
        assert any(m.startswith("STATUS=round ") and m.endswith("abandoned") for m in rest)
        assert "stopped cleanly" in out_err  # logged to stderr: not under systemd
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_stalled_event_loop_stops_watchdog_pings(notify_socket: NotifySocket) -> None:
    stall = 1.0
    proc = _start_daemon(notify_socket, stall=stall, watchdog_usec=200_000)
    try:
        notify_socket.recv_until(lambda m: m.startswith("READY=1"), timeout=20)
        before = notify_socket.recv_until(lambda m: m == "STATUS=stalling")
        assert "WATCHDOG" in _kinds(before)  # pings flowed while the loop ran
        during = notify_socket.recv_until(lambda m: m == "STATUS=resumed")
        # Nothing at all was sent while the loop was blocked: in particular no ping.
        assert [m for _, m in during] == ["STATUS=resumed"]
        t_stall_start = before[-1][0]
        assert during[-1][0] - t_stall_start >= stall * 0.9
        after = notify_socket.recv_until(lambda m: m == "WATCHDOG=1", timeout=5)
        assert after[-1][1] == "WATCHDOG=1"  # pings resume with the loop
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_daemon_failure_exits_1_for_restart_on_failure(notify_socket: NotifySocket) -> None:
    code = textwrap.dedent(
        """
        import sys
        from fedge.systemd import run_service
        async def main(shutdown, notifier):
            notifier.ready()
            raise RuntimeError("database is locked")
        sys.exit(run_service("fedge-test", main))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_daemon_env(notify_socket.path, 1_000_000),
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "database is locked" in proc.stderr
    msgs = notify_socket.recv_until(lambda m: m.startswith("STOPPING=1"))
    assert msgs[0][1] == "READY=1"
    assert msgs[-1][1] == "STOPPING=1\nSTATUS=failed"


def test_notifier_via_systemd_python_and_plain_socket(
    notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    n = fsd.Notifier()  # os.environ: the systemd.daemon.notify path
    assert n.enabled and n.status("round 2 of job j1") is True
    assert notify_socket.recv()[1] == "STATUS=round 2 of job j1"
    plain = fsd.Notifier({"NOTIFY_SOCKET": notify_socket.path})  # the pure-socket path
    assert plain.watchdog() is True
    assert notify_socket.recv()[1] == "WATCHDOG=1"
    assert plain.sent == 1


def test_notifier_supports_abstract_socket() -> None:
    name = f"fedge-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert fsd.Notifier({"NOTIFY_SOCKET": "@" + name}).ready("up") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notifier_is_a_noop_outside_systemd() -> None:
    n = fsd.Notifier({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.sent == 0


def test_notifier_send_failure_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    n = fsd.Notifier({"NOTIFY_SOCKET": "/nonexistent/fedge/notify"})
    with caplog.at_level(logging.WARNING, logger="fedge.systemd"):
        assert n.watchdog() is False
    assert "WATCHDOG=1" in caplog.text and "/nonexistent/fedge/notify" in caplog.text


def test_status_text_with_newline_is_rejected_before_sending() -> None:
    n = fsd.Notifier({"NOTIFY_SOCKET": "/nonexistent"})
    with pytest.raises(ValueError, match="line break"):
        n.status("round 3\nREADY=1")
    with pytest.raises(ValueError, match="non-empty"):
        n.status("")
    assert n.sent == 0


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    assert fsd.watchdog_interval({}) is None
    assert fsd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    mine = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}
    assert fsd.watchdog_interval(mine) == 0.5
    other = {"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert fsd.watchdog_interval(other) is None
    with pytest.raises(ValueError, match=r"WATCHDOG_USEC='soon' must be a positive integer"):
        fsd.watchdog_interval({"WATCHDOG_USEC": "soon"})
    with pytest.raises(ValueError, match="WATCHDOG_PID='-3'"):
        fsd.watchdog_interval({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "-3"})


def test_start_watchdog_needs_a_positive_interval_and_an_enabled_notifier() -> None:
    async def scenario() -> None:
        assert fsd.start_watchdog(fsd.Notifier({}), 1.0) is None
        with pytest.raises(ValueError, match="must be > 0"):
            fsd.start_watchdog(fsd.Notifier({"NOTIFY_SOCKET": "/x"}), 0.0)

    asyncio.run(scenario())


def test_setup_logging_chooses_journald_under_systemd_and_stderr_otherwise() -> None:
    from systemd.journal import JournalHandler

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        fsd.setup_logging("fedge-agent", environ={"INVOCATION_ID": "0123abcd"})
        ours = [h for h in root.handlers if getattr(h, fsd._HANDLER_MARK, False)]
        assert len(ours) == 1 and isinstance(ours[0], JournalHandler)
        fsd.setup_logging("fedge-agent", "debug", environ={})
        ours = [h for h in root.handlers if getattr(h, fsd._HANDLER_MARK, False)]
        assert len(ours) == 1 and type(ours[0]) is logging.StreamHandler
        assert root.level == logging.DEBUG
        with pytest.raises(ValueError, match="log level 'chatty'"):
            fsd.setup_logging("fedge-agent", "chatty", environ={})
    finally:
        for h in root.handlers[:]:
            if getattr(h, fsd._HANDLER_MARK, False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_journal_stream_must_match_stderr(tmp_path: Path) -> None:
    code = (
        "import os, sys; from fedge.systemd import under_systemd; "
        "st = os.fstat(2); print(under_systemd({'JOURNAL_STREAM': f'{st.st_dev}:{st.st_ino}'}), "
        "under_systemd({'JOURNAL_STREAM': '1:2'}))"
    )
    with open(tmp_path / "err", "w") as err:
        out = subprocess.run([sys.executable, "-c", code], stderr=err, capture_output=False,
                             stdout=subprocess.PIPE, text=True, timeout=60)
    assert out.stdout.split() == ["True", "False"]
