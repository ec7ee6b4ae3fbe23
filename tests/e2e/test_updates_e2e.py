"""End to end, real processes on loopback: a coordinator (its admin channel and TUF
relay), three enrolled appliance agents, three `fedge serve` processes. The
console pushes a signed model update, canary first; every appliance verifies it
over its own ZeroMQ connection and serves the new version.

Also: a revoked appliance is dropped and refused on its next connection.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest

from fedge.agent.enrol import install_enrolment
from fedge.console.cli import push
from fedge.console.client import AdminClient
from fedge.console.enrolment import create_enrolment
from fedge.console.store import ConsoleStore
from fedge.serve.repository import ModelRepository
from tests.update.conftest import tiny_onnx

pytestmark = pytest.mark.e2e

SITES = ("h1", "h2", "h3")  # h4 is the one revoked

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def wait_for(what: str, predicate, timeout_s: float, interval_s: float = 0.2):
    end = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < end:
        try:
            last = predicate()
        except Exception as exc:  # not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


class Federation:
    def __init__(self, tmp: Path, coordinator_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        port = free_port()
        admin_port = free_port()
        self.console = ConsoleStore.init(
            tmp / "console", coordinator_endpoint=f"tcp://127.0.0.1:{port}",
            admin_endpoint=f"tcp://127.0.0.1:{admin_port}")
        self.coord_dir = tmp / "coordinator"  # TUF relay set up by the admin channel itself
        cfg = self.coord_config = tmp / "coordinator.toml"
        cfg.write_text(
            f'state_dir = "{self.coord_dir}"\nbind = "tcp://127.0.0.1:{port}"\n'
            f'provision = "{self.console.home / "coordinator-provision.json"}"\n'
            "tick_s = 0.02\n[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n"
            f'[admin]\nendpoint = "tcp://127.0.0.1:{admin_port}"\n')
        self.admin = AdminClient.from_store(self.console, "admin", timeout_s=10)
        self.coordinator = self.start_coordinator(coordinator_env)
        self.agents: dict[str, subprocess.Popen] = {}

    def start_coordinator(self, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`fedge coordinator` on this federation's config (and state), up to its admin
        channel answering; `env` adds to the environment (fault injection)."""
        p = self.spawn("coordinator", "coordinator", "--config", str(self.coord_config),
                       env=env)
        self.coordinator = p
        wait_for("the admin channel", lambda: self.admin.call("whoami")[0], 30)
        return p

    def spawn(self, name: str, *fedge_args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Run `fedge ARGS…` (the real command) with its output appended to <name>.log."""
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([sys.executable, "-m", "fedge.cli", *fedge_args], stdout=log,
                             stderr=subprocess.STDOUT, env={**self.env, **(env or {})})
        self.procs.append(p)
        return p

    def enrol(self, site: str) -> Path:
        path, _ = create_enrolment(self.console, site, valid_for=timedelta(days=1))
        self.admin.call("enrol", *self.console.enrol_request(site))
        state = self.tmp / site
        install_enrolment(path, state)
        (self.tmp / f"{site}.toml").write_text(
            f'state_dir = "{state}"\nhealth = false\n'
            "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n")
        return state

    def start_agent(self, site: str, *extra: str) -> subprocess.Popen:
        p = self.spawn(f"agent-{site}", "agent", "--config", str(self.tmp / f"{site}.toml"),
                       *extra)
        self.agents[site] = p
        return p

    def connected(self) -> set[str]:
        fleet, _ = self.admin.call("fleet")
        return {a["site_id"] for a in fleet if a["connected"]}

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One coordinator for the module: h1-h3 take the model push, h4 gets revoked."""
    fed = Federation(tmp_path_factory.mktemp("federation"))
    yield fed
    fed.close()


def start_server(fed: Federation, site: str, repo: Path) -> str:
    log = open(fed.tmp / f"serve-{site}.log", "wb")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "fedge.cli", "serve", "--repository",
                          str(repo), "--port", "0", "--poll-interval", "0.2"],
                         stdout=log, stderr=subprocess.STDOUT, env=fed.env)
    fed.procs.append(p)
    m = wait_for(f"fedge serve for {site}", lambda: re.search(
        r"listening on (http://\S+)", fed.log(f"serve-{site}")), 60)
    return m.group(1)


