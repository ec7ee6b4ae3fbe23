"""`save_keypair` on a disk that takes only part of a key file. os.write's short count
was not checked: under a file-size limit (RLIMIT_FSIZE) the secret key file was
renamed into place truncated (200 of its bytes, and no secret-key line), and a write
that failed outright (a full disk) left its temporary behind. Now a key file is
written whole or the call fails naming it, leaving no key file, no temporary, and
not half a pair.

The limit is set in a subprocess (a real file-size limit; Python ignores SIGXFSZ,
so the kernel's EFBIG comes back as an OSError, as ENOSPC would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SAVE = r'''
import json, resource, sys
from pathlib import Path
from fedge.transport import CurveKeyPair, save_keypair
directory, limit = Path(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_keypair(directory, "coordinator", CurveKeyPair.generate())
    print(json.dumps("saved"))
except OSError as exc:
    print(json.dumps([type(exc).__name__, exc.errno, exc.filename, str(exc)]))
'''


def save_under_limit(directory: Path, limit: int) -> object:
    done = subprocess.run([sys.executable, "-c", SAVE, str(directory), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("limit", [200, 0], ids=["short write", "no room at all"])
def test_a_key_file_the_disk_cannot_hold_fails_whole(tmp_path: Path, limit: int) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    secret = keys / "coordinator.key_secret"
    out = save_under_limit(keys, limit)
    assert out == ["OSError", 27, str(secret), f"[Errno 27] File too large: '{secret}'"]
    assert sorted(p.name for p in keys.iterdir()) == []  # no key, no temporary


def test_room_for_the_key_files_saves_a_pair_that_loads(tmp_path: Path) -> None:
    from fedge.transport import load_keypair, load_public_key

    keys = tmp_path / "keys"
    assert save_under_limit(keys, 4096) == "saved"
    pair = load_keypair(keys / "coordinator.key_secret")
    assert load_public_key(keys / "coordinator.key") == pair.public
    assert sorted(p.name for p in keys.iterdir()) == ["coordinator.key",
                                                       "coordinator.key_secret"]
