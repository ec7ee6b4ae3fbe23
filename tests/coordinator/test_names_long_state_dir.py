"""A state_dir too long for SQLite's path buffer is one clear error naming the path,
its length and the limit, not a raw "unable to open database file" traceback."""

from __future__ import annotations

import os

import pytest

from fedge.coordinator.store import DB_NAME, SQLITE_PATH_LIMIT, Store, StoreError


def _dir_of_db_length(root, length: int):
    """A directory under ``root`` whose database path is ``length`` bytes."""
    path = os.path.realpath(root)
    need = length - len(path) - 1 - len(DB_NAME)  # bytes of "/part/part..." to add
    parts = []
    while need > 0:
        take = min(200, need - 1)  # one part: a separator and `take` letters
        if need - (take + 1) == 1:  # would leave a lone separator
            take -= 1
        parts.append("d" * take)
        need -= take + 1
    d = os.path.join(path, *parts)
    assert len(os.fsencode(os.path.join(d, DB_NAME))) == length
    return d


def test_a_state_dir_too_long_for_sqlite_is_one_clear_error(tmp_path):
    ok = _dir_of_db_length(tmp_path / "ok", SQLITE_PATH_LIMIT)
    Store(ok).close()
    long = _dir_of_db_length(tmp_path / "long", SQLITE_PATH_LIMIT + 20)
    with pytest.raises(StoreError) as info:
        Store(long)
    msg = str(info.value)
    assert long in msg and f"is {SQLITE_PATH_LIMIT + 20} bytes" in msg
    assert f"past SQLite's limit of {SQLITE_PATH_LIMIT}" in msg and "state_dir" in msg
