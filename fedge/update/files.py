"""Small file helpers shared by the console, the coordinator and the agent:
atomic writes with owner-only permissions and Ed25519 / CURVE key files."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename) with `mode`.

    Raises:
        OSError: the directory cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: object, *, mode: int = 0o600) -> None:
    """Write `obj` as indented JSON, atomically. Raises: OSError, TypeError."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def set_aside(path: Path, log: logging.Logger) -> Path:
    """Move an unreadable state file out of the way as ``<name>.corrupt`` (nothing is
    deleted: people may want it). Returns where it now is: `path` itself, logged, when
    it cannot be moved."""
    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    try:
        path.replace(aside)
    except OSError as exc:
        log.error("cannot move %s aside: %s", path, exc)
        return path
    return aside


def ed25519_private_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def ed25519_public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def ed25519_pem(key: Ed25519PrivateKey) -> bytes:
    """An Ed25519 private key as unencrypted PKCS#8 PEM (what `load_ed25519` reads)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def save_ed25519(path: Path, key: Ed25519PrivateKey) -> None:
    """Save an Ed25519 private key as PKCS#8 PEM, mode 0600. Raises: OSError."""
    write_atomic(path, ed25519_pem(key))


def load_ed25519(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key saved by `save_ed25519`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an Ed25519 PKCS#8 PEM key (names the path).
    """
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"key file {path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"key file {path} holds a {type(key).__name__}, expected Ed25519")
    return key


def curve_keypair() -> tuple[str, str]:
    """A fresh CurveZMQ key pair as (public z85, secret z85)."""
    import zmq

    public, secret = zmq.curve_keypair()
    return public.decode("ascii"), secret.decode("ascii")


def check_z85_key(value: object, *, what: str) -> str:
    """Check a 40-character Z85 CURVE key.

    Raises:
        ValueError: not a 40-character Z85 string (names `what`).
    """
    import zmq.utils.z85 as z85

    if not isinstance(value, str) or len(value) != 40:
        raise ValueError(f"{what} must be a 40-character Z85 string, got {value!r:.60}")
    try:
        z85.decode(value.encode("ascii"))
    except (ValueError, KeyError, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} {value!r} is not valid Z85: {exc}") from exc
    return value
