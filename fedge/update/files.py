"""Small file helpers shared by the console, the coordinator and the agent:
atomic writes with owner-only permissions, the sweep of temporaries that killed
writes leave, and Ed25519 / CURVE key files.

A temporary file or directory is *held* (an exclusive ``flock`` on it) by its
writer until it is renamed into place or removed; the lock goes with the process,
so one killed mid-write (SIGKILL, power cut) leaves a temporary nobody holds, and
:func:`remove_stale_temps` removes it when its owner is next opened, whatever
process that is. One held by a live writer, in this process or another, is left
alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("fedge.update.files")

# write_atomic's temporary: ".<target name>.<mkstemp's 8 random characters>"
ATOMIC_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}")
# A temporary younger than this is left alone even when nobody holds it: its writer
# may be between creating it and taking the lock (microseconds), or be a release from
# before temporaries were held.
TEMP_GRACE_S = 60.0


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename) with `mode`.

    Raises:
        OSError: the directory cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # held until renamed (module docstring)
            os.fchmod(f.fileno(), mode)
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


@contextlib.contextmanager
def holding(path: Path) -> Iterator[None]:
    """Hold the temporary file or directory ``path`` (an exclusive ``flock``) while the
    block runs, so that :func:`remove_stale_temps` leaves it alone; rename it into
    place inside the block.

    Raises: OSError: ``path`` cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path, name: re.Pattern[str] = ATOMIC_TEMP_NAME, *,
                       directories: bool = False,
                       grace_s: float = TEMP_GRACE_S) -> list[Path]:
    """Remove the temporaries in ``directory`` (not below it) that killed writes left:
    entries whose whole name matches ``name``, regular files (or, with
    ``directories``, directories, with what they hold), that no live writer holds
    (module docstring) and that were last modified more than ``grace_s`` ago. Nothing
    else is touched: not a symlink, not a name of another shape.

    Meant for when the owner of ``directory`` is opened. A temporary that cannot be
    looked at or removed (permissions) is logged and left; a missing ``directory``
    has none.

    Returns the paths removed.
    """
    directory = Path(directory)
    try:
        entries = [e for e in os.scandir(directory) if name.fullmatch(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        log.warning("cannot look for stale temporaries in %s: %s", directory, exc)
        return []
    kind = stat.S_ISDIR if directories else stat.S_ISREG
    removed: list[Path] = []
    for entry in entries:
        path = directory / entry.name
        try:
            st = entry.stat(follow_symlinks=False)
            if not kind(st.st_mode) or st.st_mtime > time.time() - grace_s:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        except OSError as exc:
            log.warning("cannot check stale temporary %s: %s", path, exc)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its writer is alive
                continue
            # still the entry that was opened (not renamed into place and replaced)
            if os.fstat(fd).st_ino != os.lstat(path).st_ino:
                continue
            if directories:
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
            log.info("removed %s, left by a write that did not finish", path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale temporary %s: %s", path, exc)
        finally:
            os.close(fd)
    return removed


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


def check_z85_key(value: object, *, what: str, secret: bool = True) -> str:
    """Check a 40-character Z85 CURVE key (an enrolment file's keys).

    The value is not quoted, whole or in part, unless ``secret=False`` (a public key):
    an enrolment file's ``curve_secret`` reached the terminal. The message says its
    length, or the positions of what is not Z85 (`fedge.transport.keys.
    check_public_key`'s words for a secret key).

    Raises:
        ValueError: not a str of 40 Z85 characters, or one whose 5-character groups
            do not decode to 32 bits each (names `what`).
    """
    import struct

    import zmq.utils.z85 as z85

    from fedge.transport.keys import check_public_key

    if not isinstance(value, str):  # check_public_key takes bytes too; a JSON value not
        raise ValueError(f"{what} must be a Z85 str, got {type(value).__name__}")
    check_public_key(value, what=what, secret=secret)
    # Z85's alphabet, yet "%%%%%" is 84 * 85^4 + ... > 2^32: libzmq refuses such a key
    over = []
    for i in range(0, 40, 5):
        try:
            z85.decode(value[i:i + 5].encode("ascii"))
        except (ValueError, struct.error):
            over.append(f"{i + 1}-{i + 5}")
    if over:
        shown, hidden = ("", " (a secret key is not shown)") if secret else (
            f" {value[:8]!r}...", "")
        raise ValueError(f"{what}{shown} is not a Z85 CURVE key: its 5 characters at "
                         f"position(s) {', '.join(over)} of 40 encode more than 32 bits"
                         f"{hidden}")
    return value
