"""A secure-aggregation abort's reason (TaskRefused for the round's aggregation, which
the coordinator keeps for good) names the kind of problem, never a path of the
appliance: here the site's reveal log lies under a folder named after a patient, and
cannot be read or written. The whole error, path included, is in the site's journal.
Real agents, the real SecAgg+ ServerSession played by the test (test_guard's Fleet)."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from tests.agent.test_guard import SITES, Fleet

WARD = "MRN0012345-oncology-ward"
A_PATH = "(a path on this appliance)"  # fedge.agent.trainer.A_PATH


def _journal(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_an_unreadable_reveal_log_aborts_naming_the_log_and_the_error_not_its_path(
        tmp_path: Path, caplog) -> None:
    root = tmp_path / WARD
    (root / "site-a" / "revealed.jsonl").mkdir(parents=True)  # a directory: unreadable
    with caplog.at_level(logging.WARNING, logger="fedge"):
        fleet = Fleet(tmp=root)

        async def round_():
            await fleet.train(SITES, "t1")
            return await fleet.aggregate(SITES, "t1")

        asyncio.run(round_())
    reason = fleet.refusals()["site-a"]
    assert reason == (
        f"RevealRefused: secure aggregation reveal log {A_PATH} cannot be read ([Errno 21] "
        "Is a directory); nothing is revealed until it can")
    assert WARD not in reason
    assert f"{root / 'site-a' / 'revealed.jsonl'} cannot be read" in _journal(caplog)


def test_a_reveal_log_that_cannot_be_written_aborts_with_the_errors_kind_only(
        tmp_path: Path, caplog) -> None:
    root = tmp_path / WARD
    fleet = Fleet(tmp=root)
    # after the log was opened, its folder is replaced by a file: the record of the
    # survivors cannot be written (EEXIST where its folder is made again; EROFS or
    # ENOSPC on a real appliance)
    shutil.rmtree(root / "site-a", ignore_errors=True)
    root.mkdir(exist_ok=True)
    (root / "site-a").write_text("not a directory\n")
    with caplog.at_level(logging.WARNING, logger="fedge"):

        async def round_():
            await fleet.train(SITES, "t1")
            return await fleet.aggregate(SITES, "t1")

        asyncio.run(round_())
    reason = fleet.refusals()["site-a"]
    assert reason == ("RevealRefused: cannot record the survivors this update is summed "
                      "over ([Errno 17] File exists); not revealing")
    assert WARD in _journal(caplog)


def test_paths_leave_a_text_and_what_is_not_a_path_stays() -> None:
    from fedge.agent.trainer import without_appliance_paths

    text = ("[Errno 28] No space left on device: '/srv/MRN0012345/x.json' -> "
            "'/srv/MRN0012345/y.json'; log /var/lib/fedge/secagg/revealed.jsonl is "
            "corrupt; 3 sites below min_cohort 4; delta >= 1/n; (n + alpha*n)/2; and/or")
    assert without_appliance_paths(text) == (
        f"[Errno 28] No space left on device; log {A_PATH} is corrupt; 3 sites below "
        "min_cohort 4; delta >= 1/n; (n + alpha*n)/2; and/or")
    # a path it is given goes too, relative or not
    assert without_appliance_paths("log state/secagg/x is corrupt", ["state/secagg/x"]) == (
        f"log {A_PATH} is corrupt")
