"""Enrolment files: everything one appliance needs, in one signed file.

The console writes it (`create_enrolment`); the site carries it to the
appliance, where `fedge agent enrol FILE` checks and installs it
(`fedge.agent.enrol`). Format (JSON)::

    {"format": "fedge-enrolment/1",
     "payload": "<base64 of the payload JSON>",
     "signature": "<hex Ed25519 signature of the payload bytes by the roster key>"}

The payload holds the site name, console id, issue and expiry times, the
appliance's CURVE key pair and Ed25519 identity (secret: the file is 0600 and
expires), the coordinator's endpoint and CURVE public key, the roster public
key, the current signed roster and the TUF root metadata.
"""

from __future__ import annotations

import base64
import binascii
import copy
import errno
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedge.console.store import ConsoleError, ConsoleStore
from fedge.secagg.keys import Identity
from fedge.update.files import check_z85_key, curve_keypair, write_json

FORMAT = "fedge-enrolment/1"
ENROLMENTS = "enrolments"  # where `console enrol` writes a file given no --out
MAX_FILE_BYTES = 1 << 20


class EnrolmentError(ValueError):
    """An enrolment file is corrupt, expired, foreign or for another site."""


class EnrolmentExpired(EnrolmentError):
    """An enrolment file whose signature verifies but whose expiry has passed."""


@dataclass(frozen=True)
class Enrolment:
    site: str
    console_id: str
    issued: datetime
    expires: datetime
    curve_public: str
    curve_secret: str
    identity_private: bytes
    coordinator_endpoint: str
    coordinator_public_key: str
    roster_public_key: bytes
    roster: bytes
    tuf_root: bytes

    def fingerprint(self) -> str:
        """The console key fingerprint an operator reads out and gives to `fedge agent
        enrol --console-key`: the console's (roster) key, first 16 hex digits."""
        return self.roster_public_key.hex()[:16]


def create_enrolment(store: ConsoleStore, site: str, *, valid_for: timedelta,
                     out: Path | None = None) -> tuple[Path, Enrolment]:
    """Create the identity of `site`, add it to the roster and write its enrolment file.

    The file holds the site's only copy of its secret keys, so the site is added only
    if the file is written: a path that cannot be written (a directory, a missing or
    read-only folder) is refused before anything changes, and a write that fails after
    the site was added takes it out again (its roster serial too: nothing has been sent).

    Raises:
        ConsoleError: bad site name, the site is already enrolled, or the file cannot
            be written (names `out`; the site is then not enrolled).
    """
    if out:
        path = Path(out)
    else:  # inside the console home (0700), in a directory of its own no other user reads
        folder = store.home / ENROLMENTS
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)
        path = folder / f"{site}.fedge-enrol"
    _check_writable(path)
    curve_public, curve_secret = curve_keypair()
    identity = Identity.generate()
    before = copy.deepcopy(store.state)
    store.add_site(site, curve_public, identity.public_bytes())
    try:
        now = store.clock().replace(microsecond=0)
        enrolment = Enrolment(
            site=site, console_id=store.console_id, issued=now, expires=now + valid_for,
            curve_public=curve_public, curve_secret=curve_secret,
            identity_private=identity.private_bytes(),
            coordinator_endpoint=store.coordinator_endpoint,
            coordinator_public_key=store.coordinator_public_key,
            roster_public_key=store.roster_public_key(),
            roster=store.roster().to_bytes(), tuf_root=store.root_bytes(),
        )
        payload = json.dumps({
            "site": site, "console_id": enrolment.console_id,
            "issued": now.isoformat(), "expires": enrolment.expires.isoformat(),
            "curve_public": curve_public, "curve_secret": curve_secret,
            "identity_private": enrolment.identity_private.hex(),
            "coordinator_endpoint": enrolment.coordinator_endpoint,
            "coordinator_public_key": enrolment.coordinator_public_key,
            "roster_public_key": enrolment.roster_public_key.hex(),
            "roster": enrolment.roster.decode(),
            "tuf_root": enrolment.tuf_root.decode(),
        }, sort_keys=True).encode()
        signature = store.roster_identity().sign(payload)
        write_json(path, {"format": FORMAT, "payload": base64.b64encode(payload).decode(),
                          "signature": signature.hex()})
    except BaseException as exc:
        # the keys existed only here: without the file the site could never connect,
        # and a retry would be refused as already enrolled
        store.state = before
        store._save()
        if isinstance(exc, OSError):
            raise ConsoleError(_unwritable(path, exc)) from exc
        raise
    return path, enrolment


def _unwritable(path: Path, exc: OSError) -> str:
    return (f"cannot write the enrolment file {path}: {exc.strerror or exc}; nothing was "
            "enrolled")


