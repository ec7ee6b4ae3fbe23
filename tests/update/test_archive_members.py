"""What an update archive may hold, checked member by member before anything is
extracted: the software slot and the app folder get regular files and directories
(a .deb's data archive also relative symlinks that stay inside), whatever the
interpreter's tarfile filter lets through."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from fedge.update.ab import SlotInstaller


def tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """Write `members` ((TarInfo, data) pairs, as given) to the .tar.gz `path`."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def test_a_hardlink_to_a_member_not_there_is_refused_and_leaves_no_temporary_slot(tmp_path):
    """tarfile raises KeyError for it, which escaped unpack's error handling: the
    temporary slot stayed until the next open of the installer swept it."""
    bad = tar_gz(tmp_path / "fedge-2.0.0.tar.gz",
                 [(entry("hl", tarfile.LNKTYPE, "nowhere"), b"")])
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError,
                       match=r"'fedge-2\.0\.0\.tar\.gz' cannot be unpacked: .*'nowhere'"):
        slots.unpack("2.0.0", bad)
    assert list(slots.slots.iterdir()) == []
