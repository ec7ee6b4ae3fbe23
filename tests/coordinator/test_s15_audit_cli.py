"""`fedge coordinator audit` on the coordinator host: the audit log read from the
database opened read-only, while the coordinator runs and another connection holds
the write lock (WAL: readers are not blocked); a missing or damaged database is
refused in one line naming the file, and nothing is created. Real processes."""

from __future__ import annotations

import json
import sqlite3

from tests.coordinator.test_cli_one_per_state_dir import config, fedge, start, stop, wait_listening
from tests.coordinator.test_damaged_database import PLAN


def test_audit_reads_a_running_coordinators_database_read_only(tmp_path):
    state = tmp_path / "coord"
    cfg = config(tmp_path, "c", state)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    proc = start(cfg)
    writer = None
    try:
        wait_listening(proc, state / "endpoint", 0.0)
        submitted = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip()
        db = state / "coordinator.sqlite3"
        writer = sqlite3.connect(db, isolation_level=None, timeout=10)
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.execute("INSERT INTO audit(time, actor, action, detail) VALUES "
                       "(1800000000.0, 'hospital-a', 'task_refused', ?)",
                       ("no data\x1b]0;pwned\x07\x1b[2J",))
        # a write in progress: the read must neither wait for it nor see it
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO audit(time, actor, action, detail) VALUES "
                       "(1800000001.0, 'coordinator', 'uncommitted', '')")

        table = fedge("coordinator", "audit", "--config", str(cfg))
        assert table.returncode == 0, table.stderr
        assert "\x1b" not in table.stdout and "\x07" not in table.stdout
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["TIME", "ACTOR", "ACTION", "DETAIL"]
        actions = [line.split()[2] for line in lines[1:]]  # oldest first
        assert actions.index("submit_job") < actions.index("task_refused"), actions
        refused = lines[1 + actions.index("task_refused")]
        assert refused.split()[:2] == ["2027-01-15T08:00:00Z", "hospital-a"]
        assert refused.endswith("no data\\x1b]0;pwned\\x07\\x1b[2J")
        assert "uncommitted" not in table.stdout

        lines_json = fedge("coordinator", "audit", "--config", str(cfg), "--json",
                           "--job", job, "--action", "submit_job,job_cancelled")
        assert lines_json.returncode == 0, lines_json.stderr
        (entry,) = [json.loads(x) for x in lines_json.stdout.splitlines()]
        assert entry["action"] == "submit_job" and entry["detail"] == {"job": job}
        assert entry["actor"] == "cli"
        writer.execute("ROLLBACK")
        assert proc.poll() is None  # the coordinator ran on throughout
    finally:
        if writer is not None:
            writer.close()
        stop(proc)


def test_audit_refuses_a_missing_or_damaged_database_naming_it(tmp_path):
    state = tmp_path / "typo" / "coord"
    cfg = config(tmp_path, "c", state)
    db = state / "coordinator.sqlite3"
    out = fedge("coordinator", "audit", "--config", str(cfg))
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line == (f"fedge coordinator audit: no coordinator database at {db}: is "
                    "state_dir right? (`fedge coordinator run` creates it)"), line
    assert not (tmp_path / "typo").exists()  # nothing created

    state.mkdir(parents=True)
    db.write_bytes(b"not a database at all, " * 200)
    out = fedge("coordinator", "audit", "--config", str(cfg))
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"fedge coordinator audit: database {db} is corrupt: "), line
    assert db.read_bytes() == b"not a database at all, " * 200  # left as it was
