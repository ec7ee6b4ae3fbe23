"""`fedge console jobs fetch` into a directory whose disk is full says which file it
could not write, and how many of the results it did write: it said only "fedge console:
[Errno 28] No space left on device".

The full disk is real: --out on its own small tmpfs, filled (skipped where a tmpfs
cannot be mounted). The real CLI, a real coordinator and its admin channel on loopback."""

from __future__ import annotations

import numpy as np

from fedge.cli import main
from tests.console.test_s16_fetch_results import _completed
from tests.update.test_audit_crash_full_disk import fill, small_disk


def test_fetch_into_a_full_disk_names_the_file_it_could_not_write(
        tmp_path, make_server, capsys):
    server = make_server()
    base, job = _completed(tmp_path, server, capsys,
                           np.array([0.3, -0.2, 0.1, 0.0], np.float32))
    with small_disk(tmp_path / "out", "1m") as out:
        (out / job).mkdir()
        fill(out)
        # no wait: final.safetensors is there, the rest still to be written
        assert main([*base, "jobs", "fetch", job, "--out", str(out), "--wait", "0"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        final = out / job / "final.safetensors"
        assert err[-1] == (f"fedge console: job {job}: cannot write {final}: No space left "
                           f"on device (0 of 1 result file(s) written to {out / job})"), err
