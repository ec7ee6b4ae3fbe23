"""Identities, the console-signed roster, and every key derivation of a round.

Long-term: each appliance holds an Ed25519 ``Identity``; the console signs a
``Roster`` mapping client ids to those public keys.  Per round: each client
makes two X25519 key pairs, one to encrypt shares, one for pairwise masks,
and signs both public keys with its identity (``advertisement_payload``).

Every derived key is bound to the job id, round, model digest and both
client ids (HKDF-SHA256 ``info``), so masks cancel only among clients that
trained the same model in the same round, and a share ciphertext cannot be
moved to another pair, round or job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.update.files import write_atomic

from .errors import SecAggConfigError

# A site's name (its client id) is the coordinator's allow-list key, a file-name part
# and a log field: ASCII only, so there are no look-alikes, one spelling under Unicode
# normalisation and one meaning of "the same except for case". The console, the
# coordinator and the round all check it with `check_client_id`.
SITE_NAME_RULE = ("1-128 ASCII letters, digits, '-', '_', '.', starting with a letter "
                  "or digit")
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# What a console let into a signed roster before the rule above: also ':' and '@', and
# a trailing newline (an anchored re.match let it through). Such a site never got onto
# a coordinator, but rosters naming it were signed and handed out, and must still load.
_LEGACY_ROSTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}\n?")
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
MASK_SEED_BYTES = 16  # AES-128 key of the core's PRG
SHARE_KEY_BYTES = 32  # AES-256-GCM


def check_client_id(client_id: object, *, what: str = "client_id") -> str:
    """Return ``client_id`` if it is a valid client id (a site name): `SITE_NAME_RULE`.

    Raises:
        SecAggConfigError: not a str of 1-128 ASCII letters, digits, '-', '_', '.'
            starting with a letter or digit.
    """
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise SecAggConfigError(f"{what} {client_id!r} is not a client id ({SITE_NAME_RULE})")
    return client_id


def case_twin(name: str, existing: Iterable[str]) -> str | None:
    """The name in ``existing`` that equals ``name`` except for case, if any: two sites
    `Hospital-A` and `hospital-a` read as one to people and to case-insensitive file
    systems, so a new name must not be one."""
    folded = name.casefold()
    for other in existing:
        if other != name and other.casefold() == folded:
            return other
    return None


def _check_roster_id(client_id: object) -> None:
    """A roster entry's id: `check_client_id`, or a name an older console signed in."""
    if not isinstance(client_id, str) or not (
            _CLIENT_ID.fullmatch(client_id) or _LEGACY_ROSTER_ID.fullmatch(client_id)):
        raise SecAggConfigError(f"client_id {client_id!r} is not a client id ({SITE_NAME_RULE})")


