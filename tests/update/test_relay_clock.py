"""The coordinator's relay and a console whose clocks disagree with the appliances':
provisioning refuses root or targets already expired by the coordinator's clock, the
relay says when what it signs or relays cannot serve by its clock, and refusals name
the clocks involved."""

from __future__ import annotations

import logging

import pytest

from fedge.console.store import ConsoleStore
from fedge.coordinator.updates import UpdateRepository, UpdateRepositoryError
from tests.update.conftest import tiny_onnx
from tests.update.test_clock_skew import DAY, REAL, Clock, World


@pytest.mark.parametrize(("behind", "role", "expired"), [
    (366 * DAY, "root", "2026-10-31T12:00:00+00:00"),
    (100 * DAY, "targets", "2026-10-22T12:00:00+00:00"),
])
def test_provision_refuses_metadata_already_expired_by_the_coordinators_clock(
        tmp_path, behind, role, expired):
    """A console whose clock was slow at `console init` signed root (a year) or targets
    (90 days) already expired: provisioning refuses it, naming both times, and writes
    nothing."""
    console = ConsoleStore.init(tmp_path / "console", coordinator_endpoint="tcp://x:1",
                                clock=Clock(REAL - behind))
    with pytest.raises(UpdateRepositoryError) as err:
        UpdateRepository.provision(
            tmp_path / "coordinator", root=console.root_bytes(),
            targets=console.targets_bytes(), snapshot_key=console.tuf_key("snapshot"),
            timestamp_key=console.tuf_key("timestamp"), clock=Clock(REAL))
    text = str(err.value)
    assert text.startswith(f"{role} metadata v1 from the console expired at {expired} by this "
                           "coordinator's clock, which reads 2026-11-01T12:00:00+00:00"), text
    assert "console's clock was slow" in text and "nothing was provisioned" in text
    assert not (tmp_path / "coordinator").exists()


def test_a_slow_coordinator_logs_that_the_timestamp_it_signs_is_already_expired(
        tmp_path, caplog):
    w = World(tmp_path, coordinator=REAL - 2 * DAY)
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator.updates"):
        w.publish("2")
    assert ("this coordinator's clock reads 2026-10-30T12:00:00+00:00, but the console "
            "signed targets v2 at about 2026-11-01T12:00:00+00:00 by its clock: the "
            "timestamp signed now expires at 2026-10-31T12:00:00+00:00") in caplog.text
    caplog.clear()
    w2 = World(tmp_path / "right")
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator.updates"):
        w2.publish("2")
    assert caplog.text == ""


def test_root_expired_by_the_coordinators_clock_is_named_when_it_re_signs_and_publishes(
        tmp_path, caplog):
    w = World(tmp_path)
    w.publish("2")
    w.coordinator_clock.now = w.console.root_expires() + DAY
    with caplog.at_level(logging.ERROR, logger="fedge.coordinator.updates"):
        assert w.repo.refresh_timestamp()
    assert ("root metadata v1 that this coordinator relays expired at "
            f"{w.console.root_expires().isoformat()} by its clock, which reads "
            f"{(w.console.root_expires() + DAY).isoformat()}") in caplog.text
    targets, files = w.console.sign_targets([("model", "risk", "3", "m.onnx", tiny_onnx(3.0))])
    with pytest.raises(UpdateRepositoryError, match=(
            "root metadata v1 expired at .* by this coordinator's clock, which reads "
            r".*the console's clock may be slow, or this coordinator's fast")):
        w.repo.publish(targets, files)
