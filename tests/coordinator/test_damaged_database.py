"""A coordinator database with a damaged page past its header: every command says so
in one line naming the file, exit 2 (docs/CONTRACTS.md), never a traceback.

The damage is real: one page of the jobs table overwritten on disk, as a failing
disk or file system leaves it; the header and the schema page stay intact, so SQLite
opens the file and only the queries that touch the page fail.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from fedge.coordinator.store import Store
from fedge.secagg.keys import Identity
from fedge.transport import CurveKeyPair, save_keypair

REPO = Path(__file__).resolve().parents[2]
PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
[model]
name = "linear"
params = { in_features = 8 }
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
"""


def coordinator_config(tmp_path: Path) -> tuple[Path, Path]:
    """A coordinator config and its state dir, with one enrolled site and one job."""
    state = tmp_path / "coord"
    store = Store(state)
    store.enrol("a", "A" * 40, Identity.generate().public_bytes(), actor="test")
    store.create_job("job-1", PLAN, actor="test")
    store.close()
    _, secret = save_keypair(tmp_path / "keys", "coordinator", CurveKeyPair.generate())
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f'state_dir = "{state}"\nbind = "tcp://127.0.0.1:0"\n'
                   f'curve_key = "{secret}"\n'
                   f'roster_public_key = "{Identity.generate().public_bytes().hex()}"\n'
                   "tick_s = 0.02\n")
    return cfg, state


def damage_jobs_page(db: Path) -> None:
    """Overwrite the jobs table's root page with garbage, after moving every change
    out of the WAL into the file (so the page is read from where it is damaged)."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'jobs'"
                               ).fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xde\xad\xbe\xef" * (page_size // 4))


def fedge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_status_submit_enrol_and_run_refuse_a_damaged_page_in_one_line(tmp_path):
    cfg, state = coordinator_config(tmp_path)
    db = state / "coordinator.sqlite3"
    damage_jobs_page(db)
    before = db.read_bytes()
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    for action, args in [("status", ()), ("status", ("job-1",)), ("submit", (str(plan),)),
                         ("enrol", ("--site", "b", "--curve-public", "B" * 40,
                                    "--ed25519-public", "00" * 32))]:
        out = fedge("coordinator", action, "--config", str(cfg), *args)
        assert out.returncode == 2, (action, out.stderr)
        (line,) = out.stderr.splitlines()
        assert line.startswith(f"fedge coordinator {action}: cannot open database {db}: "), line
        assert line.endswith("(corrupt: restore it from a backup, or move it aside to "
                             "start empty)")
    out = fedge("coordinator", "run", "--config", str(cfg))
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"fedge coordinator: cannot open database {db}: ")
    assert line.endswith("(corrupt: restore it from a backup, or move it aside to start empty)")
    assert not (state / "endpoint").exists()
    assert db.read_bytes() == before  # nothing written, nothing "repaired"


def test_a_page_damaged_while_the_coordinator_runs_ends_it_in_one_line_exit_2(tmp_path):
    """The page goes bad under a running coordinator (its checks at start passed): the
    next query touching it ends the process with one line naming the file, exit 2."""
    cfg, state = coordinator_config(tmp_path)
    db = state / "coordinator.sqlite3"
    proc = subprocess.Popen([sys.executable, "-m", "fedge.cli", "coordinator", "run",
                             "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (state / "endpoint").exists() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)  # past its first ticks
        damage_jobs_page(db)
        # another writer's row moves the WAL on, so the coordinator's next read of the
        # jobs table comes from the file rather than from its page cache
        other = sqlite3.connect(db)
        other.execute("INSERT INTO audit(time, actor, action, detail) VALUES (0, 't', 't', '')")
        other.commit()
        other.close()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (f"fedge coordinator: database {db} is corrupt: database disk image is "
                    "malformed (restore it from a backup, or move it aside to start empty)")