def length_prefixed(data: bytes | str) -> bytes:
    """Length-prefixed encoding, so concatenations are unambiguous."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return len(raw).to_bytes(4, "big") + raw


class Identity:
    """An appliance's long-term Ed25519 signing identity."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        """Raises: SecAggConfigError if ``raw`` is not 32 bytes."""
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise SecAggConfigError(
                "an Ed25519 private key is 32 bytes, got "
                + (f"{len(raw)}" if isinstance(raw, bytes) else type(raw).__name__)
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key (32 raw bytes) to ``path`` with mode 0600, atomically:
        all of it or nothing. A write the disk takes only part of (a file-size limit)
        or none of (a full disk) fails the call and leaves neither a truncated key at
        ``path`` nor the temporary; the temporary is 0600 from its creation.

        Written by `fedge.update.files.write_atomic`: its temporary
        (``.<name>.XXXXXXXX``) is held while written, so the sweep of what a killed
        enrolment left (`fedge.agent.enrol.remove_stale_key_temps`) knows it.

        Raises:
            OSError: ``path`` cannot be written; names it (a write's ENOSPC or EFBIG
                names no file of itself).
        """
        path = Path(path)
        try:
            write_atomic(path, self.private_bytes(), mode=0o600)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = str(path)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        """Raises: FileNotFoundError; SecAggConfigError if the file is not a 32-byte key."""
        raw = Path(path).read_bytes()
        if len(raw) != 32:
            raise SecAggConfigError(f"identity file {path} holds {len(raw)} bytes, expected 32")
        return cls.from_private_bytes(raw)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``data`` under ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class RosterSignatureError(SecAggConfigError):
    """A roster's signature does not verify under the console key, or it is malformed."""


@dataclass(frozen=True)
class Roster:
    """The console-signed map {client_id: Ed25519 public key} of enrolled appliances.

    ``serial`` grows with every change the console makes (an enrolment, a
    revocation), so an appliance takes a newer roster from the coordinator and
    refuses an older one: a coordinator cannot bring back a revoked identity by
    replaying the roster that still held it. Rosters signed before serials existed
    (body version 1) read as serial 0.
    """

    entries: Mapping[str, bytes]
    signature: bytes
    serial: int = 0

    @classmethod
    def build(cls, entries: Mapping[str, bytes], console_key: Identity, *,
              serial: int = 0) -> Roster:
        """Sign ``entries`` (and ``serial``) with the console identity.

        Raises:
            SecAggConfigError: an invalid client id, a public key that is not 32 bytes,
                or a negative serial.
        """
        if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
            raise SecAggConfigError(f"roster serial {serial!r} must be an integer >= 0")
        clean = {}
        for client_id, key in entries.items():
            _check_roster_id(client_id)
            if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
                raise SecAggConfigError(
                    f"roster key of {client_id!r} must be {PUBLIC_KEY_BYTES} bytes"
                )
            clean[client_id] = key
        return cls(clean, console_key.sign(_roster_body(clean, serial)), serial)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"body": _roster_body(self.entries, self.serial).decode(),
             "signature": self.signature.hex()},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, console_public_key: bytes) -> Roster:
        """Parse and verify a roster.

        Raises:
            RosterSignatureError: malformed, or the signature does not verify under
                ``console_public_key``.
        """
        try:
            outer = json.loads(data)
            body = outer["body"].encode()
            signature = bytes.fromhex(outer["signature"])
            doc = json.loads(body)
            raw_entries = doc["entries"]
            entries = {cid: bytes.fromhex(h) for cid, h in raw_entries.items()}
            serial = doc.get("serial", 0)
            if isinstance(serial, bool) or not isinstance(serial, int) or serial < 0:
                raise ValueError(f"serial {serial!r} is not an integer >= 0")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise RosterSignatureError(f"roster is malformed: {exc}") from exc
        if not verify_signature(console_public_key, signature, body):
            raise RosterSignatureError("roster signature does not verify under the console key")
        if _roster_body(entries, serial) != body:
            raise RosterSignatureError("roster body is not in canonical form")
        for client_id, key in entries.items():
            _check_roster_id(client_id)
            if len(key) != PUBLIC_KEY_BYTES:
                raise RosterSignatureError(f"roster key of {client_id!r} is not 32 bytes")
        return cls(entries, signature, serial)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.entries

    def public_key(self, client_id: str) -> bytes:
        """Raises: KeyError if the client is not enrolled."""
        return self.entries[client_id]


def _roster_body(entries: Mapping[str, bytes], serial: int = 0) -> bytes:
    """The signed bytes: version 1 (no serial) for serial 0, so rosters signed before
    serials existed still verify; version 2 with the serial otherwise."""
    doc: dict[str, Any] = {"entries": {cid: entries[cid].hex() for cid in sorted(entries)},
                           "version": 1}
    if serial:
        doc.update(serial=serial, version=2)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


# --- per-round keys -------------------------------------------------------------


