"""A site's privacy ledger charges the rounds its update was summed in, no more: real
`fedge coordinator` and `fedge agent` processes, DP-SGD and SecAgg+ on, agents killed
after training (SIGKILL) and restarted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedge.agent.trainer import ledger_path
from fedge.train.accounting import PrivacyLedger
from tests.e2e.test_federation import plan, rounds_of, wait_for_connected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DP = """[privacy]
min_site_examples = 40
dp = { noise_multiplier = 1.1, max_grad_norm = 1.0, delta = 1e-5, cox_per_term = true }
"""


# DP-SGD needs public standardisation constants (fedge.agent.trainer.
# refuse_fitted_standardisation); age is Fed-TCGA-BRCA's one continuous column. The
# fixture writes `key = json`, so the table goes in as a TOML dotted key.
BOUNDED = {"standardise": "bounds", "feature_bounds.age_at_index": [0, 120]}


def test_a_round_retried_after_its_first_attempt_failed_is_charged_once_per_site_summed(
        federation, brca):
    """Round 1's first attempt: all three sites train (each ledger gets a run), then
    site-1 and site-2 die on AggregateBegin, so site-0's masked input is never
    unmasked and the attempt fails. They restart; the retry and round 2 are summed.
    Each site's ledger then charges exactly the rounds its update was summed in: the
    lost attempt stays pending, shown apart by `fedge agent privacy`. (The ledger used
    to charge every run when it trained: site-0 paid for round 1 twice.)"""
    fed = federation(heartbeat=(0.5, 3.0))
    sites = {f"site-{i}": {**brca(i), **BOUNDED} for i in range(3)}
    for s, ds in sites.items():
        fed.add_site(s, [ds])
    fed.enrol_in_store()
    fed.start_coordinator()
    for s in sites:
        if s != "site-0":
            fed.env["FEDGE_TEST_KILL_ON"] = "aggregate_begin@1"
        fed.start_agent(s)
        fed.env.pop("FEDGE_TEST_KILL_ON", None)
    wait_for_connected(fed, set(sites))
    text = plan(rounds=2, min_clients=2, train_s=20, stage_s=3).replace(
        "[deadlines]", DP + "[deadlines]")
    job = fed.submit(text)
    for s in ("site-1", "site-2"):  # dead after training round 1: restart them
        assert fed.procs[s].p.wait(120) == -9, fed.dump()
        fed.procs[s].log.close()
        fed.start_agent(s)
    row = fed.wait_job(job, 150)
    assert row["status"] == "completed", fed.dump()

    rs = rounds_of(fed, job)
    assert (rs[0]["round"], rs[0]["status"]) == (1, "failed"), rs
    summed: dict[str, list[int]] = {s: [] for s in sites}
    for r in rs:
        if r["status"] == "committed":
            for s in json.loads(r["survivors_json"]):
                summed[s].append(r["round"])
    assert summed["site-0"] == [1, 2], rs
    ledgers = {s: PrivacyLedger.load(ledger_path(fed.root / "agents" / s)) for s in sites}
    for s, ledger in ledgers.items():
        charged = sorted(e["round"] for e in ledger.entries
                         if e.get("status", "released") == "released")
        assert charged == summed[s], (s, ledger.entries, rs)
        # every site trained round 1's first attempt; that run never left
        assert (1, 1) in [(e["round"], e["attempt"]) for e in ledger.pending(job=job)], s
    # what the coordinator was told for the last round is what the ledger charged
    last = {r["site"]: r["value"] for r in fed.query(
        "SELECT site, value FROM metrics WHERE job_id = ? AND round = 2 AND "
        "name = 'epsilon_job'", job)}
    for s in json.loads(rs[-1]["survivors_json"]):
        assert last[s] == pytest.approx(ledgers[s].epsilon(1e-5, job=job)), s

    out = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy", "--config",
                          str(fed.root / "agent-site-0.toml")],
                         capture_output=True, text=True, timeout=120, env=fed.env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:2] == [job, "2"]  # two rounds charged
    at = lines.index("pending (trained, never released; not counted in epsilon):")
    assert lines[at + 1].split() == [job, "round", "1", "attempt", "1"]
