"""fedge.update.files: the shared state-file helpers."""

from __future__ import annotations

import logging

from fedge.update.files import set_aside

log = logging.getLogger("test.files")


def test_an_unreadable_file_is_set_aside_and_one_that_cannot_move_is_named(tmp_path, caplog):
    bad = tmp_path / "state.json"
    bad.write_text("{torn")
    assert set_aside(bad, log) == tmp_path / "state.json.corrupt"
    assert not bad.exists() and (tmp_path / "state.json.corrupt").read_text() == "{torn"

    stuck = tmp_path / "other.json"
    stuck.write_text("{torn")
    (tmp_path / "other.json.corrupt").mkdir()  # a non-empty directory is in the way
    (tmp_path / "other.json.corrupt" / "x").write_text("")
    with caplog.at_level(logging.ERROR, logger="test.files"):
        assert set_aside(stuck, log) == stuck
    assert stuck.read_text() == "{torn" and f"cannot move {stuck} aside" in caplog.text