def infer(url: str, x: list[float]) -> tuple[str, list[float]]:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                                   "data": x}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/risk/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        out = json.loads(r.read())
    return str(out.get("model_version")), out["outputs"][0]["data"]


def test_push_model_update_to_three_agents_each_serves_new_version(federation):
    fed = federation
    urls = {}
    for site in SITES:
        state = fed.enrol(site)
        ModelRepository(state / "models").install("risk", tiny_onnx(2.0))  # version 1
        fed.start_agent(site)
        urls[site] = start_server(fed, site, state / "models")
    wait_for("three connected agents", lambda: set(SITES) <= fed.connected(), 60)
    for site in SITES:  # retried: a server under load may drop the very first request
        assert wait_for(f"{site} serving version 1",
                        lambda s=site: infer(urls[s], [1.0, 2.0]) == ("1", [2.0, 4.0]), 30)

    onnx_file = fed.tmp / "risk-v2.onnx"
    onnx_file.write_bytes(tiny_onnx(3.0))
    rollout = push(fed.console, fed.admin, onnx_file, kind="model", name="risk", version="2",
                   canary="h2", sites=list(SITES), deadline_s=60)
    assert rollout["state"] == "succeeded", (rollout, fed.log("agent-h2"))
    assert list(rollout["results"]) == ["h2", "h1", "h3"]  # canary first
    for site in SITES:
        assert wait_for(f"{site} serving version 2",
                        lambda s=site: infer(urls[s], [1.0, 2.0]) == ("2", [3.0, 6.0]), 20)


