"""`Identity.save` (the appliance's long-term identity key, written by `fedge agent
enrol`) on a disk that takes only part of the key. os.write's short count was not
checked: under a file-size limit (RLIMIT_FSIZE) the key was renamed into place
truncated (16 of its 32 bytes; `Identity.load` then refused it), and a write that
failed outright (a full disk) left ``identity.key.tmp``, holding whatever of the secret
it took, and raised an error naming no file. Now the key is written whole or the call
fails naming it, leaving no key file and no temporary.

The limit is set in a subprocess (a real file-size limit; Python ignores SIGXFSZ,
so the kernel's EFBIG comes back as an OSError, as ENOSPC would)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.secagg.keys import Identity

SAVE = r'''
import json, os, resource, sys
from pathlib import Path
from fedge.secagg.keys import Identity
path, limit = Path(sys.argv[1]), int(sys.argv[2])
identity = Identity.generate()
os.umask(0)  # the key must be 0600 whatever the umask lets through
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    identity.save(path)
    print(json.dumps(["saved", identity.public_bytes().hex()]))
except OSError as exc:
    print(json.dumps([type(exc).__name__, exc.errno, exc.filename, str(exc)]))
'''


def save_under_limit(path: Path, limit: int) -> list[object]:
    done = subprocess.run([sys.executable, "-c", SAVE, str(path), str(limit)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("limit", [16, 0], ids=["short write", "no room at all"])
def test_an_identity_key_the_disk_cannot_hold_fails_whole(tmp_path: Path, limit: int) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    key = keys / "identity.key"
    out = save_under_limit(key, limit)
    assert out == ["OSError", 27, str(key), f"[Errno 27] File too large: '{key}'"]
    assert sorted(p.name for p in keys.iterdir()) == []  # no key, no temporary


def test_a_failed_save_leaves_the_key_it_would_replace(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    before = Identity.generate()
    before.save(key)
    out = save_under_limit(key, 16)
    assert out[:3] == ["OSError", 27, str(key)]
    assert Identity.load(key).public_bytes() == before.public_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]


def test_room_for_the_key_saves_one_that_loads_owner_only(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    key.write_bytes(b"an older key, readable by all")
    os.chmod(key, 0o644)
    out = save_under_limit(key, 4096)
    assert out[0] == "saved"
    assert Identity.load(key).public_bytes().hex() == out[1]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600  # under umask 0 too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["identity.key"]
