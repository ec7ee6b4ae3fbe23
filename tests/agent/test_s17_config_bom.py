"""agent.toml saved with a UTF-8 byte-order mark (Windows Notepad's "UTF-8 with BOM")
loads (s17 L3); it used to be "not valid TOML: Invalid statement (at line 1, column 1)".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedge.agent.process import AgentConfigError, load_config


def test_a_utf8_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b"\xef\xbb\xbfhealth = false\r\nworkers = 2\r\n")
    cfg = load_config(p)
    assert (cfg.health, cfg.workers) == (False, 2)


def test_utf16_is_still_refused_as_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes("health = false\n".encode("utf-16"))
    with pytest.raises(AgentConfigError, match="is not UTF-8 text: byte 0xff at offset 0"):
        load_config(p)


def test_a_byte_order_mark_anywhere_else_is_still_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_bytes(b"health = false\n\xef\xbb\xbfworkers = 2\n")
    with pytest.raises(AgentConfigError, match="not valid TOML"):
        load_config(p)
