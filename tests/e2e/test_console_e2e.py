"""The operator's and the ML engineer's paths with nothing but the real commands, each
its own process: `fedge console init` → `fedge coordinator` (provisioned from the
console's file) → `fedge console enrol` → `fedge agent enrol FILE` → `fedge agent`;
then `fedge console fleet`, and `fedge console jobs submit / watch / fetch` for a
job whose ONNX model and report (with plots) come back to the console."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedge import __version__
from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore
from tests.e2e.conftest import DATA

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


class ConsoleFederation:
    """A console home, a coordinator provisioned from it, and appliances enrolled and
    started through the CLI."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "console"
        self.console = ["console", "--home", str(self.home), "--timeout", "30"]
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        port, admin_port = free_port(), free_port()
        r = fedge(*self.console, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                  "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}")
        assert r.returncode == 0, r.stderr
        self.coord_dir = tmp / "coord"
        cfg = tmp / "coordinator.toml"
        cfg.write_text(f'state_dir = "{self.coord_dir}"\nbind = "tcp://127.0.0.1:{port}"\n'
                       f'provision = "{self.home / "coordinator-provision.json"}"\n'
                       "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n"
                       f'[admin]\nendpoint = "tcp://127.0.0.1:{admin_port}"\n')
        self.spawn("coordinator", "coordinator", "--config", str(cfg))
        self.viewer = AdminClient.from_store(ConsoleStore(self.home), "viewer", timeout_s=10)

    def spawn(self, name: str, *args: str) -> None:
        with open(self.tmp / f"{name}.log", "wb") as log:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "fedge.cli", *args],
                                               stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env))

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def add_appliance(self, site: str, datasets: str = "") -> Path:
        """`fedge console enrol`, `fedge agent enrol FILE`, `fedge agent`; returns its
        state dir. `datasets`: the agent config's [[datasets]] tables."""
        r = fedge(*self.console, "enrol", site, "--out", str(self.tmp / f"{site}.fedge-enrol"))
        assert r.returncode == 0, r.stderr + self.log("coordinator")
        assert f"coordinator accepts {site}" in r.stdout
        state = self.tmp / site
        r = fedge("agent", "enrol", str(self.tmp / f"{site}.fedge-enrol"), "--state-dir",
                  str(state))
        assert r.returncode == 0, r.stderr
        config = self.tmp / f"{site}.toml"
        config.write_text(f'state_dir = "{state}"\n'
                          "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n" + datasets)
        self.spawn(f"agent-{site}", "agent", "--config", str(config))
        return state

    def wait_connected(self, sites: set[str], timeout_s: float = 60) -> list[dict]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:  # polled in-process: a CLI start per poll is slow
            fleet, _ = self.viewer.call("fleet")
            if {a["site_id"] for a in fleet if a["connected"] and a["version"]} >= sites:
                return fleet
            time.sleep(0.3)
        raise AssertionError(f"{sites} not all connected within {timeout_s} s: {fleet}")

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def operator(tmp_path):
    fed = ConsoleFederation(tmp_path)
    yield fed
    fed.close()


def test_operator_enrols_an_appliance_and_sees_it_in_the_fleet(operator):
    state = operator.add_appliance("hospital-a")
    assert stat.S_IMODE((state / "keys" / "curve.json").stat().st_mode) == 0o600
    operator.wait_connected({"hospital-a"})
    r = fedge(*operator.console, "--operator", "viewer", "fleet", "--json")
    assert r.returncode == 0, r.stderr
    [a] = json.loads(r.stdout)
    assert (a["site_id"], a["connected"], a["version"]) == ("hospital-a", True, __version__)
    assert "host" in a["health"]  # the agent's real health report reached the console


def hospitals(operator: ConsoleFederation, n: int) -> list[str]:
    """n appliances enrolled one at a time, hospital-i holding Fed-TCGA-BRCA centre i,
    all connected. They have no GPU: their IT allows CPU-only training."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    sites = [f"hospital-{i}" for i in range(n)]
    for i, site in enumerate(sites):
        operator.add_appliance(site, '[eligibility]\nallow_cpu_only = true\n'
                               "[privacy]\nmin_cohort = 2\n"  # a revoke leaves two
                               f'[[datasets]]\nname = "fed_tcga_brca"\n'
                               f'kind = "fed_tcga_brca"\npath = "{DATA.resolve()}"\n'
                               f"site = {i}\n"
                               # the plan is DP-SGD: public standardisation constants
                               'standardise = "bounds"\n'
                               "feature_bounds = { age_at_index = [0, 120] }\n")
    operator.wait_connected(set(sites))
    return sites


PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 3
min_clients = 3
seed = 42
eval_split = "val"  # each round on validation; the final model once on test
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
epochs = 1
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedavg"
[secagg]
enabled = true
[privacy]
min_site_examples = 100
[privacy.dp]
noise_multiplier = 1.1
max_grad_norm = 1.0
delta = 1e-5
target_epsilon = 50.0
cox_per_term = true  # a Cox model: its epsilon bounds one loss term
"""


