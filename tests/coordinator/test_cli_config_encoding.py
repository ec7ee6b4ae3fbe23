"""A configuration that is not UTF-8 text (binary, or UTF-16 as Windows Notepad saves
it) is refused in one line naming the file and the byte, exit 2, by every command
that reads one: not a traceback with exit 1 (which systemd's Restart=on-failure
would restart in a loop), not a codec message without the file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

UTF16 = 'state_dir = "st"\n'.encode("utf-16")  # with its byte-order mark, 0xff first
BINARY = b"\x00\x92\xc3\x28 binary"


@pytest.mark.parametrize(("data", "byte", "offset"), [(UTF16, "0xff", 0), (BINARY, "0x92", 1)],
                         ids=["utf16", "binary"])
@pytest.mark.parametrize(("argv", "prefix", "role"), [
    (["coordinator", "run"], "fedge coordinator: ", "coordinator"),
    (["coordinator", "status"], "fedge coordinator: ", "coordinator"),
    (["agent", "run"], "fedge agent: ", "agent"),
    (["agent", "privacy"], "fedge agent privacy: ", "agent"),
])
def test_a_config_that_is_not_utf8_is_one_line_naming_the_file_exit_2(
        tmp_path, data, byte, offset, argv, prefix, role):
    cfg = tmp_path / "config.toml"
    cfg.write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "fedge.cli", *argv, "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line == (f"{prefix}{role} config {cfg} is not UTF-8 text: byte {byte} at offset "
                    f"{offset} cannot be decoded; save it as UTF-8"), line
    assert not (tmp_path / "st").exists()
