"""`fedge console …` end to end against a real coordinator admin channel, and a
push rolled out to three appliances' real TUF clients (canary first)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import onnx

from fedge.agent.updates import (
    AgentUpdater,
    ZmqFetcher,
    handle_update_available,
    install_trusted_root,
)
from fedge.cli import main
from fedge.console.cli import push
from fedge.console.client import AdminClient
from fedge.console.store import ConsoleStore
from fedge.serve.repository import ModelRepository
from tests.update.conftest import tiny_onnx

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = 1
min_clients = 2

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




def test_init_through_the_real_command(tmp_path, port):
    home = tmp_path / "c"
    cmd = [sys.executable, "-m", "fedge.cli", "console", "--home", str(home), "init",
           "--coordinator", f"tcp://127.0.0.1:{port}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "console key fingerprint" in r.stdout
    assert (home / "coordinator-provision.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already holds a console" in r.stderr


def two_sites_enrolled(tmp_path, port, admin_port, make_server):
    """`console init`, a coordinator, hospital-a and hospital-b enrolled from the CLI:
    the console's base argv and the server."""
    home = tmp_path / "c"
    base = ["console", "--home", str(home), "--timeout", "5"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    server = make_server(home)
    for site in ("hospital-a", "hospital-b"):
        assert main([*base, "enrol", site]) == 0
    return base, server


def test_enrol_fleet_jobs_revoke_from_the_command_line(tmp_path, port, admin_port, make_server,
                                                        capsys):
    base, server = two_sites_enrolled(tmp_path, port, admin_port, make_server)
    out = capsys.readouterr().out
    assert "coordinator accepts hospital-b" in out
    assert (tmp_path / "c" / "enrolments" / "hospital-a.fedge-enrol").exists()

    assert main([*base, "--operator", "viewer", "fleet"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["SITE", "VERSION", "CONNECTED"]
    assert [line.split()[0] for line in table[1:]] == ["hospital-a", "hospital-b"]
    assert main([*base, "fleet", "--json"]) == 0
    assert {a["site_id"] for a in json.loads(capsys.readouterr().out)} == {"hospital-a",
                                                                           "hospital-b"}
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    job = capsys.readouterr().out.strip()
    assert main([*base, "jobs", "list"]) == 0
    assert job in capsys.readouterr().out
    assert main([*base, "jobs", "status", job]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "queued"
    assert main([*base, "jobs", "cancel", job]) == 0
    capsys.readouterr()

    # a viewer cannot revoke; an admin can, and the coordinator drops the site
    assert main([*base, "--operator", "viewer", "revoke", "hospital-a"]) == 1
    assert "needs role admin" in capsys.readouterr().err
    assert main([*base, "revoke", "hospital-b"]) == 0
    statuses = {a["site_id"]: a["status"] for a in server.coordinator.fleet()}
    assert statuses == {"hospital-a": "enrolled", "hospital-b": "revoked"}


def test_an_enrolment_the_coordinator_did_not_take_says_it_is_kept_and_sync_sends_it(
        tmp_path, port, admin_port, make_server, capsys):
    home = tmp_path / "c"
    base = ["console", "--home", str(home), "--timeout", "1"]
    assert main([*base, "init", "--coordinator", f"tcp://127.0.0.1:{port}",
                 "--admin-endpoint", f"tcp://127.0.0.1:{admin_port}"]) == 0
    capsys.readouterr()
    assert main([*base, "enrol", "h1"]) == 1  # no coordinator is running
    err = capsys.readouterr().err
    assert "h1 is enrolled in this console and its enrolment file is written" in err
    assert str(home / "enrolments" / "h1.fedge-enrol") in err
    assert "run `fedge console sync` once the coordinator is reachable" in err
    assert (home / "enrolments" / "h1.fedge-enrol").exists()
    assert main([*base, "enrol", "h1"]) == 1  # again: it points at sync, too
    assert "`fedge console sync` sends it" in capsys.readouterr().err

    server = make_server(home)
    assert main([*base, "--operator", "viewer", "enrol", "h2"]) == 1  # refused
    err = capsys.readouterr().err
    assert "needs role admin" in err and "h2 is enrolled in this console" in err
    assert main([*base, "sync"]) == 0
    assert "enrolled h1" in capsys.readouterr().out
    statuses = {a["site_id"]: a["status"] for a in server.coordinator.fleet()}
    assert statuses == {"h1": "enrolled", "h2": "enrolled"}


def test_fleet_survives_an_appliances_odd_health_report_and_escapes_its_text(
        tmp_path, port, admin_port, make_server, capsys):
    """An enrolled appliance's heartbeat is its own to shape: a GPU count where a list
    is due, text where numbers are due, terminal escape codes in its reason. The
    coordinator stores it; the operator's fleet table still prints every site, with
    the odd fields left out and the escape codes shown, not obeyed."""
    import time

    from fedge.wire import codec
    from fedge.wire import messages as m

    base, server = two_sites_enrolled(tmp_path, port, admin_port, make_server)
    capsys.readouterr()
    health = {"gpus": 3, "host": {"disk_total_bytes": "lots", "disk_free_bytes": 1},
              "xid_events": 5}
    # (a version with escape codes is refused by the coordinator before it is stored:
    # tests/wire/test_wire_hostile_values.py; the reason is stored as sent)
    from fedge import __version__

    hb = m.Heartbeat(site="hospital-a", version=__version__,
                     health_json=json.dumps(health), eligible=False,
                     reason="\x1b[31mGPU too hot\x1b[0m", datasets=[], current_task="")
    frames = [bytes(f) for f in codec.encode(hb, sender="hospital-a")]
    server.loop.call_soon_threadsafe(server.coordinator.handle_frames, "hospital-a", frames)
    for _ in range(100):
        if server.coordinator.store.appliance("hospital-a").last_seen is not None:
            break
        time.sleep(0.05)
    assert server.coordinator.store.appliance("hospital-a").health == health
    assert main([*base, "fleet"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    row = next(line for line in out.splitlines() if line.startswith("hospital-a"))
    assert "no GPU" in row and "XID" not in row and "disk" not in row
    assert "no: \\x1b[31mGPU too hot\\x1b[0m" in row and __version__ in row
    assert any(line.startswith("hospital-b") for line in out.splitlines())


class Appliance:
    """An enrolled appliance's update path: real TUF client over the coordinator relay."""

    def __init__(self, tmp_path, site, server, *, broken=False) -> None:
        self.site = site
        from datetime import timedelta

        from fedge.console.enrolment import create_enrolment

        create_enrolment(server.console, site, valid_for=timedelta(days=1))
        AdminClient.from_store(server.console, "admin", timeout_s=5).call(
            "enrol", *server.console.enrol_request(site))
        state = tmp_path / site
        install_trusted_root(state, server.console.root_bytes())
        self.updater = AgentUpdater(state, ZmqFetcher(server.updates.handle_fetch))
        models_root = tmp_path / f"{site}-models"
        if broken:  # a disk that cannot take the model: the install must fail cleanly
            models_root.write_text("not a directory")
        self.models = ModelRepository(models_root)


def drive(server, appliances) -> None:
    """Deliver each UpdateAvailable the coordinator sends and report the outcome back
    (the agent process does this over its connection)."""
    by_site = {a.site: a for a in appliances}
    while server.sent:
        site, msg = server.sent.pop(0)
        a = by_site[site]
        outcome = handle_update_available(a.updater, msg, models=a.models)
        server.call_in_loop(server.service.on_outcome, site, outcome)


def test_push_model_canary_first_then_all_serve_new_version(tmp_path, make_server):
    server = make_server()
    sites = ["h1", "h2", "h3"]
    apps = [Appliance(tmp_path, s, server) for s in sites]
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(tiny_onnx(3.0))
    r = push(server.console, client, onnx_file, kind="model", name="risk", version="2",
             canary="h2", sites=sites, wait=False)
    assert r["state"] == "canary" and [s for s, _ in server.sent] == ["h2"]
    drive(server, apps)
    r, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert r["state"] == "succeeded", r
    assert list(r["results"]) == ["h2", "h1", "h3"]
    for a in apps:
        assert a.models.versions("risk") == [1]
        assert onnx.load_from_string(a.models.path("risk", 1).read_bytes()) is not None
        assert a.models.path("risk", 1).read_bytes() == tiny_onnx(3.0)
    audit = [e["action"] for e in server.coordinator.store.audit_log()]
    assert "update.rollout_started" in audit and "update.rollout_succeeded" in audit


def test_push_stops_at_the_failed_canary(tmp_path, make_server):
    server = make_server()
    apps = [Appliance(tmp_path, "h1", server, broken=True), Appliance(tmp_path, "h2", server)]
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(5.0))
    r = push(server.console, client, f, kind="model", name="risk", version="1",
             sites=["h1", "h2"], wait=False)
    drive(server, apps)
    r, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert r["state"] == "failed" and "canary h1 failed" in r["failure"]
    assert list(r["results"]) == ["h1"]
    assert apps[1].models.versions("risk") == []  # never told to install


def test_a_restarted_coordinator_goes_on_with_the_rollout_in_flight(tmp_path, make_server):
    """The coordinator restarts while the canary installs; the canary's outcome arrives
    at the new process, which knows the roll-out from its database and goes on."""
    server = make_server()
    sites = ["h1", "h2", "h3"]
    apps = [Appliance(tmp_path, s, server) for s in sites]
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(7.0))
    r = push(server.console, server.client("admin"), f, kind="model", name="risk",
             version="3", canary="h2", sites=sites, wait=False)
    (site, msg), = server.sent
    assert site == "h2"
    outcome = handle_update_available(apps[1].updater, msg, models=apps[1].models)
    server.close()

    again = make_server(server.console.home)
    client = again.client("admin")
    status, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "canary" and status["waiting_for"] == "h2", status
    again.call_in_loop(again.service.on_outcome, "h2", outcome)
    assert [s for s, _ in again.sent] == ["h1"]
    drive(again, apps)
    status, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "succeeded" and list(status["results"]) == ["h2", "h1", "h3"]
    assert all(a.models.path("risk", 1).read_bytes() == tiny_onnx(7.0) for a in apps)
    finished = [e for e in again.coordinator.store.audit_log(action="update.rollout_succeeded")]
    assert len(finished) == 1


def test_an_ask_lost_on_a_live_connection_is_repeated_by_the_admin_loop(tmp_path,
                                                                         make_server):
    """The first UpdateAvailable is lost though the site never disconnected: the
    coordinator's admin loop asks again a quarter-deadline later, and the roll-out
    goes on instead of failing at its deadline."""
    import time

    server = make_server()
    apps = [Appliance(tmp_path, s, server) for s in ("h1", "h2")]
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(8.0))
    r = push(server.console, server.client("admin"), f, kind="model", name="risk",
             version="1", sites=["h1", "h2"], deadline_s=4, wait=False)
    lost = server.sent.pop(0)  # never delivered
    assert lost[0] == "h1" and server.sent == []
    end = time.monotonic() + 10
    while not server.sent and time.monotonic() < end:
        time.sleep(0.05)
    assert [s for s, _ in server.sent] == ["h1"] and server.sent[0][1] == lost[1]
    drive(server, apps)
    status, _ = server.client("admin").call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "succeeded", status
    why = [json.loads(e["detail"])["why"]
           for e in server.coordinator.store.audit_log(action="update.reasked")]
    assert why[0] == "no outcome 1 s after the last ask", why


def submitted(tmp_path, make_server, capsys):
    """A console and coordinator with one job submitted through the CLI (no appliance
    yet): (server, the CLI's leading arguments, the job id)."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    return server, base, capsys.readouterr().out.strip()


def test_jobs_watch_names_a_job_that_does_not_end_and_fails_for_a_cancelled_one(
        tmp_path, make_server, capsys):
    _, base, job = submitted(tmp_path, make_server, capsys)
    watch = [*base, "--operator", "viewer", "jobs", "watch", job, "--interval", "0.1"]
    # no appliance: it stays queued; giving up is not a failed job's 1
    assert main([*watch, "--max-wait", "0.5"]) == 3
    got = capsys.readouterr()
    assert f"job {job} is still queued (round 0 of 1 committed) after 0.5 s" in got.err
    assert got.out.splitlines() == [f"job {job} queued: 0 job(s) ahead of it"]  # said once
    plan = tmp_path / "second.toml"
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    second = capsys.readouterr().out.strip()
    assert main([*base, "--operator", "viewer", "jobs", "watch", second, "--interval", "0.1",
                 "--max-wait", "0.3"]) == 3
    assert capsys.readouterr().out.splitlines() == [f"job {second} queued: 1 job(s) ahead "
                                                    "of it"]
    assert main([*base, "jobs", "cancel", job]) == 0
    capsys.readouterr()
    assert main(watch) == 1  # says who cancelled it, and when
    assert re.fullmatch(rf"job {job} cancelled by operator:admin at "
                        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                        capsys.readouterr().out.splitlines()[-1])
    assert main([*base, "jobs", "watch", "job-nope"]) == 2  # not a failed job's 1
    assert "job-nope" in capsys.readouterr().err


def test_jobs_watch_says_when_a_completed_job_has_no_report(tmp_path, make_server, capsys):
    """The export or the report failed: watch stops waiting and says where to look."""
    from fedge.console.cli import watch_job

    server, _, job = submitted(tmp_path, make_server, capsys)
    server.call_in_loop(lambda: server.coordinator.store.set_job_status(job, "completed",
                                                                        actor="test"))
    client = server.client("viewer")
    lines: list[str] = []
    status = watch_job(client.call, job, interval_s=0.05, out=lines.append,
                       results_wait_s=0.3)
    assert status["status"] == "completed" and status["results"] == []
    assert lines[-2:] == [f"job {job} completed", "no report after 0.3 s (the coordinator's "
                          "audit log says why); results so far: none"]


def test_jobs_fetch_downloads_the_results(tmp_path, make_server, capsys):
    import numpy as np
    from safetensors.numpy import save

    from fedge.coordinator import checkpoint as ck

    server, base, job = submitted(tmp_path, make_server, capsys)
    jdir = ck.job_dir(server.coordinator.state_dir, job)
    final = save({"weights": np.arange(40, dtype=np.float32)})
    ck.atomic_write(jdir / "final.safetensors", final)
    ck.atomic_write(jdir / "final.onnx", tiny_onnx(1.5))
    out = tmp_path / "results"
    assert main([*base, "--operator", "viewer", "jobs", "fetch", job, "--out", str(out)]) == 0
    assert (out / job / "final.safetensors").read_bytes() == final
    assert (out / job / "final.onnx").read_bytes() == tiny_onnx(1.5)
    assert main([*base, "jobs", "fetch", "job-nope", "--out", str(out)]) == 1
    assert "jobs_fetch" in capsys.readouterr().err


def test_offline_enrolment_then_sync_and_a_revoked_key_cannot_rejoin(make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "enrol", "h1", "--offline"]) == 0
    assert server.coordinator.fleet() == []  # not told yet
    assert main([*base, "sync"]) == 0
    assert "enrolled h1" in capsys.readouterr().out
    assert [a["site_id"] for a in server.coordinator.fleet()] == ["h1"]
    assert main([*base, "sync"]) == 0  # idempotent
    assert "enrolled h1" not in capsys.readouterr().out
    old = ConsoleStore(server.console.home).sites()["h1"]  # as the CLI wrote it
    assert main([*base, "revoke", "h1"]) == 0
    # replaying the old identity's enrolment is refused by the coordinator
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    import pytest

    from fedge.console.client import AdminError

    with pytest.raises(AdminError, match="cannot rejoin"):
        client.call("enrol", {"site": "h1", "curve_public": old["curve_public"],
                              "ed25519_public": old["ed25519_public"]})
    # a new identity for the same site is fine
    assert main([*base, "enrol", "h1"]) == 0
    assert server.coordinator.fleet()[0]["status"] == "enrolled"
    assert server.coordinator.fleet()[0]["curve_public_z85"] != old["curve_public"]


def test_rotate_online_keys_through_the_admin_channel(make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "--operator", "viewer", "rotate-online-keys"]) == 1
    assert "needs role admin" in capsys.readouterr().err
    assert server.updates.versions["root"] == 1
    assert main([*base, "rotate-online-keys"]) == 0
    assert server.updates.versions["root"] == 2
    prov = json.loads((server.console.home / "coordinator-provision.json").read_text())
    assert json.loads(prov["tuf_root"])["signed"]["version"] == 2


def test_rotate_offline_keys_through_the_admin_channel_then_push_installs(
        tmp_path, make_server, capsys):
    server = make_server()
    app = Appliance(tmp_path, "h1", server)
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    before = server.console.tuf_key("targets").public_key().public_bytes_raw()
    assert main([*base, "--operator", "viewer", "rotate-keys", "--role", "targets"]) == 1
    assert "needs role admin" in capsys.readouterr().err
    assert server.console.tuf_key("targets").public_key().public_bytes_raw() == before
    assert main([*base, "rotate-keys", "--role", "targets", "--role", "root"]) == 0
    assert "new root and targets key(s) in force" in capsys.readouterr().out
    assert server.updates.versions["root"] == 2
    assert server.console.tuf_key("targets").public_key().public_bytes_raw() != before
    # the appliance enrolled under root v1 follows v2 and installs what the new key signs
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(4.0))
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    r = push(server.console, client, f, kind="model", name="risk", version="1",
             sites=["h1"], wait=False)
    drive(server, [app])
    status, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "succeeded", status
    assert app.models.path("risk", 1).read_bytes() == tiny_onnx(4.0)
    assert server.coordinator.store.audit_log(action="admin.rotate_offline_keys")


def test_push_to_a_site_that_is_not_enrolled_publishes_nothing(tmp_path, make_server):
    server = make_server()
    Appliance(tmp_path, "h1", server)
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(5.0))
    import pytest

    from fedge.console.client import AdminError

    before = server.updates.versions
    with pytest.raises(AdminError, match="'h9' is not an enrolled appliance"):
        push(server.console, client, f, kind="model", name="risk", version="1",
             sites=["h1", "h9"], wait=False)
    assert server.updates.versions == before and server.sent == []


def test_push_of_an_older_signed_version_is_refused_the_newest_may_go_again(
        tmp_path, make_server):
    """An admin key alone must not roll the fleet back: the console signs only the
    newest version of a target and will not sign an older one; the coordinator rolls
    out only a listed target that is the newest of its name, also under targets signed
    by an earlier console, which listed every version ever pushed."""
    import pytest

    from fedge.console.client import AdminError
    from fedge.console.store import ConsoleError
    from fedge.update import tuf_repo

    server = make_server()
    app = Appliance(tmp_path, "h1", server)
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "model.onnx"
    for version in ("1", "2"):
        f.write_bytes(tiny_onnx(float(version)))
        push(server.console, client, f, kind="model", name="risk", version=version,
             sites=["h1"], wait=False)
        drive(server, [app])
    signed = tuf_repo.to_bytes(server.updates.current_targets())
    [newest] = server.updates.current_targets().signed.targets
    assert newest.split("/")[2] == "2"
    old = newest.replace("/2/", "/1/")
    f.write_bytes(tiny_onnx(1.0))
    with pytest.raises(ConsoleError, match=r"model risk 1 is older than the signed model risk 2"):
        push(server.console, client, f, kind="model", name="risk", version="1", sites=["h1"],
             wait=False)
    before = server.updates.versions
    with pytest.raises(AdminError, match=r"is not in the signed targets"):
        client.call("push", {"path": old, "sites": ["h1"]}, {"targets.json": signed})
    # targets an earlier console signed, listing both versions
    listed = dict(server.updates.current_targets().signed.targets)
    listed[old] = tuf_repo.new_target_file("model", "risk", "1", "model.onnx", tiny_onnx(1.0))
    earlier = tuf_repo.to_bytes(tuf_repo.create_targets(
        server.console.tuf_key("targets"), listed, version=before["targets"] + 1,
        now=server.console.clock()))
    with pytest.raises(AdminError, match=r"model risk 1, but the signed targets also list 2"):
        client.call("push", {"path": old, "sites": ["h1"]},
                    {"targets.json": earlier, old: tiny_onnx(1.0)})
    assert server.updates.versions == before and server.sent == []
    again, _ = client.call("push", {"path": newest, "sites": ["h1"]},
                           {"targets.json": signed})
    assert again["path"] == newest and [s for s, _ in server.sent] == ["h1"]


def test_software_pushed_under_a_name_other_than_fedge_is_refused_before_anything_is_signed(
        tmp_path, make_server, capsys):
    """The appliance runs one software: under a second name an old version would not
    be older than anything installed under that name. The console says which name to
    use, and signs and sends nothing."""
    import pytest

    from fedge.console.store import ConsoleError

    server = make_server()
    Appliance(tmp_path, "h1", server)
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "fedge-1.0.0.tar.gz"
    f.write_bytes(b"a bundle")
    before, targets = server.updates.versions, server.console.targets_bytes()
    with pytest.raises(ConsoleError, match=r"--name 'fedge-agent' for --kind software.*"
                                           r"push it with --name fedge"):
        push(server.console, client, f, kind="software", name="fedge-agent",
             version="1.0.0", sites=["h1"], wait=False)
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    assert main([*base, "push", str(f), "--kind", "software", "--name", "agent",
                 "--version", "1.0.0", "--sites", "h1", "--no-wait"]) == 1
    assert "--name 'agent' for --kind software" in capsys.readouterr().err
    assert server.updates.versions == before and server.sent == []
    assert server.console.targets_bytes() == targets


def test_a_push_near_root_expiry_renews_root_and_the_console_shows_the_date(
        tmp_path, make_server, capsys):
    """Root expires a year after init. A push within 30 days of that carries root v+1
    (the same keys, a year more); the coordinator and then the fleet follow it."""
    from datetime import timedelta

    from fedge.update import tuf_repo

    server = make_server()
    app = Appliance(tmp_path, "h1", server)
    home = server.console.home
    base = ["console", "--home", str(home), "--timeout", "5"]
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(1.0))
    assert main([*base, "push", str(f), "--kind", "model", "--name", "risk",
                 "--version", "1", "--sites", "h1", "--no-wait"]) == 0
    v1_expires = ConsoleStore(home).root_expires()
    assert f"TUF root v1 expires {v1_expires.isoformat()}" in capsys.readouterr().out
    drive(server, [app])

    later = ConsoleStore(home, clock=lambda: v1_expires - timedelta(days=20))
    client = AdminClient.from_store(later, "admin", timeout_s=5)
    f.write_bytes(tiny_onnx(2.0))
    r = push(later, client, f, kind="model", name="risk", version="2", sites=["h1"],
             wait=False)
    drive(server, [app])
    status, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "succeeded", status
    assert server.updates.versions["root"] == 2
    assert ConsoleStore(home).state["root_version"] == 2
    assert ConsoleStore(home).root_expires() == v1_expires + timedelta(days=365)
    assert tuf_repo.load((app.updater.metadata_dir / "root.json").read_bytes(),
                         "root").signed.version == 2  # the appliance follows root v2
    provision = json.loads((home / "coordinator-provision.json").read_text())
    assert tuf_repo.load(provision["tuf_root"].encode(), "root").signed.version == 2


def console_killed(home, *command, at):
    """`fedge console …` as a real process that SIGKILLs itself at `at`
    ("before:OP" just before sending, "after:OP" once the coordinator replied)."""
    import os

    from fedge.console.cli import CONSOLE_KILL_ENV

    r = subprocess.run([sys.executable, "-m", "fedge.cli", "console", "--home", str(home),
                        "--timeout", "5", *command], capture_output=True, text=True,
                       timeout=120, env={**os.environ, CONSOLE_KILL_ENV: at})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)


def test_a_console_killed_after_the_coordinator_took_a_rotation_finishes_it_next_run(
        tmp_path, make_server, capsys):
    """The new keys exist only in the console's pending file when the coordinator (and
    so the fleet) already trusts them: the next run stores them, and root is taken once."""
    server = make_server()
    app = Appliance(tmp_path, "h1", server)
    home = server.console.home
    console_killed(home, "rotate-keys", "--role", "targets", "--role", "root",
                   at="after:rotate_offline_keys")
    assert server.updates.versions["root"] == 2  # in force at the coordinator
    assert ConsoleStore(home).state["root_version"] == 1  # and not stored by the console
    pending = home / "pending-rotation.json"
    assert pending.stat().st_mode & 0o777 == 0o600

    base = ["console", "--home", str(home), "--timeout", "5"]
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(6.0))
    # nothing is signed with the old targets key meanwhile
    assert main([*base, "push", str(f), "--kind", "model", "--name", "risk",
                 "--version", "1", "--no-wait"]) == 1
    assert "finish it before signing targets" in capsys.readouterr().err
    assert main([*base, "rotate-keys", "--role", "targets"]) == 0
    out = capsys.readouterr().out
    assert "finishing the rotation of root and targets key(s) to root v2" in out
    assert server.updates.versions["root"] == 2  # the same root, taken once
    assert ConsoleStore(home).state["root_version"] == 2 and not pending.exists()
    client = AdminClient.from_store(ConsoleStore(home), "admin", timeout_s=5)
    r = push(ConsoleStore(home), client, f, kind="model", name="risk", version="1",
             sites=["h1"], wait=False)
    drive(server, [app])
    status, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert status["state"] == "succeeded", status
    assert app.models.path("risk", 1).read_bytes() == tiny_onnx(6.0)


def test_a_console_killed_before_sending_a_rotation_sends_the_same_one_next_run(
        make_server, capsys):
    server = make_server()
    home = server.console.home
    console_killed(home, "rotate-online-keys", at="before:rotate_online_keys")
    assert server.updates.versions["root"] == 1
    kept = ConsoleStore(home).pending_rotation()
    assert kept is not None and kept.roles == ["snapshot", "timestamp"]
    assert main(["console", "--home", str(home), "--timeout", "5", "rotate-online-keys"]) == 0
    assert "finishing the rotation of snapshot and timestamp key(s)" in capsys.readouterr().out
    assert server.updates.versions["root"] == 2
    store = ConsoleStore(home)
    assert store.pending_rotation() is None
    assert store.tuf_key("snapshot").public_key().public_bytes_raw() == \
        server.updates._snapshot_key.public_key().public_bytes_raw()


def test_an_unfinished_rotation_is_kept_until_finished_and_abandoned_only_if_never_taken(
        tmp_path, make_server, capsys):
    server = make_server()
    home = server.console.home
    base = ["console", "--home", str(home), "--timeout", "5"]
    console_killed(home, "rotate-keys", "--role", "targets", at="before:rotate_offline_keys")
    # another kind of rotation waits for this one
    assert main([*base, "rotate-online-keys"]) == 1
    assert "run `fedge console rotate-keys` to finish it first" in capsys.readouterr().err
    # a viewer's refused attempt keeps it: an earlier send may have been taken
    assert main([*base, "--operator", "viewer", "rotate-keys", "--role", "targets"]) == 1
    err = capsys.readouterr().err
    assert "needs role admin" in err and "pending-rotation.json" in err
    # never taken (the coordinator is at root v1): it may be dropped
    assert main([*base, "rotate-keys", "--abandon"]) == 0
    assert "dropped the unfinished rotation of targets key(s) to root v2" in \
        capsys.readouterr().out
    assert ConsoleStore(home).pending_rotation() is None

    # taken by the coordinator (the console died after its reply): it may not be dropped
    console_killed(home, "rotate-keys", "--role", "root", at="after:rotate_offline_keys")
    assert main([*base, "rotate-keys", "--abandon"]) == 1
    assert "already holds root v2" in capsys.readouterr().err
    assert ConsoleStore(home).pending_rotation() is not None

    # the coordinator is down: the rotation is kept and finished once it is back
    server.close()
    assert main([*base, "--timeout", "1", "rotate-keys", "--role", "root"]) == 1
    assert "is kept in" in capsys.readouterr().err
    again = make_server(home)
    assert main([*base, "rotate-keys", "--role", "root"]) == 0
    assert again.updates.versions["root"] == 2 and ConsoleStore(home).pending_rotation() is None

    # an unreadable pending file is named and left in place (it holds keys)
    import pytest

    from fedge.console.store import ConsoleError

    (home / "pending-rotation.json").write_text('{"op": "rotate_offline_keys", "blo')
    with pytest.raises(ConsoleError, match=r"pending-rotation\.json is unreadable"):
        ConsoleStore(home).pending_rotation()
    assert main([*base, "rotate-keys", "--role", "targets"]) == 1
    assert "restore it from a backup" in capsys.readouterr().err
    assert (home / "pending-rotation.json").exists()


def test_a_plan_saved_as_utf16_or_utf8_with_a_bom_is_submitted_as_its_text(
        tmp_path, make_server, capsys):
    """Windows Notepad saves "Unicode" (UTF-16 LE with a BOM) or "UTF-8 with BOM"."""
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    for encoding in ("utf-16", "utf-8-sig"):
        plan = tmp_path / f"{encoding}.toml"
        plan.write_bytes(PLAN.encode(encoding))
        assert main([*base, "jobs", "submit", str(plan)]) == 0, capsys.readouterr().err
        job = capsys.readouterr().out.strip()
        stored = server.coordinator.store.job(job).plan_toml  # and a seed written in
        assert re.sub(r"\nseed = \d+  # chosen at submission", "", stored) == PLAN


def test_a_plan_file_that_is_not_text_is_refused_in_one_line_with_exit_2(
        tmp_path, make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    plan = tmp_path / "latin1.toml"
    plan.write_bytes((PLAN + "# résumé\n").encode("latin-1"))
    assert main([*base, "jobs", "submit", str(plan)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("fedge console: plan field <toml> = ") and str(plan) in err
    assert "not UTF-8 text: byte 0xe9" in err and "save the plan as UTF-8" in err
    assert server.coordinator.store.jobs() == []


def _declares(server, datasets_by_site):
    """Enrol each site on the coordinator and hand it the site's heartbeat declaring
    its data sets, as if the appliance had connected."""
    from fedge import __version__
    from fedge.wire import codec
    from fedge.wire import messages as m

    def go():
        for i, (site, datasets) in enumerate(sorted(datasets_by_site.items())):
            server.coordinator.enrol(site, f"{i:040d}", bytes(32), actor="test")
            beat = m.Heartbeat(site, __version__, "{}", True, "", datasets, "")
            server.coordinator.handle_frames(
                site, [bytes(f) for f in codec.encode(beat, sender=site)])
    server.call_in_loop(go)


def test_jobs_submit_refuses_a_data_set_no_site_declares_and_warns_of_too_few(
        tmp_path, make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    _declares(server, {"h1": ["fed_tcga_brca", "synth"], "h2": ["fed_tcga_brca"],
                       "h3": ["synth"]})
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace('"fed_tcga_brca"', '"fed_tcga_brac"'))
    assert main([*base, "jobs", "submit", str(plan)]) == 1
    got = capsys.readouterr()
    assert got.out == ""
    assert got.err == ("fedge console: jobs_submit: plan field job.dataset = "
                       "'fed_tcga_brac': no enrolled site declares this data set; the 3 "
                       "site(s) heard from declare 'fed_tcga_brca' (h1, h2), 'synth' (h1, "
                       "h3), and the 0 not heard from yet could not make "
                       "job.min_clients = 2 even if they all held it. Nothing was "
                       "submitted\n")
    assert server.coordinator.store.jobs() == []
    plan.write_text(PLAN.replace("min_clients = 2", "min_clients = 3"))
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    got = capsys.readouterr()
    job = got.out.strip()  # the id alone on stdout; the warning on stderr
    assert server.coordinator.store.job(job).status == "queued"
    assert got.err.startswith("warning: job.dataset 'fed_tcga_brca' is declared by 2 of the "
                              "3 site(s) heard from (h1, h2), fewer than job.min_clients = 3")


def test_jobs_list_shows_each_jobs_name_data_set_and_model(tmp_path, make_server, capsys):
    server = make_server()
    base = ["console", "--home", str(server.console.home), "--timeout", "5"]
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace("[job]\n", '[job]\nname = "brca baseline"\n'))
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    named = capsys.readouterr().out.strip()
    assert main([*base, "jobs", "submit", str(plan)]) == 0  # the same name again
    got = capsys.readouterr()
    again = got.out.strip()
    assert got.err == (f"warning: job.name 'brca baseline' is also the name of 1 queued or "
                       f"running job(s) ({named}): tell them apart by their ids\n")
    plan.write_text(PLAN)
    assert main([*base, "jobs", "submit", str(plan)]) == 0
    unnamed = capsys.readouterr().out.strip()
    assert main([*base, "--operator", "viewer", "jobs", "list"]) == 0
    table = [line.split("  ") for line in capsys.readouterr().out.splitlines()]
    table = [[cell.strip() for cell in row if cell.strip()] for row in table]
    assert table == [
        ["JOB", "NAME", "STATUS", "ROUND", "DATA SET", "MODEL", "SUBMITTED BY"],
        [named, "brca baseline", "queued", "0", "fed_tcga_brca", "cox_linear", "operator:admin"],
        [again, "brca baseline", "queued", "0", "fed_tcga_brca", "cox_linear", "operator:admin"],
        [unnamed, "–", "queued", "0", "fed_tcga_brca", "cox_linear", "operator:admin"]]


def test_a_missing_console_home_names_the_command_that_makes_it_as_it_must_be_typed(
        tmp_path, capsys):
    home = tmp_path / "console"
    assert main(["console", "--home", str(home), "enrol", "h1"]) == 1
    err = capsys.readouterr().err
    said = f"`fedge console --home {home} init --coordinator tcp://HOST:PORT`"
    assert said in err
    typed = said.strip("`").replace("tcp://HOST:PORT", "tcp://127.0.0.1:7700").split()[1:]
    assert main(typed) == 0 and (home / "console.json").is_file()
