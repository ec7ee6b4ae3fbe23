"""Shamir secret sharing over the prime field GF(2^521 - 1).

The Mersenne prime 2^521 - 1 is larger than any secret we share (16-byte
self-mask seeds and 32-byte X25519 private keys), so a secret is one field
element and one polynomial; no chunking, no bias.  A share is the pair
(x, f(x)) with x the holder's 1-based index in the cohort; on the wire it is
``SHARE_BYTES`` bytes: x as 2 big-endian bytes, then f(x) as 66.

Coefficients come from ``secrets`` (the OS CSPRNG).  Reconstruction uses
Lagrange interpolation at 0 over exactly ``threshold`` shares; the weights for
one set of x's are cached because the server reconstructs many secrets over
the same survivor set.
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Iterable, Mapping
from functools import lru_cache

PRIME = (1 << 521) - 1
_Y_BYTES = 66  # ceil(521 / 8)
_X_BYTES = 2
SHARE_BYTES = _X_BYTES + _Y_BYTES
MAX_SECRET_BYTES = 64
MAX_X = (1 << (8 * _X_BYTES)) - 1


def split(secret: bytes, xs: Iterable[int], threshold: int) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the returned shares recover it.

    Returns {x: share bytes} for every x in ``xs``.

    Raises:
        TypeError: ``secret`` is not bytes.
        ValueError: ``secret`` is empty or longer than 64 bytes; an x is outside
            1..65535 or repeated; ``threshold`` is below 1 or above the number of x's.
    """
    if not isinstance(secret, bytes | bytearray):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"secret length {len(secret)} is outside 1..{MAX_SECRET_BYTES} bytes"
        )
    xs = list(xs)
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(
            f"threshold {threshold} must lie in 1..{len(xs)} (the number of shares)"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = x.to_bytes(_X_BYTES, "big") + y.to_bytes(_Y_BYTES, "big")
    return shares


def share_x(share: bytes) -> int:
    """The holder index x encoded in a share.

    Raises:
        ValueError: the share is not ``SHARE_BYTES`` long or encodes x = 0.
    """
    return _decode(share)[0]


def combine(shares: Iterable[bytes], threshold: int, secret_length: int) -> bytes:
    """Recover a ``secret_length``-byte secret from at least ``threshold`` shares.

    The ``threshold`` shares with the smallest x are interpolated; extra shares
    are ignored.

    Raises:
        ValueError: fewer than ``threshold`` shares; a malformed share; two shares
            with the same x; the interpolated value does not fit ``secret_length``
            bytes (inconsistent shares).
    """
    points: dict[int, int] = {}
    for share in shares:
        x, y = _decode(share)
        if x in points:
            raise ValueError(f"two shares carry the same x = {x}")
        points[x] = y
    if threshold < 1:
        raise ValueError(f"threshold {threshold} must be at least 1")
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares given, threshold {threshold} needed")
    xs = tuple(sorted(points)[:threshold])
    weights = _lagrange_at_zero(xs)
    value = sum(w * points[x] for w, x in zip(weights, xs, strict=True)) % PRIME
    if value.bit_length() > 8 * secret_length:
        raise ValueError(
            f"shares are inconsistent: the recovered value does not fit {secret_length} bytes"
        )
    return value.to_bytes(secret_length, "big")


def combine_many(
    shares_by_secret: Mapping[str, Iterable[bytes]], threshold: int, secret_length: int
) -> dict[str, bytes]:
    """``combine`` for several secrets; raises ValueError naming the failing secret."""
    out = {}
    for name, shares in shares_by_secret.items():
        try:
            out[name] = combine(shares, threshold, secret_length)
        except ValueError as exc:
            raise ValueError(f"secret of {name!r}: {exc}") from exc
    return out


def _check_xs(xs: list[int]) -> None:
    seen = set()
    for x in xs:
        if not isinstance(x, int) or isinstance(x, bool) or not 1 <= x <= MAX_X:
            raise ValueError(f"share index x={x!r} is outside 1..{MAX_X}")
        if x in seen:
            raise ValueError(f"share index x={x} is repeated")
        seen.add(x)


def _decode(share: bytes) -> tuple[int, int]:
    if not isinstance(share, bytes | bytearray) or len(share) != SHARE_BYTES:
        length = len(share) if isinstance(share, bytes | bytearray) else type(share).__name__
        raise ValueError(f"a share must be {SHARE_BYTES} bytes, got {length}")
    x = int.from_bytes(share[:_X_BYTES], "big")
    y = int.from_bytes(share[_X_BYTES:], "big")
    if x == 0:
        raise ValueError("share index x=0 would be the secret itself")
    if y >= PRIME:
        raise ValueError("share value is outside the field")
    return x, y


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(weights)
