"""The report's plots are written as its other files are (fedge.update.files.
write_atomic: temporary file, fsync, rename, directory fsync), before report.md: a
power cut cannot leave report.md listing a torn or empty PNG. They used to be written
in place by Figure.savefig and never fsynced."""

from __future__ import annotations

import os

from fedge.coordinator.report import write_job_report
from tests.coordinator.test_report_contents import PLAN, _status


def test_plots_replace_the_old_file_by_rename_never_write_into_it(tmp_path):
    """A plot written in place (savefig to its name) rewrites the file the old name
    points at, so a hard link to it sees the new bytes (and a power cut, a torn file
    under the final name); written by rename, the old file is untouched."""
    status = _status(rounds=3, committed=3, test=False)
    for name in ("learning_curve.png", "privacy.png"):
        (tmp_path / name).write_bytes(b"the previous plot")
        os.link(tmp_path / name, tmp_path / f"{name}.old")
    write_job_report(tmp_path, status, PLAN.format(rounds=3))
    for name in ("learning_curve.png", "privacy.png"):
        assert (tmp_path / f"{name}.old").read_bytes() == b"the previous plot", name
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(f".{name}.")]
