"""Two machines holding one appliance's keys (an enrolment file copied, an appliance
cloned): real coordinator and agent processes on loopback. Each connection of one
supersedes the other's; the coordinator audits it with both addresses and the fleet
view shows the site as contested, where it used to show one quiet "connected"."""

from __future__ import annotations

import shutil

import pytest

from fedge.console.fleet import fleet_rows
from fedge.coordinator.store import Store
from tests.e2e.test_updates_e2e import Federation, wait_for

pytestmark = pytest.mark.e2e


def test_one_appliances_keys_on_two_machines_are_audited_and_shown_contested(tmp_path):
    fed = Federation(tmp_path)
    try:
        state = fed.enrol("h1")
        copy = tmp_path / "thief"
        shutil.copytree(state, copy)
        (tmp_path / "thief.toml").write_text(
            f'state_dir = "{copy}"\nhealth = false\n'
            "[heartbeat]\ninterval_s = 0.5\ntimeout_s = 3.0\n")
        fed.start_agent("h1")
        wait_for("h1 connected", lambda: "h1" in fed.connected(), 60)
        fed.spawn("agent-thief", "agent", "--config", str(tmp_path / "thief.toml"))

        def contested():
            fleet, _ = fed.admin.call("fleet")
            return next((a for a in fleet if a["site_id"] == "h1" and a.get("contested")),
                        None)

        row = wait_for("h1 shown contested", contested, 60)
        assert row["contested"]["times"] >= 3
        [line] = fleet_rows([row])
        assert "CONTESTED" in line[2]
        store = Store(fed.coord_dir)
        try:
            rows = store.audit_log(action="connection_superseded")
        finally:
            store.close()
        assert rows and all(r["actor"] == "h1" for r in rows)
        assert len(rows) <= 4  # throttled: not one fsync'd row per reconnect
    finally:
        fed.close()
