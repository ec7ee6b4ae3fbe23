"""What the health probe tells the coordinator (each heartbeat's eligibility reason,
which the coordinator keeps) names which probe failed and the error's kind, never a
path of the appliance; the whole error, path included, goes to the site's journal.

Run as root, whom chmod does not stop: a state directory that cannot be written is
made by putting a regular file where it belongs (ENOTDIR on the probe's create, as
EROFS would be on a file system remounted read-only)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.health import EligibilityPolicy, collect
from fedge.health.collect import STATE_DIR_PROBLEM
from fedge.wire import codec
from fedge.wire import messages as m

WARD = "MRN0012345-oncology-ward"  # a folder name the coordinator must never learn
CPU_ONLY = EligibilityPolicy(allow_cpu_only=True, min_free_disk_bytes=0,
                             min_available_memory_bytes=0)


def _heartbeat(agent: Agent) -> m.Heartbeat:
    """The heartbeat ``agent`` sends, decoded as the coordinator decodes it."""
    sent: list[list[bytes]] = []

    async def send(frames):
        sent.append([bytes(f) for f in frames])

    agent.send_frames = send
    asyncio.run(agent.heartbeat())
    (beat,) = [b for b in (codec.decode(f, max_bytes=1 << 20).body for f in sent)
               if isinstance(b, m.Heartbeat)]
    return beat


def test_a_state_dir_that_cannot_be_written_is_told_by_kind_and_probe_not_by_path(
        tmp_path: Path, caplog) -> None:
    state = tmp_path / WARD / "state"
    state.parent.mkdir()
    state.write_text("a file where the state directory should be\n")

    def probe():  # fedge.agent.process.health_probe, for a config with this state_dir
        report = collect(state)
        decision = CPU_ONLY.decide(report)
        return report.to_dict(), bool(decision.eligible), str(decision.reason)

    with caplog.at_level(logging.INFO, logger="fedge"):
        beat = _heartbeat(Agent("a", SyntheticTrainer("a"), health=probe))
    assert beat.eligible is False
    assert beat.reason == ("state directory cannot be written (the health probe could "
                           "not create a file in it): [Errno 20] Not a directory")
    assert WARD not in beat.reason
    # the report's one field naming the directory is its host reading's state_dir (the
    # configured directory, not an error's text): nothing else in it names the path
    health = json.loads(beat.health_json)
    assert health["host"].pop("state_dir") == str(state)
    assert WARD not in json.dumps(health)
    # the site's journal has the whole error, path included
    journal = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"state dir {state} cannot be written: " in line and WARD in line
               for line in journal), journal


def test_the_probes_failure_is_journalled_once_while_it_lasts(tmp_path: Path, caplog) -> None:
    state = tmp_path / WARD
    state.write_text("not a directory\n")
    with caplog.at_level(logging.INFO, logger="fedge.health"):
        first, again = collect(state), collect(state)
        state.unlink()
        state.mkdir()
        healed = collect(state)
    problems = [getattr(r, STATE_DIR_PROBLEM) for r in (first, again, healed)]
    assert problems[0] == problems[1] != "" and problems[2] == ""
    lines = [r.getMessage() for r in caplog.records]
    assert len([line for line in lines if "cannot be written" in line]) == 1, lines
    assert f"state dir {state} can be written again" in lines


def test_a_probe_that_raises_is_told_by_its_kind_and_journalled_with_the_path(
        tmp_path: Path, caplog) -> None:
    """A probe that fails outright (here a real stat of a directory gone): the heartbeat
    says which error, and the path stays in the site's journal."""
    gone = tmp_path / WARD / "gone"

    def probe():
        os.stat(gone)
        raise AssertionError("unreachable")

    with caplog.at_level(logging.WARNING, logger="fedge"):
        beat = _heartbeat(Agent("a", SyntheticTrainer("a"), health=probe))
    assert beat.eligible is False
    assert beat.reason == ("health probe failed: FileNotFoundError: [Errno 2] No such "
                           "file or directory")
    assert WARD not in beat.health_json
    assert any(WARD in r.getMessage() for r in caplog.records), caplog.records


def test_an_os_errors_kind_is_its_errno_and_strerror_without_its_file(tmp_path: Path) -> None:
    from fedge.health.collect import os_error_kind

    try:
        (tmp_path / WARD / "ledger.json").read_bytes()
    except OSError as exc:
        assert WARD in str(exc)
        assert os_error_kind(exc) == "[Errno 2] No such file or directory"
    assert os_error_kind(OSError("no errno")) == "OSError"
