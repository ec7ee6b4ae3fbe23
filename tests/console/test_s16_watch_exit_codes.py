"""`fedge console jobs watch` tells apart what it learnt of the job from not having
been able to ask (review s16 M1): a coordinator that does not answer within --timeout
(a restart, a network outage) no longer ends the watch with 1, the code of a failed
or cancelled job; it is said once, asked again, and said again when it answers. The
watch gives up only at --max-wait, with 4; an unknown job id is 2. `jobs status`
accepts --json, as `jobs list` does.

Through the real CLI (a `fedge console` process for the outage), a real coordinator
(SQLite) and its admin channel on loopback, stopped and started again."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from fedge.cli import main

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2
[model]
name = "cox_linear"
params = { in_features = 3 }
[train]
epochs = 1
batch_size = 32
learning_rate = 0.01
[strategy]
name = "fedavg"
"""


def _submitted(tmp_path, server, capsys) -> tuple[list[str], str]:
    """A job submitted through the CLI (no appliance: it stays queued). Returns (the
    CLI's leading arguments, the job id)."""
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    return base, capsys.readouterr().out.strip()


class Watch:
    """A `fedge console jobs watch` process; its stdout lines collected as they come."""

    def __init__(self, home, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedge.cli", "console", "--home", str(home), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, within_s: float = 30.0) -> str:
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            said = [ln for ln in self.lines if text in ln]
            if said:
                return said[0]
            if self.proc.poll() is not None:
                self.reader.join(5)
                said = [ln for ln in self.lines if text in ln]
                assert said, (f"watch ended (rc {self.proc.returncode}) without saying "
                              f"{text!r}: {self.lines} {self.proc.stderr.read()}")
                return said[0]
            time.sleep(0.05)
        raise AssertionError(f"watch did not say {text!r} within {within_s} s: {self.lines}")

    def end(self, within_s: float = 30.0) -> tuple[int, str]:
        try:
            rc = self.proc.wait(within_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(5)
        return rc, self.proc.stderr.read()


def test_a_coordinator_restart_longer_than_the_timeout_does_not_end_the_watch(
        tmp_path, make_server, capsys):
    server = make_server()
    base, job = _submitted(tmp_path, server, capsys)
    home = server.console.home
    watch = Watch(home, "--timeout", "0.5", "jobs", "watch", job, "--interval", "0.2")
    try:
        watch.wait_for(f"job {job} queued: 0 job(s) ahead of it")
        server.close()  # the coordinator stops: no reply within --timeout from now on
        down = watch.wait_for("coordinator unreachable since ")
        time.sleep(2.0)  # four --timeout's worth
        assert watch.proc.poll() is None, (watch.lines, watch.proc.stderr.read())
        assert sum("unreachable" in ln for ln in watch.lines) == 1, watch.lines  # once
        restarted = make_server(home)  # the same state and admin endpoint
        watch.wait_for("coordinator reachable again (unreachable since ")
        assert main([*base, "jobs", "cancel", job]) == 0
        rc, err = watch.end()
    finally:
        if watch.proc.poll() is None:
            watch.proc.kill()
            watch.proc.wait(10)
    assert down.startswith("coordinator unreachable since 20") and "within 0.5 s" in down
    # the watch ended on what the job did: cancelled, by whom
    assert rc == 1, err
    assert watch.lines[-1].startswith(f"job {job} cancelled by operator:admin at "), \
        watch.lines
    assert restarted.coordinator.store.job(job).status == "cancelled"


def test_max_wait_with_the_coordinator_down_is_4_not_a_failed_job(
        tmp_path, make_server, capsys):
    server = make_server()
    _, job = _submitted(tmp_path, server, capsys)
    server.close()
    started = time.monotonic()
    rc = main(["console", "--home", str(server.console.home), "--timeout", "0.3", "jobs",
               "watch", job, "--interval", "0.1", "--max-wait", "1.5"])
    took = time.monotonic() - started
    got = capsys.readouterr()
    assert rc == 4, got
    assert 1.5 <= took < 10, took
    assert got.out.startswith("coordinator unreachable since "), got.out
    assert f"job {job}: the coordinator has not answered since " in got.err
    assert "gave up after --max-wait 1.5 s (the job's state is not known)" in got.err


def test_an_unknown_job_is_2_and_a_console_that_cannot_ask_is_4(
        tmp_path, make_server, capsys):
    server = make_server()
    base, _ = _submitted(tmp_path, server, capsys)
    assert main([*base, "jobs", "watch", "job-nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown job 'job-nope'" in err and "`fedge console jobs list`" in err
    assert main([*base, "--operator", "nobody", "jobs", "watch", "job-nope"]) == 4
    assert "nobody" in capsys.readouterr().err


def test_jobs_status_accepts_json(tmp_path, make_server, capsys):
    server = make_server()
    base, job = _submitted(tmp_path, server, capsys)
    assert main([*base, "jobs", "status", job, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "queued"
