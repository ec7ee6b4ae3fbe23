"""The messages of a SecAgg+ round, as frozen dataclasses.

Fields use only int, str, bytes, list/dict of those and one numpy uint32
array (the masked input), so the wire codec serialises them generically.
Every message carries ``job_id`` and ``round``; a session refuses any whose
pair differs from its own (``ReplayedMessage``).  Ciphertexts stay bytes.

Stage by stage (server -> client, then client -> server):

0. ``AdvertiseRequest``  -> ``KeyAdvertisement``   (signed X25519 public keys)
1. ``AdvertisedKeys``    -> ``EncryptedShares``    (AES-GCM share ciphertexts per neighbour)
2. ``RelayedShares``     -> ``MaskedInput``        (uint32 quantised input + masks)
3. ``ConsistencyRequest``-> ``ConsistencySignature`` (signature on the survivor list)
4. ``UnmaskRequest``     -> ``UnmaskShares``       (seed shares of survivors, key shares of dropped)

``RoundFailed`` tells clients the server gave up.  ``MESSAGE_TYPES`` maps a
stable wire name to each class for the codec's registry.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from functools import cache

import numpy as np

from .errors import MalformedMessage

# A share ciphertext holds two Shamir shares and the two ids; anything far larger
# is refused before any decryption is tried.
MAX_SHARE_CIPHERTEXT = 4096

# --- server -> client ---------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseRequest:
    """Opens a round: the cohort, the agreed parameters and the graph seed."""

    job_id: str
    round: int
    cohort: list[str]
    threshold: int
    degree: int
    vector_length: int
    graph_seed: bytes


@dataclass(frozen=True)
class AdvertisedKeys:
    """The signed key advertisements of a client's neighbours (and its own)."""

    job_id: str
    round: int
    enc_keys: dict[str, bytes]
    mask_keys: dict[str, bytes]
    signatures: dict[str, bytes]


@dataclass(frozen=True)
class RelayedShares:
    """Share ciphertexts addressed to this client, keyed by sender id."""

    job_id: str
    round: int
    ciphertexts: dict[str, bytes]


@dataclass(frozen=True)
class ConsistencyRequest:
    """The clients whose masked inputs the server holds; each signs this list."""

    job_id: str
    round: int
    survivors: list[str]


@dataclass(frozen=True)
class UnmaskRequest:
    """Survivors (whose self-mask seed shares are asked) and dropped clients
    (whose mask-key shares are asked), with the consistency signatures."""

    job_id: str
    round: int
    survivors: list[str]
    dropped: list[str]
    signatures: dict[str, bytes]


@dataclass(frozen=True)
class RoundFailed:
    """The server gave up this round; ``reason`` names the abort."""

    job_id: str
    round: int
    reason: str


# --- client -> server ---------------------------------------------------------------


@dataclass(frozen=True)
class KeyAdvertisement:
    job_id: str
    round: int
    client_id: str
    enc_public: bytes
    mask_public: bytes
    signature: bytes


@dataclass(frozen=True)
class EncryptedShares:
    """Share ciphertexts from ``client_id``, keyed by receiver id."""

    job_id: str
    round: int
    client_id: str
    ciphertexts: dict[str, bytes]


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """The quantised input plus self and pairwise masks, uint32, mod 2^32."""

    job_id: str
    round: int
    client_id: str
    masked: np.ndarray


@dataclass(frozen=True)
class ConsistencySignature:
    job_id: str
    round: int
    client_id: str
    signature: bytes


@dataclass(frozen=True)
class UnmaskShares:
    """Per peer id, exactly one kind of share: seed (survivor) or mask key (dropped)."""

    job_id: str
    round: int
    client_id: str
    seed_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]


ServerMessage = (
    AdvertiseRequest
    | AdvertisedKeys
    | RelayedShares
    | ConsistencyRequest
    | UnmaskRequest
    | RoundFailed
)
ClientMessage = (
    KeyAdvertisement | EncryptedShares | MaskedInput | ConsistencySignature | UnmaskShares
)

MESSAGE_TYPES: dict[str, type] = {
    "secagg.advertise_request": AdvertiseRequest,
    "secagg.advertised_keys": AdvertisedKeys,
    "secagg.relayed_shares": RelayedShares,
    "secagg.consistency_request": ConsistencyRequest,
    "secagg.unmask_request": UnmaskRequest,
    "secagg.round_failed": RoundFailed,
    "secagg.key_advertisement": KeyAdvertisement,
    "secagg.encrypted_shares": EncryptedShares,
    "secagg.masked_input": MaskedInput,
    "secagg.consistency_signature": ConsistencySignature,
    "secagg.unmask_shares": UnmaskShares,
}


def check_fields(message: object) -> None:
    """Check every field of a secagg message against its annotation.

    Raises:
        MalformedMessage: not a secagg message, or a field of the wrong type, naming
            the message, the field and what was found.
    """
    cls = type(message)
    if cls not in _CLASSES:
        raise MalformedMessage(f"{cls.__name__} is not a secagg message")
    for name, expected in _hints(cls).items():
        value = getattr(message, name)
        if not _matches(value, expected):
            raise MalformedMessage(
                f"{cls.__name__}.{name} should be {_describe(expected)}, "
                f"got {type(value).__name__}"
            )


_CLASSES = frozenset(MESSAGE_TYPES.values())


@cache
def _hints(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _matches(value: object, expected: object) -> bool:
    origin = typing.get_origin(expected)
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(expected)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, item) for k, v in value.items()
        )
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    assert isinstance(expected, type)
    return isinstance(value, expected)


def _describe(expected: object) -> str:
    return getattr(expected, "__name__", None) or str(expected)
