"""A push the coordinator refuses publishes nothing: the console, told "refused",
keeps its targets version, so the next valid push is newer than the published one
(a refusal that still published wedged every later push as a "rollback")."""

from __future__ import annotations

import pytest

from fedge.console.cli import push
from fedge.console.client import AdminClient, AdminError
from tests.console.test_console_cli import Appliance, drive
from tests.update.conftest import tiny_onnx


@pytest.mark.parametrize("deadline_s", [-5.0, 0.0, float("nan"), float("inf")])
def test_a_push_refused_for_its_deadline_publishes_nothing_and_the_next_goes_through(
        tmp_path, make_server, deadline_s):
    server = make_server()
    app = Appliance(tmp_path, "h1", server)
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(2.0))
    before = server.updates.versions
    with pytest.raises(AdminError, match=r"deadline_s") as refused:
        push(server.console, client, f, kind="model", name="risk", version="1",
             sites=["h1"], deadline_s=deadline_s, wait=False)
    assert server.updates.versions == before and server.sent == []
    assert not server.coordinator.store.rollouts()
    assert "must be a finite number of seconds > 0" in str(refused.value)

    r = push(server.console, client, f, kind="model", name="risk", version="1",
             sites=["h1"], wait=False)
    assert r["state"] == "canary"
    drive(server, [app])
    r, _ = client.call("rollout_status", {"rollout_id": r["rollout_id"]})
    assert r["state"] == "succeeded", r
    assert app.models.path("risk", 1).read_bytes() == tiny_onnx(2.0)


def test_a_deadline_that_is_not_a_number_publishes_nothing(tmp_path, make_server):
    server = make_server()
    Appliance(tmp_path, "h1", server)
    client = AdminClient.from_store(server.console, "admin", timeout_s=5)
    f = tmp_path / "model.onnx"
    f.write_bytes(tiny_onnx(2.0))
    targets, files = server.console.sign_targets(
        [("model", "risk", "1", "model.onnx", f.read_bytes())], persist=False)
    [path] = files
    before = server.updates.versions
    with pytest.raises(AdminError, match=r"deadline_s") as refused:
        client.call("push", {"path": path, "sites": ["h1"], "deadline_s": "soon"},
                    {"targets.json": targets, **files})
    assert server.updates.versions == before and server.sent == []
    assert "deadline_s 'soon' is not a number of seconds" in str(refused.value)
