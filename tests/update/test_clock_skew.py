"""Signed updates when the console's, the coordinator's and the appliance's clocks
disagree: each party has its own clock here. An expired-metadata refusal must name
the clocks (a wrong clock reads like a freeze attack otherwise) and must not stick to
the roll-out once the clock is put right."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from fedge.agent.updates import (
    AgentUpdateClient,
    AgentUpdater,
    ZmqFetcher,
    handle_update_available,
    install_trusted_root,
)
from fedge.console.store import ConsoleStore
from fedge.coordinator.updates import UpdateRepository
from fedge.serve.repository import ModelRepository
from fedge.update.messages import UpdateAvailable, UpdateOutcome
from tests.update.conftest import tiny_onnx

REAL = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class World:
    """A console, a coordinator relay and an appliance, each with its own clock."""

    def __init__(self, tmp_path, *, console=REAL, coordinator=REAL, appliance=REAL) -> None:
        self.console_clock, self.coordinator_clock = Clock(console), Clock(coordinator)
        self.appliance_clock = Clock(appliance)
        self.console = ConsoleStore.init(tmp_path / "console",
                                         coordinator_endpoint="tcp://127.0.0.1:7000",
                                         clock=self.console_clock)
        self.coordinator_dir = tmp_path / "coordinator"
        self.repo = UpdateRepository.provision(
            self.coordinator_dir, root=self.console.root_bytes(),
            targets=self.console.targets_bytes(),
            snapshot_key=self.console.tuf_key("snapshot"),
            timestamp_key=self.console.tuf_key("timestamp"), clock=self.coordinator_clock)
        self.agent_dir = tmp_path / "agent"
        install_trusted_root(self.agent_dir, self.console.root_bytes())
        self.models = ModelRepository(tmp_path / "models")

    def publish(self, version: str) -> str:
        targets, files = self.console.sign_targets(
            [("model", "risk", version, "model.onnx", tiny_onnx(float(version)))])
        self.repo.publish(targets, files)
        [path] = files
        return path

    def ask(self, *asks: UpdateAvailable) -> list[UpdateOutcome]:
        """A fresh agent process's update client, fetching through the relay."""

        async def main() -> list[UpdateOutcome]:
            client: AgentUpdateClient

            async def send(body: object) -> None:
                if isinstance(body, UpdateOutcome):
                    return
                reply = self.repo.handle_fetch(body)  # type: ignore[arg-type]
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(client.handle(reply)))

            client = AgentUpdateClient(AgentUpdater(self.agent_dir, clock=self.appliance_clock),
                                       send, models=self.models, reply_timeout_s=5)
            for ask in asks:
                await client.handle(ask)
                await asyncio.wait_for(asyncio.gather(*client.tasks), 30)
            return client.outcomes

        return asyncio.run(main())


def test_a_coordinator_two_days_slow_is_named_and_the_roll_out_installs_once_fixed(tmp_path):
    """The coordinator's clock two days slow (a VM restored from a snapshot): the
    timestamp it signs expired a day ago for an appliance with the right time. The
    refusal names the appliance's clock, the role, its expiry and when its signer's
    clock signed it; asked again after the coordinator's clock is put right, the same
    roll-out installs, where it used to get the stored refusal again."""
    w = World(tmp_path, coordinator=REAL - 2 * DAY)
    path = w.publish("2")
    [refused] = w.ask(UpdateAvailable("r1", path))
    assert not refused.ok
    detail = refused.detail
    assert detail.startswith("ExpiredMetadataError: this appliance's clock reads "
                             "2026-11-01T12:00:00+00:00; timestamp metadata v"), detail
    assert "(signed by the coordinator) expired at 2026-10-31T12:00:00+00:00" in detail
    assert "signed at about 2026-10-30T12:00:00+00:00 by the coordinator's clock" in detail
    assert "fix it (NTP/RTC) and push again" in detail
    assert w.models.versions("risk") == []
    assert AgentUpdater(w.agent_dir).reported("r1") is None  # not kept as final

    w.coordinator_clock.now = REAL  # NTP puts it right; its tick re-signs the timestamp
    assert w.repo.refresh_timestamp()
    [again] = w.ask(UpdateAvailable("r1", path))  # the coordinator asks the roll-out again
    assert again.ok, again.detail
    assert w.models.versions("risk") == [1]
    assert AgentUpdater(w.agent_dir).reported("r1") == again


def test_other_refusals_stay_the_roll_outs_answer(tmp_path):
    """Only an expiry refusal is tried again: any other is kept, and a coordinator
    asking again gets it back without a fetch."""
    w = World(tmp_path)
    w.publish("2")
    ask = UpdateAvailable("r2", "model/risk/9/model.onnx")
    [first] = w.ask(ask)
    assert not first.ok and "not in the verified targets" in first.detail
    assert AgentUpdater(w.agent_dir).reported("r2") == first
    assert w.ask(ask) == [first]


def test_an_appliance_a_year_fast_is_told_its_clock_and_the_roots_expiry(tmp_path):
    w = World(tmp_path, appliance=REAL + 366 * DAY)
    path = w.publish("2")
    updater = AgentUpdater(w.agent_dir, ZmqFetcher(w.repo.handle_fetch), clock=w.appliance_clock)
    outcome = handle_update_available(updater, UpdateAvailable("r1", path), models=w.models)
    assert not outcome.ok
    assert ("this appliance's clock reads 2027-11-02T12:00:00+00:00; root metadata v1 "
            "(signed by the console) expired at 2027-11-01T12:00:00+00:00, 1 day 0 h before "
            "this clock's reading") in outcome.detail


def test_targets_expired_before_they_are_trusted_say_their_expiry_is_unknown(tmp_path):
    """python-tuf refuses expired targets before trusting them: the expiry cannot be
    read, and the refusal says so (and still names the clock)."""
    w = World(tmp_path, console=REAL - 100 * DAY, coordinator=REAL - 100 * DAY)
    path = w.publish("2")
    w.coordinator_clock.now = REAL
    assert w.repo.refresh_timestamp()
    updater = AgentUpdater(w.agent_dir, ZmqFetcher(w.repo.handle_fetch), clock=w.appliance_clock)
    outcome = handle_update_available(updater, UpdateAvailable("r1", path), models=w.models)
    assert outcome.detail.startswith(
        "ExpiredMetadataError: this appliance's clock reads 2026-11-01T12:00:00+00:00; "
        "targets metadata (signed by the console) is expired by this clock"), outcome.detail
    assert "its expiry could not be read" in outcome.detail
