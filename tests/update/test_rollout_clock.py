"""A roll-out's deadline runs on the coordinator's monotonic clock while it runs, so a
step of the wall clock (NTP, a VM resumed) neither fails an install still running nor
stretches the wait for a silent site; across a restart its saved state holds the
wall-clock time of the ask, so the downtime counts (fedge.update.rollout, module doc).
A real coordinator database; the two clocks are fakes the test steps apart."""

from __future__ import annotations

import json

import pytest

from fedge.coordinator.admin import AdminService
from fedge.coordinator.service import Coordinator
from fedge.update.messages import UpdateAvailable, UpdateOutcome
from fedge.update.rollout import Rollout

PATH = "model/risk/2/model.onnx"
WALL0 = 1_800_000_000.0  # the wall clock's time of the canary's ask


class Clocks:
    """A monotonic clock (``mono``, since this process's boot) and a wall clock that
    steps (``wall``)."""

    def __init__(self, mono: float, wall: float) -> None:
        self.m, self.w = mono, wall

    def mono(self) -> float:
        return self.m

    def wall(self) -> float:
        return self.w

    def run(self, seconds: float) -> None:
        self.m += seconds
        self.w += seconds


def saved_rollout(tmp_path, deadline_s: float = 300.0) -> Coordinator:
    """A coordinator database holding a roll-out whose canary was asked at WALL0."""
    coordinator = Coordinator(tmp_path / "c")
    rollout = Rollout("rollout-1", PATH, ["canary", "s2"], deadline_s=deadline_s)
    rollout.start(WALL0)
    coordinator.store.save_rollout(rollout.rollout_id, rollout.to_state())
    return coordinator


def test_a_step_of_the_wall_clock_fails_no_rollout_and_stretches_no_deadline(tmp_path):
    """Five seconds into the canary's install the wall clock jumps ten minutes ahead:
    the roll-out waits on, and the canary's success moves it to the next site; then the
    clock goes back an hour, and that site's deadline still passes 300 s after its ask.
    The saved state dates each ask by the wall clock."""
    coordinator = saved_rollout(tmp_path)
    clocks = Clocks(mono=500.0, wall=WALL0 + 5)
    sent: list[tuple[str, object]] = []
    service = AdminService(coordinator, {}, send=lambda site, body: sent.append((site, body)),
                           clock=clocks.mono, wall=clocks.wall)
    rollout = service.rollouts["rollout-1"]
    clocks.w += 600.0
    clocks.run(5.0)
    service.tick()
    assert (rollout.state, rollout.failure) == ("canary", "")
    service.on_outcome("canary", UpdateOutcome("rollout-1", PATH, True, False, "installed"))
    assert sent == [("s2", UpdateAvailable("rollout-1", PATH))]
    asked_s2 = clocks.wall()
    (saved,) = coordinator.store.rollouts()
    assert saved["waiting_since"] == asked_s2 and saved["waiting_for"] == "s2"
    clocks.w -= 3600.0
    clocks.run(299.0)
    service.tick()
    assert rollout.state == "rest"
    clocks.run(1.0)
    service.tick()
    assert rollout.state == "failed" and "s2 did not report" in rollout.failure
    failed = coordinator.store.audit_log(action="update.rollout_failed")
    assert [json.loads(a["detail"])["waiting_for"] for a in failed] == [None]
    coordinator.close()


@pytest.mark.parametrize(("down_s", "left_s"), [(100.0, 200.0), (-3600.0, 300.0)])
def test_a_restart_counts_the_downtime_by_the_wall_clock(tmp_path, down_s, left_s):
    """The coordinator restarts ``down_s`` (wall clock) after the canary's ask, its
    monotonic clock starting afresh: the deadline has ``left_s`` to run. A wall clock
    now before the ask (stepped back meanwhile) counts no downtime, never a negative
    one that would stretch the deadline."""
    coordinator = saved_rollout(tmp_path)
    coordinator.close()
    coordinator = Coordinator(tmp_path / "c")
    clocks = Clocks(mono=50.0, wall=WALL0 + down_s)  # a fresh boot's monotonic reading
    service = AdminService(coordinator, {}, send=lambda site, body: None,
                           clock=clocks.mono, wall=clocks.wall)
    rollout = service.rollouts["rollout-1"]
    clocks.run(left_s - 1.0)
    service.tick()
    assert rollout.state == "canary"
    clocks.run(1.0)
    service.tick()
    assert rollout.state == "failed" and "canary did not report" in rollout.failure
    coordinator.close()


def test_from_state_takes_both_clocks_or_neither():
    rollout = Rollout("r1", PATH, ["a"])
    rollout.start(10.0, 1000.0)
    state = rollout.to_state()
    assert state["waiting_since"] == 1000.0  # the wall clock's, as saved
    again = Rollout.from_state(state, now=7.0, wall=1004.0)
    again.tick(7.0 + 116.0 - 0.5)
    assert again.state == "canary"
    again.tick(7.0 + 116.0)
    assert again.state == "failed"
    with pytest.raises(ValueError, match="both now and wall"):
        Rollout.from_state(state, now=7.0)
