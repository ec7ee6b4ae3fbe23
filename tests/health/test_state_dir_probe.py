"""The health report's "state dir writable" probe (fedge.health.collect.state_dir_problem):
a state directory that cannot be written makes the appliance not eligible, naming the
probe's step and the error (not the directory: the reason goes to the coordinator), on
the CPU-only path without NVML or XIDs as on any other.

These tests run as root, whom chmod does not stop, and mount nothing: a path that cannot
be written is made by replacing the state directory with a regular file (creating a
file under it fails with ENOTDIR, as it would with EROFS on a file system remounted
read-only: both are an OSError from the same create)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.health import EligibilityPolicy, collect
from fedge.wire import codec
from fedge.wire import messages as m

# what the agent's [eligibility] would say on a CPU-only box with little to spare
CPU_ONLY = EligibilityPolicy(allow_cpu_only=True, min_free_disk_bytes=0,
                             min_available_memory_bytes=0)


def test_a_state_dir_that_cannot_be_written_is_not_eligible_naming_it_and_the_error(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.write_text("a file where the state directory should be\n")
    report = collect(state)  # no NVML on this box, no XID monitor: the CPU-only path
    verdict = CPU_ONLY.decide(report)
    assert not verdict.eligible
    assert verdict.reason.startswith("state directory cannot be written (the health probe "
                                      "could not create a file in it): ")
    assert "Not a directory" in verdict.reason and str(state) not in verdict.reason


def test_a_writable_state_dir_stays_eligible_and_the_probe_leaves_nothing(
        tmp_path: Path) -> None:
    report = collect(tmp_path)
    verdict = CPU_ONLY.decide(report)
    assert verdict.eligible, verdict.reason
    assert list(tmp_path.iterdir()) == []
    # the report is the same plain data as before (the probe's outcome is not a field)
    assert "state_dir_problem" not in json.dumps(report.to_dict())


def test_the_agents_heartbeat_carries_the_probe_verdict(tmp_path: Path) -> None:
    """As fedge.agent.process.health_probe wires it: collect and decide on the agent's
    health-probe thread; the heartbeat says not eligible, and why."""
    state = tmp_path / "state"
    state.write_text("not a directory\n")

    def probe():  # fedge.agent.process.health_probe, for a config with this state_dir
        report = collect(state)
        decision = CPU_ONLY.decide(report)
        return report.to_dict(), bool(decision.eligible), str(decision.reason)

    agent = Agent("a", SyntheticTrainer("a"), health=probe)
    sent: list[list[bytes]] = []

    async def send(frames):
        sent.append([bytes(f) for f in frames])

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    hb = [codec.decode(f, max_bytes=1 << 20).body for f in sent]
    (beat,) = [b for b in hb if isinstance(b, m.Heartbeat)]
    assert beat.eligible is False
    assert "state directory cannot be written" in beat.reason
    assert str(state) not in beat.reason
