"""`fedge coordinator status` and `submit` on a state directory without a database (a
mistyped state_dir, the wrong config) refuse in one line naming the path, exit 2, and
create nothing: status showed an empty fleet, submit printed the id of a job no
coordinator would run. `coordinator run` still creates the database; then both work."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.coordinator.test_cli_one_per_state_dir import REPO, config, fedge, start, wait_listening
from tests.coordinator.test_damaged_database import PLAN


def test_status_and_submit_refuse_a_state_dir_without_a_database_run_creates_it(tmp_path):
    state = tmp_path / "typo" / "coord"
    cfg = config(tmp_path, "c", state)
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    db = state / "coordinator.sqlite3"
    for action, args in [("status", ()), ("status", ("job-1",)), ("submit", (str(plan),))]:
        out = fedge("coordinator", action, "--config", str(cfg), *args)
        assert out.returncode == 2, (action, out.stdout, out.stderr)
        assert out.stdout == ""
        (line,) = out.stderr.splitlines()
        assert line == (f"fedge coordinator {action}: no coordinator database at {db}: is "
                        "state_dir right? (`fedge coordinator run` creates it)"), line
    assert not (tmp_path / "typo").exists()

    proc = start(cfg)
    try:
        wait_listening(proc, state / "endpoint", 0.0)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert db.exists()
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    status = subprocess.run([sys.executable, "-m", "fedge.cli", "coordinator", "status",
                             "--config", str(cfg)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert status.returncode == 0, status.stderr
    assert [j["job_id"] for j in json.loads(status.stdout)["jobs"]] == [job]