class RoundKeys:
    """A client's two per-round X25519 key pairs."""

    def __init__(self) -> None:
        self.enc_private = X25519PrivateKey.generate()
        self.mask_private = X25519PrivateKey.generate()

    @property
    def enc_public(self) -> bytes:
        return x25519_public(self.enc_private)

    @property
    def mask_public(self) -> bytes:
        return x25519_public(self.mask_private)

    def mask_private_bytes(self) -> bytes:
        return x25519_private_bytes(self.mask_private)


def x25519_public(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def x25519_public_from_private(raw: bytes) -> bytes:
    return x25519_public(X25519PrivateKey.from_private_bytes(raw))


def usable_x25519_public(raw: object) -> bool:
    """Whether ``raw`` is a 32-byte X25519 public key that a peer can agree with.

    A low-order point (all zero, for one) makes every exchange fail, so a
    neighbour handed it could only abort; the server refuses it up front.
    """
    if not isinstance(raw, bytes) or len(raw) != 32:
        return False
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return False
    return True


def _context(job_id: str, round_: int, model_digest: bytes) -> bytes:
    return length_prefixed(job_id) + round_.to_bytes(8, "big") + length_prefixed(model_digest)


def _pair(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return length_prefixed(lo) + length_prefixed(hi)


def _agree(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    if isinstance(private, bytes):
        private = X25519PrivateKey.from_private_bytes(private)
    return private.exchange(X25519PublicKey.from_public_bytes(peer_public))


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


def pairwise_mask_seed(
    mask_private: X25519PrivateKey | bytes,
    peer_mask_public: bytes,
    *,
    job_id: str,
    round_: int,
    model_digest: bytes,
    me: str,
    peer: str,
) -> bytes:
    """The 16-byte PRG seed of the mask shared by ``me`` and ``peer``.

    Raises:
        ValueError: ``peer_mask_public`` is not a valid X25519 key (or a low-order point).
    """
    secret = _agree(mask_private, peer_mask_public)
    info = b"fedge/secagg/v1/pairwise-mask" + _context(job_id, round_, model_digest)
    return _hkdf(secret, info + _pair(me, peer), MASK_SEED_BYTES)


def share_encryption_key(
    enc_private: X25519PrivateKey,
    peer_enc_public: bytes,
    *,
    job_id: str,
    round_: int,
    model_digest: bytes,
    me: str,
    peer: str,
) -> bytes:
    """The AES-256-GCM key protecting shares between ``me`` and ``peer``.

    Raises:
        ValueError: ``peer_enc_public`` is not a valid X25519 key.
    """
    secret = _agree(enc_private, peer_enc_public)
    info = b"fedge/secagg/v1/share-encryption" + _context(job_id, round_, model_digest)
    return _hkdf(secret, info + _pair(me, peer), SHARE_KEY_BYTES)


def share_associated_data(sender: str, receiver: str, job_id: str, round_: int) -> bytes:
    parts = (length_prefixed(sender), length_prefixed(receiver), length_prefixed(job_id))
    return b"fedge/secagg/v1/share" + b"".join(parts) + round_.to_bytes(8, "big")


def advertisement_payload(
    client_id: str, enc_public: bytes, mask_public: bytes, *, job_id: str, round_: int
) -> bytes:
    """What a client signs when it advertises its round keys.

    The model digest is deliberately not signed: a client given another model
    still takes part, and its masks simply fail to cancel (garbage, not a leak).
    """
    return (
        b"fedge/secagg/v1/advertise"
        + length_prefixed(job_id)
        + round_.to_bytes(8, "big")
        + length_prefixed(client_id)
        + length_prefixed(enc_public)
        + length_prefixed(mask_public)
    )


def consistency_payload(survivors: list[str], *, job_id: str, round_: int) -> bytes:
    """What each surviving client signs in the consistency check: the sorted survivor list."""
    body = b"".join(length_prefixed(c) for c in sorted(survivors))
    head = b"fedge/secagg/v1/consistency" + length_prefixed(job_id) + round_.to_bytes(8, "big")
    return head + body