def test_ml_engineer_submits_watches_and_fetches_the_onnx_model_and_report(operator):
    """Three hospitals (Fed-TCGA-BRCA centres 0-2) with DP-SGD and SecAgg+: the job is
    submitted, followed round by round and fetched with the CLI; the ONNX model
    computes the final weights' risk score, the report holds every round and its plots,
    and the final model's evaluation on each site's held-out test split."""
    sites = hospitals(operator, 3)
    plan = operator.tmp / "plan.toml"
    plan.write_text(PLAN)
    r = fedge(*operator.console, "jobs", "submit", str(plan))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()

    r = fedge(*operator.console, "--operator", "viewer", "jobs", "watch", job, "--interval",
              "0.5", "--max-wait", "240", timeout=480)
    assert r.returncode == 0, r.stdout + r.stderr + operator.log("coordinator")
    lines = r.stdout.splitlines()
    committed = [line for line in lines if " committed in " in line]
    assert [line.split()[1] for line in committed] == ["1/3", "2/3", "3/3"], lines
    assert all("3 of 3 site(s)" in line and "val c_index" in line for line in committed)
    tested = [line for line in lines if line.startswith("final test (round 3's model")]
    assert len(tested) == 1 and "c_index" in tested[0] and "over 3 site(s)" in tested[0], lines
    assert f"job {job} completed" in lines
    assert lines[-1].startswith("results ready: ") and "report.md" in lines[-1]

    out = operator.tmp / "results"
    r = fedge(*operator.console, "--operator", "viewer", "jobs", "fetch", job, "--out",
              str(out))
    assert r.returncode == 0, r.stderr
    got = out / job
    for name in ("final.safetensors", "model.onnx", "report.md", "report.json",
                 "learning_curve.png", "privacy.png"):
        assert (got / name).is_file(), (name, sorted(p.name for p in got.iterdir()))
    for png in ("learning_curve.png", "privacy.png"):
        assert (got / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((got / "report.json").read_text())
    assert [a["round"] for a in report["attempts"] if a["status"] == "committed"] == [1, 2, 3]
    assert set(report["privacy"]) == set(sites)  # each site's DP-SGD spend, per round
    assert all(0 < v[-1][1] <= 50.0 for v in report["privacy"].values())
    # a Cox model's DP-SGD epsilon bounds a loss term, not a record: the report says so
    assert report["privacy_bound"] == "per loss term, not a record-level bound"
    assert "Epsilon per loss term, not a record-level bound." in (got / "report.md").read_text()
    # DP noise is fresh at each site on every run (nobody can subtract it), so no quality
    # bar here (bench/ measures quality); the report's final C-index is round 3's
    # size-weighted evaluation, the figure `jobs watch` printed for that round
    final = report["final"]["c_index"]["aggregate"]
    assert [r["value"] for r in report["metrics"] if r["round"] == 3 and r["site"] == "*"
            and r["name"] == "c_index" and r["split"] == "val"] == [final] and 0.0 <= final <= 1.0
    assert f"c_index {final:.4f}" in committed[-1]
    # the final test: round 3's model once on each site's test split, apart from val
    assert report["eval_split"] == "val" and report["final_test"]["round"] == 3
    test = report["final_test"]["metrics"]["c_index"]
    assert set(test["sites"]) == set(sites) and f"c_index {test['aggregate']:.4f}" in tested[0]
    assert "## Final test: round 3's model on each site's `test` split" in \
        (got / "report.md").read_text()

    import onnxruntime as ort
    from safetensors.numpy import load_file

    weights = load_file(str(got / "final.safetensors"))["weights"]
    session = ort.InferenceSession(str(got / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 39)).astype(np.float32)
    (risk,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(risk.reshape(-1), x @ weights[:39] + weights[39], rtol=1e-4,
                               atol=1e-4)


def test_a_site_revoked_by_the_operator_is_left_out_and_the_others_train_securely(operator):
    """Hospital IT revokes one of three appliances: it is dropped at once, the others
    take the console's newer roster (without it) from the coordinator, and the next
    SecAgg job runs with the two that remain."""
    sites = hospitals(operator, 3)
    r = fedge(*operator.console, "revoke", "hospital-2")
    assert r.returncode == 0, r.stderr
    end = time.monotonic() + 30
    while time.monotonic() < end and not all(
            "roster serial 4 in force: 2 site(s)" in operator.log(f"agent-{s}")
            for s in sites[:2]):
        time.sleep(0.3)
    for s in sites[:2]:
        assert "roster serial 4 in force: 2 site(s)" in operator.log(f"agent-{s}")
    plan = operator.tmp / "plan.toml"
    plan.write_text(PLAN.replace("min_clients = 3", "min_clients = 2"))
    r = fedge(*operator.console, "jobs", "submit", str(plan))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    r = fedge(*operator.console, "jobs", "watch", job, "--interval", "0.5", "--max-wait",
              "240", timeout=480)
    assert r.returncode == 0, r.stdout + r.stderr + operator.log("coordinator")
    committed = [line for line in r.stdout.splitlines() if " committed in " in line]
    assert len(committed) == 3 and all("2 of 2 site(s)" in line for line in committed)
    fleet = {a["site_id"]: a for a in operator.viewer.call("fleet")[0]}
    assert fleet["hospital-2"]["status"] == "revoked" and not fleet["hospital-2"]["connected"]
