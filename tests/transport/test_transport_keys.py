"""CURVE key pairs and key files: generation, round trip, and every refusal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq.auth

from fedge.transport import (
    CurveKeyPair,
    KeyFileError,
    check_public_key,
    load_keypair,
    load_public_key,
    save_keypair,
)


def test_save_and_load_round_trip_with_modes(tmp_path: Path) -> None:
    kp = CurveKeyPair.generate()
    pub, sec = save_keypair(tmp_path, "coordinator", kp)
    assert (pub.stat().st_mode & 0o777, sec.stat().st_mode & 0o777) == (0o644, 0o600)
    assert load_keypair(sec) == kp
    assert load_public_key(pub) == kp.public == load_public_key(sec)
    assert kp.secret is not None and kp.secret not in repr(kp)
    assert len(kp.public_bytes) == 32


def test_files_are_readable_by_pyzmq(tmp_path: Path) -> None:
    kp = CurveKeyPair.generate()
    pub, sec = save_keypair(tmp_path, "agent", kp)
    assert zmq.auth.load_certificate(sec) == (kp.public.encode(), kp.secret.encode())
    assert zmq.auth.load_certificate(pub) == (kp.public.encode(), None)


def test_pyzmq_generated_certificates_load(tmp_path: Path) -> None:
    pub, sec = zmq.auth.create_certificates(str(tmp_path), "legacy")
    os.chmod(sec, 0o600)
    kp = load_keypair(sec)
    assert kp.public == load_public_key(pub)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    save_keypair(tmp_path, "a", CurveKeyPair.generate())
    with pytest.raises(KeyFileError, match="exists; refusing to overwrite"):
        save_keypair(tmp_path, "a", CurveKeyPair.generate())
    kp = CurveKeyPair.generate()
    save_keypair(tmp_path, "a", kp, overwrite=True)
    assert load_keypair(tmp_path / "a.key_secret") == kp


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_group_or_world_readable_secret_is_refused(tmp_path: Path, mode: int) -> None:
    _, sec = save_keypair(tmp_path, "a", CurveKeyPair.generate())
    os.chmod(sec, mode)
    with pytest.raises(KeyFileError, match=rf"permissions {mode:04o}.*chmod 600"):
        load_keypair(sec)


def test_read_only_owner_secret_is_accepted(tmp_path: Path) -> None:
    kp = CurveKeyPair.generate()
    _, sec = save_keypair(tmp_path, "a", kp)
    os.chmod(sec, 0o400)
    assert load_keypair(sec) == kp


def test_missing_and_wrong_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keypair(tmp_path / "nope.key_secret")
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(tmp_path)
    pub, _ = save_keypair(tmp_path, "a", CurveKeyPair.generate())
    os.chmod(pub, 0o600)
    with pytest.raises(KeyFileError, match="no secret-key line"):
        load_keypair(pub)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def test_bad_formats_name_the_problem(tmp_path: Path) -> None:
    kp = CurveKeyPair.generate()
    other = CurveKeyPair.generate()
    with pytest.raises(KeyFileError, match="no 'curve' section"):
        load_keypair(_write(tmp_path / "a", f"public-key = \"{kp.public}\"\n"))
    with pytest.raises(KeyFileError, match="has 39 characters"):
        load_keypair(_write(tmp_path / "b", f'curve\n    public-key = "{kp.public[:-1]}"\n'
                            f'    secret-key = "{kp.secret}"\n'))
    with pytest.raises(KeyFileError, match="does not belong to public key"):
        load_keypair(_write(tmp_path / "c", f'curve\n    public-key = "{kp.public}"\n'
                            f'    secret-key = "{other.secret}"\n'))
    with pytest.raises(KeyFileError, match="two public-key lines"):
        load_keypair(_write(tmp_path / "d", f'curve\n    public-key = "{kp.public}"\n'
                            f'    public-key = "{kp.public}"\n'))
    (tmp_path / "e").write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="not ASCII"):
        load_public_key(tmp_path / "e")


def test_check_public_key() -> None:
    kp = CurveKeyPair.generate()
    assert check_public_key(kp.public.encode()) == kp.public
    with pytest.raises(KeyFileError, match="non-Z85 characters"):
        check_public_key("~" * 40)
    with pytest.raises(KeyFileError, match="must be a Z85 str"):
        check_public_key(42)
    with pytest.raises(KeyFileError, match="needs a key pair with its secret"):
        save_keypair("/tmp", "x", CurveKeyPair(kp.public))
