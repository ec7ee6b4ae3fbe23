"""An appliance's /var/lib/fedge restored from an older backup: its privacy ledger and
reveal log go back together, which the appliance cannot see. The coordinator, which
keeps the most released runs each site reported in its heartbeats, can: real
`fedge coordinator` and `fedge agent` processes, the state dir copied as hospital IT
would (cp -a, agent running) and put back."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, wait_for
from tests.e2e.test_federation import plan, wait_for_connected

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

SITES = ("site-0", "site-1", "site-2")


def reported(fed, site):
    """The released runs ``site``'s last recorded heartbeat reported, or None."""
    rows = fed.query("SELECT health_json FROM appliances WHERE site_id = ?", site)
    return json.loads(rows[0]["health_json"]).get("privacy_ledger_released") if rows else None


def run_job(fed):
    # each job its own seed: the same one again is refused as a second sum of one update
    job = fed.submit(plan(rounds=1, min_clients=2, train_s=30, stage_s=10)
                     .replace("seed = 42\n", ""))
    row = fed.wait_job(job, 120)
    assert row["status"] == "completed", fed.dump()
    (survivors,) = [json.loads(r["survivors_json"]) for r in fed.query(
        "SELECT survivors_json FROM rounds WHERE job_id = ? AND status = 'committed'", job)]
    return job, sorted(survivors)


def restart_with(fed, site, copy):
    fed.procs[site].stop()
    fed.procs[site].log.close()
    shutil.rmtree(fed.root / "agents" / site)
    subprocess.run(["cp", "-a", str(copy), str(fed.root / "agents" / site)], check=True)
    fed.start_agent(site)


def status_fleet(fed):
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "status",
                          "--config", str(fed.root / "coordinator.toml")],
                         capture_output=True, text=True, env=fed.env, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return {a["site_id"]: a for a in json.loads(out.stdout)["fleet"]}


def test_an_appliance_restored_from_an_older_backup_is_left_out_until_its_newer_ledger_returns(
        federation, brca):
    fed = federation(heartbeat=(0.5, 5.0))
    for i, s in enumerate(SITES):
        fed.add_site(s, [brca(i)])
    fed.enrol_in_store()
    fed.start_coordinator()
    for s in SITES:
        fed.start_agent(s)
    wait_for_connected(fed, set(SITES))
    agent_dir = fed.root / "agents" / "site-0"

    _, survivors = run_job(fed)
    assert "site-0" in survivors
    wait_for(lambda: reported(fed, "site-0") == 1, 30, "site-0 to report 1 released run")
    backup = fed.root / "site-0.nightly"
    subprocess.run(["cp", "-a", str(agent_dir), str(backup)], check=True)

    _, survivors = run_job(fed)
    assert "site-0" in survivors
    wait_for(lambda: reported(fed, "site-0") == 2, 30, "site-0 to report 2 released runs")
    newer = fed.root / "site-0.newer"
    subprocess.run(["cp", "-a", str(agent_dir), str(newer)], check=True)

    # the disk dies; last night's backup is restored
    restart_with(fed, "site-0", backup)
    rolled = wait_for(lambda: fed.audit("privacy_ledger_rolled_back"), 60,
                      "the coordinator to see site-0's ledger rolled back")
    assert [json.loads(r["detail"]) for r in rolled] == [
        {"site": "site-0", "was": 2, "now": 1}]
    why = ("site-0's privacy ledger holds 1 released runs, fewer than the 2 it reported "
           "before (restored from a backup?)")
    site0 = status_fleet(fed)["site-0"]
    assert site0["eligible"] is False and site0["eligibility_reason"].startswith(why)
    assert site0["privacy_ledger"]["rolled_back"] is True
    # the site's journal says why it is left out
    wait_for(lambda: "site-0's privacy ledger holds 1 released runs, fewer than the 2"
             in fed.procs["site-0"].output(), 30, "site-0 to be told")
    assert "fedge console ledger-ack site-0" in fed.procs["site-0"].output()
    coord_log = fed.coordinator.output()
    assert sum("WARNING" in line and why in line for line in coord_log.splitlines()) == 1

    job3, survivors = run_job(fed)
    assert survivors == ["site-1", "site-2"], fed.dump()
    (left,) = fed.query("SELECT reasons_json FROM left_out WHERE job_id = ?", job3)
    assert json.loads(left["reasons_json"])["site-0"].startswith(why)
    # it released nothing over its cap's back: its own ledger, and its heartbeats (as
    # the database holds them: written with the next flush, HEARTBEAT_FLUSH_S)
    from fedge.train.accounting import PrivacyLedger

    assert PrivacyLedger.load(agent_dir / "privacy" / "ledger.json").released_count() == 1
    wait_for(lambda: reported(fed, "site-0") == 1, 30, "site-0's heartbeat to be written")

    # the newer ledger found and put back: a candidate again by itself
    restart_with(fed, "site-0", newer)
    wait_for(lambda: fed.audit("privacy_ledger_caught_up"), 60, "site-0 to catch up")
    _, survivors = run_job(fed)
    assert "site-0" in survivors, fed.dump()
    assert status_fleet(fed)["site-0"]["privacy_ledger"]["rolled_back"] is False
