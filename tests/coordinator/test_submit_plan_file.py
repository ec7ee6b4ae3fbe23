"""`fedge coordinator submit FILE` reads the plan file as its byte-order mark says,
and refuses one that is not text in one line, exit 2 (docs/CONTRACTS.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedge.coordinator.store import Store
from tests.coordinator.test_damaged_database import PLAN, coordinator_config, fedge


def test_a_utf16_plan_is_submitted_and_one_without_a_mark_is_refused_in_one_line(
    tmp_path: Path,
) -> None:
    cfg, state = coordinator_config(tmp_path)
    plan = tmp_path / "plan.toml"
    plan.write_bytes(PLAN.encode("utf-16"))  # with its byte-order mark, as editors save it
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().splitlines()[-1]
    status = fedge("coordinator", "status", "--config", str(cfg), job)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "queued"
    store = Store(state)
    try:
        stored = store.job(job).plan_toml  # the text, without the mark, and a seed
        assert re.sub(r"\nseed = \d+  # chosen at submission", "", stored) == PLAN
    finally:
        store.close()
    plan.write_bytes(PLAN.encode("utf-16-le"))  # no mark: NULs between the characters
    out = fedge("coordinator", "submit", "--config", str(cfg), str(plan))
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()
    assert line.startswith("fedge coordinator submit: ") and str(plan) in line
