"""The agent's update client inside an asyncio agent: UpdateAvailable in, chunked
fetches out through the wire codec, outcome back — with the TUF client running
in an executor thread."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from fedge.agent.updates import AgentUpdateClient, AgentUpdater
from fedge.coordinator.admin import AdminService, Operator
from fedge.coordinator.service import Coordinator
from fedge.coordinator.updates import UpdateRepository, UpdateRepositoryError
from fedge.serve.repository import ModelRepository
from fedge.update.messages import UpdateAvailable, UpdateFetchRequest, UpdateOutcome
from fedge.wire import codec
from fedge.wire import messages as _registered  # noqa: F401  (registers the fetch pair)


def linked(fleet, models, to_coordinator: list, **kw) -> list[UpdateOutcome]:
    """Run one AgentUpdateClient (a fresh process's: new updater on the same state dir)
    over a link through the codec to the coordinator's relay; feed it the
    UpdateAvailables in ``kw["asks"]`` at once and return the outcomes it sent."""
    asks = kw.pop("asks")

    async def main() -> list[UpdateOutcome]:
        client: AgentUpdateClient

        async def send(body: object) -> None:  # the agent's connection, through the codec
            env = codec.decode(codec.encode(body, sender="h1"), max_bytes=1 << 21)
            to_coordinator.append(env.body)
            if isinstance(env.body, UpdateFetchRequest):
                reply = fleet.repo.handle_fetch(env.body)
                back = codec.decode(codec.encode(reply, sender="coordinator"),
                                    max_bytes=1 << 21)
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(client.handle(back.body)))

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   models=models, reply_timeout_s=5, **kw)
        for ask in asks:
            await client.handle(ask)
        await asyncio.wait_for(asyncio.gather(*client.tasks), 30)
        return client.outcomes

    return asyncio.run(main())


def test_update_available_is_fetched_over_the_link_installed_and_reported(
        fleet, tmp_path, make_onnx):
    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    to_coordinator: list[object] = []
    outcome, = linked(fleet, models, to_coordinator, asks=[UpdateAvailable("r1", path)])
    assert outcome.ok, outcome.detail
    assert models.versions("risk") == [1]
    kinds = [type(b).__name__ for b in to_coordinator]
    assert kinds[-1] == "UpdateOutcome" and kinds.count("UpdateFetchRequest") >= 5


def test_asked_again_the_agent_resends_its_outcome_and_installs_nothing_twice(
        fleet, tmp_path, make_onnx, caplog):
    """A coordinator that lost the outcome (crashed, or the connection died) asks
    again when the agent reconnects: the same outcome comes back, from disk across an
    agent restart, with no fetch and no second install. A second ask while the first
    install still runs starts nothing either."""
    import logging

    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    sent: list[object] = []
    ask = UpdateAvailable("r1", path)
    first = linked(fleet, models, sent, asks=[ask, ask])  # asked twice at once
    assert len(first) == 1 and first[0].ok and models.versions("risk") == [1]

    sent.clear()
    with caplog.at_level(logging.INFO, logger="fedge.agent.updates"):
        again = linked(fleet, models, sent, asks=[ask])  # a restarted agent
    assert again == first and sent == first  # nothing fetched, the same outcome
    assert "roll-out r1 asked again: sending the outcome already reported" in caplog.text
    assert models.versions("risk") == [1]
    assert len(AgentUpdater(fleet.agent_dir).audit_log()) == 1

    # an unreadable record is moved aside and named; the agent then finds the install
    # done by looking, and still installs nothing twice
    record = fleet.agent_dir / "updates" / "reported.json"
    record.write_text('[{"rollout_id": "r1", "ok": tr')
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="fedge.agent.updates"):
        third, = linked(fleet, models, [], asks=[ask])
    assert "reported.json is unreadable" in caplog.text
    assert (fleet.agent_dir / "updates" / "reported.json.corrupt").exists()
    assert third.ok and "already installed" in third.detail
    assert models.versions("risk") == [1]


def test_a_coordinator_naming_an_older_signed_model_or_app_gets_a_refusal_not_a_rollback(
        fleet, tmp_path, make_onnx, publisher):
    """A compromised coordinator that asks a site with nothing installed yet for model
    risk 1 and app cox 1, while 2 of each is signed, is refused by the agent itself
    (not only by an honest coordinator's push check), whether 1 is still listed (an
    earlier console's targets) or not; the newest installs."""
    import io
    import tarfile

    def app(version: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = f"version {version}".encode()
            info = tarfile.TarInfo("plan.toml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    old_model, new_model, old_app, new_app = (
        publisher(fleet, kind, name, version, file, data(version))
        for kind, name, file, data in (("model", "risk", "model.onnx",
                                        lambda v: make_onnx(float(v))),
                                       ("app", "cox", "app.tar.gz", app))
        for version in ("1", "2"))
    models = ModelRepository(tmp_path / "models")
    old = linked(fleet, models, [], asks=[UpdateAvailable("evil-1", old_model),
                                          UpdateAvailable("evil-2", old_app)])
    assert [(o.rollout_id, o.ok) for o in old] == [("evil-1", False), ("evil-2", False)]
    assert (f"model risk 1 is not the newest signed version: {new_model!r} is; refusing"
            in old[0].detail)
    assert f"app cox 1 is not the newest signed version: {new_app!r} is" in old[1].detail
    assert models.versions("risk") == [] and not (fleet.agent_dir / "apps").exists()
    assert AgentUpdater(fleet.agent_dir).installed() == {}
    assert [s.path for s in fleet.updater.pending()] == [new_app, new_model]

    new = linked(fleet, models, [], asks=[UpdateAvailable("r1", new_model),
                                          UpdateAvailable("r2", new_app)])
    assert all(o.ok for o in new), new
    assert models.path("risk", 1).read_bytes() == make_onnx(2.0)
    assert AgentUpdater(fleet.agent_dir).installed() == {"model/risk": "2", "app/cox": "2"}


def test_an_outcome_that_cannot_be_kept_on_disk_still_reaches_the_coordinator(
        fleet, tmp_path, make_onnx, caplog):
    """The appliance's updates/ directory cannot be written (here: a file stands in its
    place): the model installs, the outcome saying so is still sent (a record that
    cannot be written never changes what the coordinator is told), and the failure to
    keep it is named."""
    import logging

    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    (fleet.agent_dir / "updates").write_text("not a directory")
    sent: list[object] = []
    with caplog.at_level(logging.ERROR, logger="fedge.agent.updates"):
        outcome, = linked(fleet, ModelRepository(tmp_path / "m"), sent,
                          asks=[UpdateAvailable("r1", path)])
    assert outcome.ok and outcome.rollout_id == "r1"
    assert sent[-1] == outcome
    assert "cannot keep the outcome of roll-out r1" in caplog.text


def test_a_software_update_awaiting_its_restart_is_not_started_again(fleet, tmp_path):
    """Asked again while the staged version has not confirmed yet (or its outcome is
    not yet reported): the restarted version reports; nothing is staged twice."""
    from fedge.update.ab import OUTCOME, PENDING, SelfUpdate

    root = tmp_path / "software"
    root.mkdir()
    (root / PENDING).write_text(json.dumps({"version": "0.2.0", "rollout_id": "r7"}))
    (root / OUTCOME).write_text(json.dumps({"version": "0.1.9", "rollout_id": "r6"}))
    sent: list[object] = []
    outcomes = linked(fleet, ModelRepository(tmp_path / "m"), sent, self_update=SelfUpdate(
        root), restart=lambda: None, asks=[UpdateAvailable("r7", "software/fedge/0.2.0/b"),
                                           UpdateAvailable("r6", "software/fedge/0.1.9/b")])
    assert outcomes == [] and sent == []
    assert SelfUpdate(root).awaiting("r7") and not SelfUpdate(root).awaiting("r8")


def test_no_reply_from_the_coordinator_is_a_failed_outcome_not_a_hang(fleet, tmp_path):
    async def main() -> UpdateOutcome:
        async def send(body: object) -> None:  # a link that swallows everything
            return None

        client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send,
                                   models=ModelRepository(tmp_path / "m"), reply_timeout_s=0.3)
        await client.handle(UpdateAvailable("r1", "model/risk/1/model.onnx"))
        await asyncio.wait_for(asyncio.gather(*client.tasks), 10)
        return client.outcomes[-1]

    outcome = asyncio.run(main())
    assert not outcome.ok and "no reply within 0.3 s" in outcome.detail


def test_repository_from_provision_file_and_timestamp_kept_fresh(tmp_path, fleet):
    prov = fleet.console.provision()
    repo = UpdateRepository.from_provision(tmp_path / "c2", prov, clock=fleet.clock)
    assert repo.versions["timestamp"] == 1
    again = UpdateRepository.from_provision(tmp_path / "c2", prov, clock=fleet.clock)
    assert again.versions == repo.versions  # opened, not provisioned twice
    broken = json.loads(json.dumps(prov))
    del broken["tuf_online_keys"]["timestamp"]
    with pytest.raises(UpdateRepositoryError, match="timestamp"):
        UpdateRepository.from_provision(tmp_path / "c3", broken)

    coordinator = Coordinator(tmp_path / "c2")
    t = [0.0]
    service = AdminService(coordinator, {"k": Operator("admin", "admin")}, updates=repo,
                           clock=lambda: t[0])
    service.tick()  # fresh: nothing to do
    assert repo.versions["timestamp"] == 1
    fleet.clock.now += timedelta(hours=20)
    t[0] += 61
    service.tick()
    assert repo.versions["timestamp"] == 2
    assert coordinator.store.audit_log(action="update.timestamp_resigned")
    coordinator.close()


def test_agent_reads_version_skew_from_the_coordinator_version(fleet, caplog):
    from fedge import __version__
    from fedge.update.version import parse_version

    major, minor, _ = parse_version(__version__)

    async def send(body: object) -> None:
        return None

    client = AgentUpdateClient(AgentUpdater(fleet.agent_dir, clock=fleet.clock), send)
    assert client.note_coordinator_version(__version__).accepted
    ahead = client.note_coordinator_version(f"{major}.{minor + 1}.0")
    assert ahead.accepted and ahead.update_required
    refused = client.note_coordinator_version(f"{major}.{minor + 2}.0")
    assert not refused.accepted and __version__ in refused.reason
    assert "update required" in caplog.text and "refused" in caplog.text


def test_a_saved_rollout_that_cannot_be_resumed_is_named_and_the_rest_load(tmp_path, caplog):
    """The coordinator's database holds roll-outs across restarts; one whose saved
    state does not fit is logged by id and skipped, the others answer as before."""
    import logging

    from fedge.update.rollout import Rollout

    coordinator = Coordinator(tmp_path / "c")
    good = Rollout("rollout-good", "model/risk/2/model.onnx", ["h1", "h2"])
    good.start(100.0)
    coordinator.store.save_rollout(good.rollout_id, good.to_state())
    coordinator.store.save_rollout("rollout-bad", {**good.to_state(),
                                                    "rollout_id": "rollout-bad", "next": 7})
    coordinator.close()
    coordinator = Coordinator(tmp_path / "c")
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator"):
        service = AdminService(coordinator, {"k": Operator("admin", "admin")},
                               clock=lambda: 101.0)
    assert "rollout-bad" in caplog.text and "next=7" in caplog.text
    assert list(service.rollouts) == ["rollout-good"]
    service.on_outcome("h1", UpdateOutcome("rollout-good", good.path, True, False, "ok"))
    assert service.rollouts["rollout-good"].waiting_for == "h2"
    coordinator.close()
    reopened = Coordinator(tmp_path / "c")  # the outcome was saved as it came
    again = AdminService(reopened, {}, clock=lambda: 102.0)
    assert again.rollouts["rollout-good"].to_dict()["results"] == {
        "h1": {"ok": True, "rolled_back": False, "detail": "ok"}}
    reopened.close()


def test_the_awaited_site_is_asked_again_when_it_returns_and_audited(tmp_path):
    from fedge.update.rollout import Rollout

    coordinator = Coordinator(tmp_path / "c")
    rollout = Rollout("rollout-1", "model/risk/2/model.onnx", ["h1", "h2"])
    rollout.start(100.0)
    coordinator.store.save_rollout(rollout.rollout_id, rollout.to_state())
    sent: list[tuple[str, object]] = []
    service = AdminService(coordinator, {}, send=lambda site, body: sent.append((site, body)),
                           clock=lambda: 101.0)  # as a restarted coordinator loads it
    service.on_site_returned("h2")
    assert sent == []  # not its turn
    service.on_site_returned("h1")
    assert sent == [("h1", UpdateAvailable("rollout-1", "model/risk/2/model.onnx"))]
    audit, = coordinator.store.audit_log(action="update.reasked")
    assert audit["actor"] == "coordinator"
    assert json.loads(audit["detail"]) == {"rollout_id": "rollout-1", "site": "h1",
                                           "path": "model/risk/2/model.onnx",
                                           "why": "reconnected"}
    coordinator.close()
