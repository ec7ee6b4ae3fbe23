"""The coordinator's diagnostics work when the disk is the problem. `fedge coordinator
status` opens the database read-only (it opened it read-write: "disk I/O error" on a
full disk, "attempt to write a readonly database" on a read-only one); `status` and
`audit` read a database a clean stop left without its -wal and -shm files on a disk
that cannot take them (SQLite's immutable=1, only where no coordinator runs); and a
coordinator started on a full disk says the disk is full, naming the directory and
the bytes free, not only "disk I/O error".

The disks are real: the state directory on its own small tmpfs, filled or remounted
read-only (skipped where a tmpfs cannot be mounted). The real CLI in subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

from fedge.coordinator.store import DB_NAME, Store, coordinator_running
from tests.coordinator.test_s17_coord_config_bom import provision
from tests.update.test_audit_crash_full_disk import fill, small_disk

REPO = Path(__file__).resolve().parents[2]


def fedge(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def _stopped_coordinator(tmp_path: Path, state_dir: Path) -> Path:
    """A state directory as a coordinator's clean stop leaves it (the database alone:
    SQLite removes its -wal and -shm at the last close), and its config file."""
    provision(tmp_path)
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\nprovision = "prov.json"\n'
                   'bind = "tcp://127.0.0.1:0"\n')
    store = Store(state_dir)
    store.create_job("job-1", "[job]\n", actor="test")
    store.close()
    assert sorted(p.name for p in state_dir.iterdir()) == [DB_NAME]
    return cfg


def _reads(cfg: Path) -> None:
    status = fedge("coordinator", "status", "--config", str(cfg))
    assert status.returncode == 0, status.stderr
    assert [j["job_id"] for j in json.loads(status.stdout)["jobs"]] == ["job-1"]
    audit = fedge("coordinator", "audit", "--config", str(cfg))
    assert audit.returncode == 0, audit.stderr
    assert "submit_job" in audit.stdout and '"job": "job-1"' in audit.stdout


def test_status_and_audit_read_the_database_on_a_full_disk(tmp_path):
    with small_disk(tmp_path / "st", "2m") as state_dir:
        cfg = _stopped_coordinator(tmp_path, state_dir)
        fill(state_dir)
        _reads(cfg)


def test_status_and_audit_read_the_database_on_a_read_only_file_system(tmp_path):
    with small_disk(tmp_path / "st", "2m") as state_dir:
        cfg = _stopped_coordinator(tmp_path, state_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        _reads(cfg)


def test_a_coordinator_started_on_a_full_disk_says_the_disk_is_full(tmp_path):
    with small_disk(tmp_path / "st", "2m") as state_dir:
        cfg = _stopped_coordinator(tmp_path, state_dir)
        fill(state_dir)
        out = fedge("coordinator", "run", "--config", str(cfg))
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().splitlines()[-1] == (
            f"fedge coordinator: cannot open database {state_dir / DB_NAME}: disk I/O "
            f"error; the file system holding {state_dir} is full (0 bytes free)")
        _reads(cfg)  # what the failed start left beside it does not stop the reads


HOLD = """
import sys, time
from pathlib import Path
from fedge import instance_lock
instance_lock.hold(Path(sys.argv[1]), "coordinator")
print("held", flush=True)
time.sleep(60)
"""


def test_a_running_coordinator_is_seen_without_taking_its_lock(tmp_path):
    """What keeps the reads off immutable=1 while a coordinator may write: its lock, a
    lockf of coordinator.lock held by another process."""
    state = tmp_path / "st"
    state.mkdir()
    assert coordinator_running(state) is False
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert coordinator_running(state) is True
        assert coordinator_running(state) is True  # the test took nothing from it
    finally:
        holder.kill()
        holder.wait()
    assert coordinator_running(state) is False


def test_a_coordinator_on_a_read_only_file_system_is_seen_by_its_directory_lock(tmp_path):
    """There the lock file cannot be written, and the coordinator holds the directory
    (a flock: fedge.instance_lock._hold_read_only)."""
    state = tmp_path / "st"
    state.mkdir()
    dfd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert coordinator_running(state) is True
    finally:
        os.close(dfd)
    assert coordinator_running(state) is False
