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


def test_update_available_is_fetched_over_the_link_installed_and_reported(
        fleet, tmp_path, make_onnx):
    fleet.publish("model", "risk", "4", "model.onnx", make_onnx(4.0))
    path = next(iter(fleet.repo.current_targets().signed.targets))
    models = ModelRepository(tmp_path / "models")
    to_coordinator: list[object] = []

    async def main() -> UpdateOutcome:
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
                                   models=models, reply_timeout_s=5)
        await client.handle(UpdateAvailable("r1", path))
        await asyncio.wait_for(asyncio.gather(*client.tasks), 30)
        return client.outcomes[-1]

    outcome = asyncio.run(main())
    assert outcome.ok, outcome.detail
    assert models.versions("risk") == [1]
    kinds = [type(b).__name__ for b in to_coordinator]
    assert kinds[-1] == "UpdateOutcome" and kinds.count("UpdateFetchRequest") >= 5


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