def infer_rows(url: str, model: str, rows: list[list[float]]) -> list[float]:
    body = json.dumps({"inputs": [{"name": "input", "shape": [len(rows), len(rows[0])],
                                   "datatype": "FP32",
                                   "data": [v for r in rows for v in r]}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["outputs"][0]["data"]


def test_a_pushed_federated_model_is_served_on_the_sites_raw_rows(federation):
    """A federated tabular model (its features standardised at each site with constants
    that never left it) pushed to an appliance that holds the data set: the appliance
    prepends its own standardisation, so its application sends raw rows and gets what
    the model gives on the rows as training saw them. An appliance without the data set
    reports a failed install naming it, and serves nothing new."""
    import numpy as np
    import torch

    from fedge.serve.export import export_onnx
    from fedge.serve.jobs import _site_preprocessing
    from fedge.train.api import DatasetSpec, load_site_data

    fed = federation
    names = ["age", "size"]
    csv = fed.tmp / "h5-rows.csv"
    rng = np.random.default_rng(5)
    csv.write_text("age,size,relapse\n" + "".join(
        f"{rng.normal(60, 9):.1f},{rng.gamma(2, 10):.2f},{int(rng.random() < 0.4)}\n"
        for _ in range(40)))
    table = {"name": "risk_rows", "kind": "tabular", "path": str(csv), "task": "binary",
             "features": names, "target": "relapse"}
    urls = {}
    for site in ("h5", "h6"):
        state = fed.enrol(site)
        if site == "h5":
            with open(fed.tmp / "h5.toml", "a") as f:
                f.write(f'[[datasets]]\nname = "risk_rows"\nkind = "tabular"\n'
                        f'path = "{csv}"\ntask = "binary"\nfeatures = {json.dumps(names)}\n'
                        'target = "relapse"\n')
        (state / "models").mkdir(exist_ok=True)
        fed.start_agent(site)
        urls[site] = start_server(fed, site, state / "models")
    wait_for("h5 and h6 connected", lambda: {"h5", "h6"} <= fed.connected(), 60)

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    onnx_file = fed.tmp / "relapse.onnx"
    export_onnx(model, torch.zeros(1, 2), {
        "feature_names": json.dumps(names),
        "preprocessing": json.dumps(_site_preprocessing("risk_rows", 1))}, onnx_file)
    rollout = push(fed.console, fed.admin, onnx_file, kind="model", name="relapse",
                   version="1", sites=["h5"], deadline_s=60)
    assert rollout["state"] == "succeeded", (rollout, fed.log("agent-h5"))

    raw = [[71.0, 35.5], [48.5, 6.25]]
    std = load_site_data(DatasetSpec.from_config(table)).standardiser
    with torch.no_grad():
        expected = model(torch.from_numpy(std.transform(np.array(raw, np.float32)))).numpy()
    got = wait_for("h5 serving relapse", lambda: infer_rows(urls["h5"], "relapse", raw), 20)
    np.testing.assert_allclose(np.ravel(got), np.ravel(expected), rtol=1e-5, atol=1e-5)

    refused = push(fed.console, fed.admin, onnx_file, kind="model", name="relapse",
                   version="2", sites=["h6"], deadline_s=60)
    assert refused["state"] == "failed", refused
    assert "'risk_rows'" in refused["results"]["h6"]["detail"], refused
    assert not list((fed.tmp / "h6" / "models").glob("relapse/*/model.onnx"))


def test_revoked_appliance_is_dropped_and_refused_on_its_next_connection(federation):
    fed = federation
    fed.enrol("h4")
    fed.start_agent("h4")
    wait_for("h4 connected", lambda: "h4" in fed.connected(), 60)
    others = fed.connected() - {"h4"}
    fed.console.revoke_site("h4")
    fed.admin.call("revoke", {"site": "h4"}, {"roster": fed.console.roster().to_bytes()})
    wait_for("h4 dropped", lambda: "h4" not in fed.connected(), 15)
    fleet = {a["site_id"]: a for a in fed.admin.call("fleet")[0]}
    assert fleet["h4"]["status"] == "revoked"
    assert fed.connected() == others  # nobody else was touched
    # the same appliance restarts with its keys: refused, it gives up with status 3
    fed.agents["h4"].terminate()
    fed.agents["h4"].wait(10)
    again = fed.start_agent("h4", "--connect-timeout", "5")
    assert again.wait(60) == 3, fed.log("agent-h4")
    assert "h4" not in fed.connected()


def test_an_outcome_lost_with_a_crashed_coordinator_is_asked_for_again(tmp_path):
    """The coordinator SIGKILLs itself as the canary's outcome arrives, before recording
    it. Restarted, it asks the canary again when it reconnects; the canary answers with
    the outcome it already reported, without installing twice, and the roll-out goes
    on to the other site instead of stopping at its deadline."""
    from fedge.coordinator.process import KILL_AT_ENV, KILL_ON_OUTCOME

    fed = Federation(tmp_path, coordinator_env={KILL_AT_ENV: KILL_ON_OUTCOME})
    try:
        repos = {}
        for site in ("h1", "h2"):
            repos[site] = ModelRepository(fed.enrol(site) / "models")
            repos[site].install("risk", tiny_onnx(2.0))  # version 1
            fed.start_agent(site)
        wait_for("two connected agents", lambda: {"h1", "h2"} <= fed.connected(), 60)
        onnx_file = tmp_path / "risk-v2.onnx"
        onnx_file.write_bytes(tiny_onnx(3.0))
        started = push(fed.console, fed.admin, onnx_file, kind="model", name="risk",
                       version="2", canary="h1", sites=["h1", "h2"], deadline_s=120,
                       wait=False)
        assert fed.coordinator.wait(60) == -9, fed.log("coordinator")
        assert repos["h1"].versions("risk") == [1, 2]  # installed, outcome sent and lost
        assert repos["h2"].versions("risk") == [1]

        fed.start_coordinator()
        rid = started["rollout_id"]
        done = wait_for("the roll-out to finish", lambda: (lambda s: s if s["state"] in (
            "succeeded", "failed") else None)(fed.admin.call(
                "rollout_status", {"rollout_id": rid})[0]), 60)
        assert done["state"] == "succeeded", (done, fed.log("agent-h1"))
        assert list(done["results"]) == ["h1", "h2"]
        assert repos["h1"].versions("risk") == [1, 2]  # not installed a second time
        assert repos["h2"].versions("risk") == [1, 2]
        installs = [json.loads(line) for line in
                    (tmp_path / "h1" / "updates" / "audit.jsonl").read_text().splitlines()]
        assert [(e["name"], e["version"]) for e in installs] == [("risk", "2")]
        assert f"roll-out {rid} asked again: sending the outcome already reported" in \
            fed.log("agent-h1")
    finally:
        fed.close()
