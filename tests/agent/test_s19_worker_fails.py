"""An agent whose own event-loop task dies (receiving the coordinator's messages, the
heartbeats) says so and stops, exit 70 (WORKER_FAILED_EXIT), so that systemd restarts
it (Restart=on-failure, RestartSec=5s, within the unit's start limit). The tasks had no
done-callback: the error was kept until the stop and dropped there, and the watchdog
checked only for a stuck training thread, so an agent whose heartbeat task had died
looked alive to systemd while the coordinator counted the site gone.

The fault is injected where it would arise, a method of a real object raising (the
link log's tick in the heartbeat task, the client socket's recv in the receiver); the
rest is real: run_agent over a real ClientSocket dialling a port nobody listens on,
and a real `fedge agent run` process under a bound NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedge.agent import process
from fedge.agent.process import Enrolled, run_agent
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.transport import ClientSocket, CurveKeyPair
from tests.agent.test_process_config import enrolled_state
from tests.agent.test_runtime import PLAIN_OK

REPO = Path(__file__).resolve().parents[2]


def _failing_after(calls: int, real):  # type: ignore[no-untyped-def]
    """``real``, raising RuntimeError from its ``calls``-th call on."""
    made: list[int] = []

    def method(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(1)
        if len(made) >= calls:
            raise RuntimeError(f"injected fault, call {len(made)}")
        return real(self, *args, **kwargs)

    return method


@pytest.mark.parametrize("task,owner,method", [
    ("sending heartbeats", process.LinkLog, "tick"),
    ("receiving the coordinator's messages", ClientSocket, "recv"),
], ids=["heartbeats", "receiver"])
def test_a_dead_task_of_the_agent_is_logged_and_stops_it(task, owner, method, caplog,
                                                         monkeypatch):
    monkeypatch.setattr(owner, method, _failing_after(3 if method == "tick" else 1,
                                                      getattr(owner, method)))
    keys = CurveKeyPair.generate()
    enrolled = Enrolled("site-a", keys.public, keys.secret or "", "tcp://127.0.0.1:9",
                        CurveKeyPair.generate().public, None, None)
    agent = Agent("site-a", SyntheticTrainer("site-a"), policy=PLAIN_OK)

    async def main() -> tuple[int, float]:
        stop = asyncio.Event()
        t0 = time.monotonic()
        code = await asyncio.wait_for(run_agent(agent, enrolled, interval_s=0.05,
                                                timeout_s=1.0, stop=stop), 20)
        return code, time.monotonic() - t0

    with caplog.at_level(logging.INFO, logger="fedge"):
        code, took = asyncio.run(main())
    assert code == 70 == getattr(process, "WORKER_FAILED_EXIT", None)
    assert took < 10
    (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.name == "fedge.agent"
    assert line.getMessage() == (
        f"site-a: {task} stopped on an error: RuntimeError: injected fault, call "
        f"{3 if method == 'tick' else 1}; the agent stops (exit 70) so that systemd "
        "restarts it")
    assert line.exc_info is not None and line.exc_info[0] is RuntimeError  # traceback


def test_an_agent_process_whose_heartbeat_task_dies_exits_70(tmp_path):
    """A real `fedge agent run` under a bound NOTIFY_SOCKET (WatchdogSec 2 s): it pings
    the watchdog, its heartbeat task dies, and it leaves with 70, having said which task
    and why; its STOPPING=1 status names the exit."""
    state = tmp_path / "state"
    enrolled_state(state)
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\nhealth = false\n'
                      "[heartbeat]\ninterval_s = 0.2\ntimeout_s = 2.0\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    fault = (
        "import sys, time\n"
        "from fedge.agent import process\n"
        "real = process.LinkLog.tick\n"
        "calls = []\n"
        "def tick(self, now):\n"
        "    calls.append(now)\n"
        "    if len(calls) > 10:\n"  # after two seconds of heartbeats and pings
        "        raise RuntimeError('injected fault: the link log cannot tick')\n"
        "    return real(self, now)\n"
        "process.LinkLog.tick = tick\n"
        "from fedge.cli import main\n"
        f"sys.exit(main(['agent', 'run', '--config', {str(config)!r}]))\n")
    env = {**os.environ, "NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "2000000",
           "PYTHONUNBUFFERED": "1"}
    env.pop("CREDENTIALS_DIRECTORY", None)
    t0 = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-c", fault], env=env, capture_output=True,
                             text=True, timeout=90, cwd=REPO)
        took = time.monotonic() - t0
        notify.setblocking(False)
        got: list[str] = []
        while True:
            try:
                got.append(notify.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        notify.close()
    assert run.returncode == 70, run.stderr
    assert took < 60, took
    assert ("s1: sending heartbeats stopped on an error: RuntimeError: injected fault: the "
            "link log cannot tick; the agent stops (exit 70) so that systemd restarts it"
            ) in run.stderr, run.stderr
    assert "Traceback" in run.stderr  # the task's, logged with the line
    assert any("WATCHDOG=1" in g for g in got), got  # it was pinging
    (stopping,) = [g for g in got if "STOPPING=1" in g]
    assert "(exit 70)" in stopping, stopping
