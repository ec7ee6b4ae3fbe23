"""What a write killed mid-way (SIGKILL, power cut) leaves in the agent's state
directory is removed when the agent next starts: the temporaries of a roster update
(state dir) and of the reveal log's first line or compaction (secagg/), and the health
probe's file of a process killed during its fsync. They used to stay for good (only
jobs/ and privacy/ were swept). Nothing else goes: a temporary a live writer holds, a
probe of a live process, a fresh temporary, a file of another name.

A real `fedge agent` process started on a state directory holding them
(tests/e2e's federation)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import Federation, wait_for

HOUR_AGO = time.time() - 3600


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)


def leftovers(sd):
    """(stale ones a restart must remove, ones it must keep, the held temporary's fd)."""
    (sd / "secagg").mkdir(parents=True, exist_ok=True)
    stale = [sd / ".roster.json.a1b2c3d4", sd / "secagg" / ".revealed.jsonl.k3j4h5g6",
             sd / f".fedge-health-probe-{_dead_pid()}-140223702890176"]
    live_probe = sd / f".fedge-health-probe-{os.getpid()}-1"  # this process is alive
    held = sd / "secagg" / ".revealed.jsonl.q1w2e3r4"  # a writer still at it
    other = sd / "secagg" / "notes.txt"
    keep = [live_probe, held, other]
    for p in stale + keep:
        p.write_bytes(b"half")
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    fresh = sd / ".roster.json.zzzzzzzz"  # written a moment ago: its writer may be at it
    fresh.write_bytes(b"half")
    keep.append(fresh)
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return stale, keep, fd


def test_the_sweep_removes_only_what_killed_writes_left(tmp_path):
    from fedge.agent.process import remove_stale_temps_of

    stale, keep, fd = leftovers(tmp_path)
    try:
        assert sorted(remove_stale_temps_of(tmp_path)) == sorted(stale)
    finally:
        os.close(fd)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_started_agent_removes_the_temporaries_killed_writes_left(tmp_path):
    fed = Federation(tmp_path / "fed")
    try:
        fed.add_site("a", [])
        fed.enrol_in_store()
        stale, keep, fd = leftovers(fed.root / "agents" / "a")
        fed.start_coordinator()
        agent = fed.start_agent("a")
        wait_for(lambda: "a" in fed.connected(), 60, "the agent's first heartbeat")
        assert [p.name for p in stale if p.exists()] == [], agent.output()
        assert all(p.exists() for p in keep)
        assert agent.stop(30) == 0, agent.output()
        os.close(fd)
    finally:
        fed.close()
