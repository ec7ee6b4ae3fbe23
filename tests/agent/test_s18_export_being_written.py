"""A hospital export still being written when a job's first task reads it (s18
eurocsv, finding 2). The trainer compared the file before and after a read, but only
when the read loaded: a file written in place fails as "truncated row" while its last
row is half written, and that went out as a plain data error, the export never said to
be in progress; a read that loaded from a file its writer had touched a moment before
said nothing either.

Now (fedge.agent.trainer.read_source): a read that fails on a file that changed during
it, or that changes within RECENT_WRITE_S of its last modification, is read again; a
file that keeps changing is refused saying it was being written and that an export
must be written under a temporary name and renamed into place (no path, no value); a
read that loads from a file modified under RECENT_WRITE_S before is kept and said at
WARNING (the data set named; no path, no value). A file that fails and stays still is
refused as before."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from fedge.agent import trainer as trainer_module
from fedge.agent.trainer import RECENT_WRITE_S, TaskRefusal, TorchTrainer

HEADER = "age,bmi,event,time\r\n"
ROWS = ["60,24.5,1,1500\r\n", "70,30.1,0,2100\r\n", "80,22.7,1,98765\r\n",
        "90,28.0,0,800\r\n"]
ADVICE = ("an export must be written under a temporary name and renamed into place once "
          "it is complete; a later task reads it again")


def trainer(path: Path) -> TorchTrainer:
    return TorchTrainer([{"name": "lims", "kind": "tabular", "path": str(path),
                          "task": "survival", "features": ["age", "bmi"], "event": "event",
                          "time": "time", "val_fraction": 0, "standardise": "none"}])


def aged(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_an_export_cut_mid_row_that_its_writer_completes_is_read_again_whole(tmp_path):
    """The LIMS flushed up to the middle of row 3, and finishes 0.5 s later: the first
    read fails ("truncated row"), the file changes while the trainer looks again, and the
    job reads it whole. (Before: refused, 'truncated row', at once.)"""
    path = tmp_path / "lims_export.csv"
    t = trainer(path)  # made first (it imports torch): the read follows the write at once
    whole = HEADER + "".join(ROWS)
    cut = whole.index("80,22") + 4
    path.write_bytes(whole[:cut].encode())

    def finish() -> None:
        time.sleep(0.5)
        with open(path, "ab") as f:
            f.write(whole[cut:].encode())

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        t.load_data("lims", job="job-1")
    finally:
        writer.join()
    assert t._site_data("lims", "job-1").train.y[:, 1].tolist() == [1500, 2100, 98765, 800]


def test_an_export_that_keeps_being_written_is_refused_saying_so(tmp_path, caplog):
    """A writer that appends a piece every 0.2 s, the file always ending mid-row: each
    read fails, and the file changes meanwhile. The reason says the export was being
    written, and how to write one; it names no path and no value."""
    path = tmp_path / "lims_export.csv"
    t = trainer(path)
    path.write_bytes((HEADER + ROWS[0] + "61,2").encode())
    stop = threading.Event()

    def keep_writing() -> None:
        i = 0
        while not stop.wait(0.2) and i < 100:  # at most 20 s
            with open(path, "ab") as f:  # the rest of a row, and half of the next
                f.write(f"4.5,1,1{i:03d}\r\n{62 + i % 30},2".encode())
            i += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="fedge.agent"), \
                pytest.raises(TaskRefusal) as info:
            t.load_data("lims", job="job-1")
    finally:
        stop.set()
        writer.join()
    reason = str(info.value)
    assert reason.startswith("data set 'lims' cannot be loaded: "), reason
    assert "being written" in reason and reason.endswith(ADVICE), reason
    assert str(tmp_path) not in reason and "1000" not in reason
    assert any("changed while it was read" in r.getMessage() for r in caplog.records)


def test_an_export_cut_mid_row_that_stays_still_is_refused_as_a_data_error(tmp_path):
    """Nothing tells a file whose writer stopped for good from a broken one: refused
    with the loader's reason alone, once the file has been still for RECENT_WRITE_S."""
    path = tmp_path / "lims_export.csv"
    t = trainer(path)
    path.write_bytes((HEADER + ROWS[0] + ROWS[1] + "80,22").encode())
    began = time.monotonic()
    with pytest.raises(TaskRefusal) as info:
        t.load_data("lims", job="job-1")
    assert time.monotonic() - began >= RECENT_WRITE_S / 4  # it looked again, once still
    reason = str(info.value)
    assert "truncated row" in reason and "being written" not in reason, reason


def test_a_read_of_a_file_modified_just_before_is_warned_of_naming_the_data_set(
        tmp_path, caplog, monkeypatch):
    """A writer between two writes can leave a file that reads as whole (a row cut
    inside its last field: time 98765 read as 98): kept, and said at WARNING, the
    data set named (not its path, as the trainer's other load lines), no value of it.
    A file modified longer before reads without a word. (Just before: within the hour
    here, so that this machine's speed does not decide it.)"""
    monkeypatch.setattr(trainer_module, "RECENT_WRITE_S", 3600.0)
    fresh = tmp_path / "fresh.csv"
    later = trainer(fresh)
    fresh.write_bytes((HEADER + "".join(ROWS[:2]) + "80,22.7,1,98").encode())
    still = tmp_path / "still.csv"
    still.write_bytes((HEADER + "".join(ROWS)).encode())
    aged(still, 86400)
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        trainer(still).load_data("lims", job="job-1")
        assert caplog.records == []
        later.load_data("lims", job="job-1")
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert message.startswith("data set 'lims': its file was modified "), \
        message
    assert "renamed into place" in message and str(tmp_path) not in message
    for value in ("24.5", "22.7", "1500", "98"):
        assert value not in message
