"""The admin channel over real CurveZMQ: operator keys, admin/viewer roles, and the
coordinator's admin API (real Coordinator, real SQLite) behind it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from fedge.console.client import AdminClient, AdminError
from fedge.console.enrolment import create_enrolment
from fedge.update.files import curve_keypair

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 2
min_clients = 2
seed = 7

[model]
name = "cox_linear"
params = { in_features = 39 }

[train]
epochs = 1
batch_size = 32
optimizer = "sgd"
learning_rate = 0.01

[strategy]
name = "fedavg"
"""


def enrol(server, site):
    _, e = create_enrolment(server.console, site, valid_for=timedelta(days=1))
    server.client("admin").call("enrol", *server.console.enrol_request(site))
    return e


def test_admin_enrols_and_both_roles_see_the_fleet(server):
    enrol(server, "hospital-a")
    enrol(server, "hospital-b")
    for who in ("admin", "viewer"):
        fleet, _ = server.client(who).call("fleet")
        assert [a["site_id"] for a in fleet] == ["hospital-a", "hospital-b"]
        assert all(a["status"] == "enrolled" and a["connected"] is False for a in fleet)
    who, _ = server.client("viewer").call("whoami")
    assert who == {"name": "viewer", "role": "viewer"}
    # the coordinator now holds the console-signed roster with both identities
    from fedge.secagg.keys import Roster

    roster = Roster.from_bytes(server.coordinator.roster, server.console.roster_public_key())
    assert set(roster.entries) == {"hospital-a", "hospital-b"}


@pytest.mark.parametrize(("op", "args"), [
    ("enrol", {"site": "x", "curve_public": "0" * 40, "ed25519_public": "00" * 32}),
    ("revoke", {"site": "hospital-a"}),
    ("jobs_submit", {"plan": PLAN}),
    ("jobs_cancel", {"job_id": "job-1"}),
    ("push", {"path": "model/x/1/model.onnx"}),
])
def test_viewer_cannot_change_anything(server, op, args):
    enrol(server, "hospital-a")
    with pytest.raises(AdminError, match=f"role 'viewer'; '{op}' needs role admin"):
        server.client("viewer").call(op, args)
    assert server.coordinator.fleet()[0]["status"] == "enrolled"
    assert server.coordinator.list_jobs() == []
    denied = server.coordinator.store.audit_log(action="admin.denied")
    assert denied and "viewer" in denied[-1]["actor"]


def test_unknown_operator_key_gets_no_answer(server):
    pub, sec = curve_keypair()
    stranger = AdminClient(server.console.admin_endpoint, server.console.coordinator_public_key,
                           pub, sec, timeout_s=1.0)
    with pytest.raises(TimeoutError, match="not accepted"):
        stranger.call("fleet")


def test_jobs_submit_list_status_cancel(server):
    admin = server.client("admin")
    job, _ = admin.call("jobs_submit", {"plan": PLAN})
    jobs, _ = server.client("viewer").call("jobs_list")
    assert [j["job_id"] for j in jobs] == [job["job_id"]]
    status, _ = admin.call("jobs_status", {"job_id": job["job_id"]})
    assert status["status"] == "queued" and status["rounds_planned"] == 2
    with pytest.raises(AdminError, match=r"jobs_fetch: .*\(queued\) has no results yet"):
        admin.call("jobs_fetch", {"job_id": job["job_id"]})
    admin.call("jobs_cancel", {"job_id": job["job_id"]})
    status, _ = admin.call("jobs_status", {"job_id": job["job_id"]})
    assert status["status"] == "cancelled"
    # a cancelled job will never have results: said so, not "yet"
    with pytest.raises(AdminError, match=r"jobs_fetch: .*\(cancelled\) has no results and "
                                         r"will not have any"):
        admin.call("jobs_fetch", {"job_id": job["job_id"]})


def test_bad_requests_are_answered_with_what_was_wrong(server):
    admin = server.client("admin")
    with pytest.raises(AdminError, match="unknown op 'reboot'"):
        admin.call("reboot")
    with pytest.raises(AdminError, match="jobs_submit"):
        admin.call("jobs_submit", {"plan": "[job]\nrounds = -1"})
    with pytest.raises(AdminError, match="missing or wrong argument: 'job_id'"):
        admin.call("jobs_status", {})
    with pytest.raises(AdminError, match=r"revoke: .*unknown site"):
        admin.call("revoke", {"site": "nowhere"})


def test_revoke_drops_the_site_from_allow_list_and_roster(server):
    enrol(server, "hospital-a")
    enrol(server, "hospital-b")
    dropped: list[str] = []
    server.coordinator.on_disconnect = dropped.append
    key_a = server.console.sites()["hospital-a"]["curve_public"]
    assert key_a in server.coordinator.store.allowed_keys()
    server.console.revoke_site("hospital-a")
    server.client("admin").call("revoke", {"site": "hospital-a"},
                                {"roster": server.console.roster().to_bytes()})
    assert dropped == ["hospital-a"]
    assert key_a not in server.coordinator.store.allowed_keys()
    from fedge.secagg.keys import Roster

    roster = Roster.from_bytes(server.coordinator.roster, server.console.roster_public_key())
    assert set(roster.entries) == {"hospital-b"}