def _check_writable(path: Path) -> None:
    """Refuse, before the site is added, a `path` the enrolment file cannot be written
    to: a directory, or a folder that does not exist or is not writable (the file is
    written beside it first, then renamed).

    Raises: ConsoleError naming `path`."""
    folder = path.parent
    for wrong, code in ((path.is_dir(), errno.EISDIR),
                        (folder.exists() and not folder.is_dir(), errno.ENOTDIR)):
        if wrong:
            raise ConsoleError(_unwritable(path, OSError(code, os.strerror(code))))
    try:
        folder.mkdir(parents=True, exist_ok=True)  # as write_json does
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise ConsoleError(_unwritable(path, exc)) from exc
    os.close(fd)
    os.unlink(probe)


def console_matches(key: bytes, expected: bytes | str) -> bool:
    """Whether roster key `key` is the console `expected` names: its full 32-byte key,
    or the fingerprint an operator reads out (its first 16 or more hex digits)."""
    if isinstance(expected, bytes):
        return key == expected
    return len(expected) >= 16 and key.hex().startswith(expected.lower())


def read_enrolment(path: Path, *, now: datetime | None = None,
                   expected_console: bytes | str | None = None,
                   trusted_from: Path | None = None) -> Enrolment:
    """Parse and check an enrolment file.

    `expected_console`: the roster public key the appliance already trusts (from a
    previous enrolment), or the console key fingerprint the operator read out (hex, 16
    digits or more, as `fedge console init` and `fedge console enrol` print it); a file
    signed by any other console is refused as foreign. `trusted_from`: the enrolment
    state `expected_console` was read from; None when the operator gave it
    (`--console-key`). The refusal says which.

    Raises:
        EnrolmentError: unreadable, corrupt (bad JSON, missing field, bad
            signature), foreign (signed by another console), or expired.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EnrolmentError(f"enrolment file {path}: cannot read: {exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise EnrolmentError(f"enrolment file {path}: {len(raw)} bytes is more than the "
                             f"{MAX_FILE_BYTES} an enrolment file can be")
    try:
        outer = json.loads(raw)
        if outer.get("format") != FORMAT:
            raise EnrolmentError(f"enrolment file {path}: format {outer.get('format')!r} is "
                                 f"not {FORMAT!r}")
        payload = base64.b64decode(outer["payload"], validate=True)
        signature = bytes.fromhex(outer["signature"])
        p = json.loads(payload)
        e = Enrolment(
            site=str(p["site"]), console_id=str(p["console_id"]),
            issued=datetime.fromisoformat(p["issued"]),
            expires=datetime.fromisoformat(p["expires"]),
            curve_public=check_z85_key(p["curve_public"], what="curve_public",
                                       secret=False),
            curve_secret=check_z85_key(p["curve_secret"], what="curve_secret"),
            identity_private=bytes.fromhex(p["identity_private"]),
            coordinator_endpoint=str(p["coordinator_endpoint"]),
            coordinator_public_key=check_z85_key(p["coordinator_public_key"],
                                                 what="coordinator_public_key",
                                                 secret=False),
            roster_public_key=bytes.fromhex(p["roster_public_key"]),
            roster=str(p["roster"]).encode(), tuf_root=str(p["tuf_root"]).encode(),
        )
        for name, stamp in (("issued", e.issued), ("expires", e.expires)):
            if stamp.tzinfo is None:
                raise ValueError(f"{name} {stamp.isoformat()} has no time zone")
    except EnrolmentError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise EnrolmentError(f"enrolment file {path} is corrupt: {exc}") from exc
    if expected_console is not None and not console_matches(e.roster_public_key,
                                                             expected_console):
        trusted = (expected_console.hex()[:16] if isinstance(expected_console, bytes)
                   else expected_console)
        message = (f"enrolment file {path} is foreign: it is signed by console key "
                   f"{e.fingerprint()}, not ")
        if trusted_from is not None:
            message += (f"console key {trusted} that this appliance is enrolled with "
                        f"({trusted_from})")
        else:
            message += (f"the {trusted} given with --console-key; the console key "
                        "fingerprint is printed by `fedge console init` and `fedge console "
                        "enrol`")
            if e.console_id.lower().startswith(trusted.lower()):
                # `console init` prints the console id too: a value read off the wrong line
                message += f" ({trusted} is the console id, not its key fingerprint)"
        raise EnrolmentError(message)
    try:
        Ed25519PublicKey.from_public_bytes(e.roster_public_key).verify(signature, payload)
    except (InvalidSignature, ValueError) as exc:
        raise EnrolmentError(f"enrolment file {path} is corrupt: its signature does not "
                             f"verify under console key {e.fingerprint()}") from exc
    now = now or datetime.now(UTC)
    if now >= e.expires:
        stamp = now.replace(microsecond=0).isoformat()
        raise EnrolmentExpired(f"enrolment file {path} for site {e.site!r} expired at "
                             f"{e.expires.isoformat()} (now {stamp}); ask the console "
                             "for a new one")
    return e
