"""Real-process federations on loopback: `fedge coordinator` and `fedge agent`
subprocesses, CurveZMQ, SQLite, killed with SIGKILL and restarted.

Appliances are enrolled the way `fedge agent enrol` leaves them (the state-dir
layout of fedge.agent.enrol) and registered in the coordinator's store; the
roster is signed by a console identity made here. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "../shared/data/fed_tcga_brca"


def wait_for(pred, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Proc:
    def __init__(self, name, args, log_path, env):
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.p = None
        self.start()

    def start(self):
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                  env=self.env, cwd=REPO)

    def kill(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)
        self.log.close()

    def stop(self, timeout=20):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self.log.close()
        return self.p.returncode

    def output(self):
        return Path(self.log_path).read_text(errors="replace")


class Federation:
    """One coordinator and N agents under tmp_path."""

    wait_for = staticmethod(wait_for)

    def __init__(self, tmp_path, *, heartbeat=(0.5, 10.0)):
        from fedge.secagg.keys import Identity
        from fedge.transport import CurveKeyPair, save_keypair

        self.root = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.interval, self.timeout = heartbeat
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1"}
        self.env.pop("NOTIFY_SOCKET", None)
        self.console = Identity.generate()
        self.coord_keys = CurveKeyPair.generate()
        save_keypair(tmp_path / "keys", "coordinator", self.coord_keys)
        self.coord_dir = tmp_path / "coordinator"
        self.coord_dir.mkdir()
        self.sites: dict[str, dict] = {}
        self.procs: dict[str, Proc] = {}
        self.coordinator: Proc | None = None
        self.endpoint = "tcp://127.0.0.1:0"

    # -- enrolment -----------------------------------------------------------------
    def add_site(self, site, datasets, *, enrol=True):
        from fedge.secagg.keys import Identity
        from fedge.transport import CurveKeyPair

        self.sites[site] = {"curve": CurveKeyPair.generate(), "identity": Identity.generate(),
                            "datasets": datasets, "enrolled": enrol}

    def roster_bytes(self):
        from fedge.secagg.keys import Roster

        return Roster.build({s: v["identity"].public_bytes() for s, v in self.sites.items()
                             if v["enrolled"]}, self.console).to_bytes()

    def write_coordinator_config(self):
        (self.root / "roster.json").write_bytes(self.roster_bytes())
        cfg = self.root / "coordinator.toml"
        cfg.write_text(
            f'state_dir = "{self.coord_dir}"\n'
            f'bind = "{self.endpoint}"\n'
            f'curve_key = "{self.root / "keys" / "coordinator.key_secret"}"\n'
            f'roster = "{self.root / "roster.json"}"\n'
            f'roster_public_key = "{self.console.public_bytes().hex()}"\n'
            "tick_s = 0.02\n"
            f"[heartbeat]\ninterval_s = {self.interval}\ntimeout_s = {self.timeout}\n")
        return cfg

    def enrol_in_store(self):
        from fedge.coordinator.store import Store

        store = Store(self.coord_dir)
        for site, v in self.sites.items():
            if v["enrolled"]:
                store.enrol(site, v["curve"].public, v["identity"].public_bytes(), actor="test")
        store.close()

    def write_agent(self, site, *, coordinator_key=None):
        v = self.sites[site]
        sd = self.root / "agents" / site
        (sd / "keys").mkdir(parents=True, exist_ok=True)
        (sd / "keys" / "curve.json").write_text(json.dumps(
            {"public": v["curve"].public, "secret": v["curve"].secret}))
        v["identity"].save(sd / "keys" / "identity.key")
        (sd / "keys" / "coordinator.json").write_text(json.dumps(
            {"endpoint": self.endpoint,
             "public_key": coordinator_key or self.coord_keys.public}))
        (sd / "roster.json").write_bytes(self.roster_bytes())
        (sd / "enrolment.json").write_text(json.dumps(
            {"site": site, "console_id": "test", "console_fingerprint": "",
             "roster_public_key": self.console.public_bytes().hex()}))
        lines = [f'state_dir = "{sd}"', "[heartbeat]", f"interval_s = {self.interval}",
                 f"timeout_s = {self.timeout}", "[eligibility]", "allow_cpu_only = true",
                 # sums of two allowed (the default min_cohort is 3): many runs here
                 # are of two or three sites, one of them lost on purpose
                 "[privacy]", "min_cohort = 2"]
        for ds in v["datasets"]:
            lines.append("[[datasets]]")
            lines += [f"{k} = {json.dumps(val)}" for k, val in ds.items()]
        cfg = self.root / f"agent-{site}.toml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    # -- processes -----------------------------------------------------------------
    def start_coordinator(self):
        cfg = self.write_coordinator_config()
        endpoint_file = self.coord_dir / "endpoint"
        endpoint_file.unlink(missing_ok=True)
        self.coordinator = Proc("coordinator",
                                [sys.executable, "-m", "fedge.cli", "coordinator",
                                 "--config", str(cfg)],
                                self.root / "coordinator.log", self.env)
        self.endpoint = wait_for(
            lambda: endpoint_file.exists() and endpoint_file.read_text().strip(), 60,
            "the coordinator's endpoint file")
        return self.coordinator

    def start_agent(self, site, *, extra=(), coordinator_key=None):
        cfg = self.write_agent(site, coordinator_key=coordinator_key)
        proc = Proc(site, [sys.executable, "-m", "fedge.cli", "agent", "--config", str(cfg),
                           *extra], self.root / f"agent-{site}.log", self.env)
        self.procs[site] = proc
        return proc

    def submit(self, plan_text):
        plan = self.root / f"plan-{time.monotonic_ns()}.toml"
        plan.write_text(plan_text)
        out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "submit",
                              "--config", str(self.root / "coordinator.toml"), str(plan)],
                             capture_output=True, text=True, env=self.env, timeout=60, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    # -- state ---------------------------------------------------------------------
    def db(self):
        conn = sqlite3.connect(self.coord_dir / "coordinator.sqlite3", timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql, *args):
        conn = self.db()
        try:
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def job(self, job_id):
        rows = self.query("SELECT * FROM jobs WHERE job_id = ?", job_id)
        return rows[0] if rows else None

    def connected(self):
        """Sites whose heartbeat the coordinator recorded."""
        return {r["site_id"] for r in self.query(
            "SELECT site_id FROM appliances WHERE last_seen IS NOT NULL")}

    def wait_job(self, job_id, timeout, statuses=("completed", "failed", "cancelled")):
        def done():
            j = self.job(job_id)
            return j if j and j["status"] in statuses else None
        try:
            return wait_for(done, timeout, f"job {job_id} to finish")
        except AssertionError:
            print(self.dump())
            raise

    def audit(self, action=None):
        if action:
            return self.query("SELECT * FROM audit WHERE action = ? ORDER BY id", action)
        return self.query("SELECT * FROM audit ORDER BY id")

    def dump(self):
        parts = []
        for p in [self.coordinator, *self.procs.values()]:
            if p is not None:
                parts.append(f"==== {p.name}\n{p.output()[-4000:]}")
        return "\n".join(parts)

    def close(self):
        for p in self.procs.values():
            p.kill()
        if self.coordinator is not None:
            self.coordinator.kill()


@pytest.fixture
def federation(tmp_path):
    feds = []

    def make(**kw):
        f = Federation(tmp_path / f"fed{len(feds)}", **kw)
        feds.append(f)
        return f

    yield make
    for f in feds:
        f.close()


@pytest.fixture
def brca():
    """A [[datasets]] table for Fed-TCGA-BRCA centre i."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")

    def table(site_index):
        return {"name": "fed_tcga_brca", "kind": "fed_tcga_brca",
                "path": str(DATA.resolve()), "site": site_index}
    return table
