"""The report's temporaries that a killed write leaves are swept when the coordinator
starts (checkpoint.remove_stale_temps, called by fedge.coordinator.process).

The report and its plots are written with fedge.update.files.write_atomic, whose
temporary is ".<name>.<mkstemp's 8 characters>"; before, the sweep matched only the
checkpoint's ".<name>.tmp-<pid>" and the export's ".<name>.onnx.<8>.tmp", so a
coordinator killed inside a report write left ".report.json.k3j4h5g6" for good."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time

from fedge.coordinator.checkpoint import remove_stale_temps, round_path, save_checkpoint
from tests.coordinator.test_checkpoint import make


def _temp_of(jdir, name):
    """A temporary named as write_atomic names the one for ``name``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=jdir)
    os.write(fd, b"partial")
    os.close(fd)
    return jdir / os.path.basename(tmp)


def test_report_temporaries_of_killed_writes_are_swept_and_nothing_else(tmp_path):
    path = round_path(tmp_path, "job-1", 3)
    save_checkpoint(path, make())
    jdir = path.parent
    start = time.time()
    hour_ago = start - 3600
    stale = [_temp_of(jdir, n) for n in ("report.json", "report.md", "learning_curve.png",
                                         "privacy.png")]
    held = _temp_of(jdir, "report.md")        # a live writer holds it (its flock)
    fresh = _temp_of(jdir, "report.json")     # written after this start
    other = _temp_of(jdir, "notes.txt")       # not a result file's
    for f in [*stale, held, other]:
        os.utime(f, (hour_ago, hour_ago))
    os.utime(fresh, (start + 1, start + 1))
    finished = jdir / "report.json"
    finished.write_text("{}")
    os.utime(finished, (hour_ago, hour_ago))
    fd = os.open(held, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = remove_stale_temps(tmp_path, older_than=start)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted(stale)
    assert not any(f.exists() for f in stale)
    assert held.exists() and fresh.exists() and other.exists() and finished.exists()
