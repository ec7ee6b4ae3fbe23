"""Shamir secret sharing over the prime field GF(2^521 - 1).

The Mersenne prime 2^521 - 1 is larger than any secret we share (16-byte
self-mask seeds and 32-byte X25519 private keys), so a secret is one field
element and one polynomial; no chunking, no bias.  A share is the pair
(x, f(x)) with x the holder's 1-based index in the cohort; on the wire it is
``SHARE_BYTES`` bytes: x as 2 big-endian bytes, then f(x) as 66.

Coefficients come from ``secrets`` (the OS CSPRNG).  Reconstruction uses
Lagrange interpolation at 0 over ``threshold`` shares; the weights for one set
of x's are cached because the server reconstructs many secrets over the same
survivor set.

A holder may lie. ``recover`` checks every share it is given against the
polynomial the first ``threshold`` of them define: with k > t shares a false
share is seen, and with k >= t + 2e shares up to e false ones are found and
left out (Berlekamp-Welch decoding of the Reed-Solomon code the shares form).
With exactly t shares any t values lie on some polynomial of degree t - 1, so
a false share cannot be seen at all.
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


class InconsistentShares(ValueError):
    """The shares of one secret do not lie on one polynomial of degree t - 1, and
    too few of them agree to tell the false ones from the true (``xs``: the x of
    every share given)."""

    def __init__(self, message: str, xs: tuple[int, ...]) -> None:
        super().__init__(message)
        self.xs = xs


def combine(shares: Iterable[bytes], threshold: int, secret_length: int) -> bytes:
    """Recover a ``secret_length``-byte secret from at least ``threshold`` shares,
    every one of which must lie on the same polynomial (``recover``, which also
    finds false shares).

    Raises:
        ValueError: fewer than ``threshold`` shares; a malformed share; two shares
            with the same x; the shares disagree (InconsistentShares, or a ValueError
            naming the x's that disagree); the recovered value does not fit
            ``secret_length`` bytes.
    """
    secret, false_xs = recover(shares, threshold, secret_length)
    if false_xs:
        raise ValueError(f"shares are inconsistent: the shares at x = "
                         f"{', '.join(map(str, false_xs))} disagree with the others")
    return secret


def recover(shares: Iterable[bytes], threshold: int,
            secret_length: int) -> tuple[bytes, tuple[int, ...]]:
    """Recover a ``secret_length``-byte secret from at least ``threshold`` shares,
    checking every share: returns (secret, the x's of the shares that do not lie on
    the secret's polynomial, ascending; empty when all agree).

    With k shares and threshold t, false shares are found when the others still
    outnumber them by t (k - f - f >= t for f false shares): the polynomial that
    agrees with that many shares is the only one that can, so this assumes at most
    (k - t) / 2 of the holders lie. More liars, acting together, could make a
    polynomial of their own win and have true holders named; a lone liar cannot.
    With exactly t shares (k = t) nothing can be checked: any t values lie on one
    polynomial of degree t - 1, and a false share gives a false secret unseen.

    The check costs about t * t / 2 field multiplications per secret (the Newton
    form of the polynomial through the first t shares,
    :func:`_newton_coefficients`) and (k - t) * t multiplications by small
    integers (the other shares, and x = 0, checked against it), whatever set of x's
    each secret has; the decoding that finds false shares (only when some share
    disagrees) solves one linear system of about k unknowns.

    Raises:
        ValueError: fewer than ``threshold`` shares; a malformed share; two shares
            with the same x; the recovered value does not fit ``secret_length``
            bytes (inconsistent shares, when they cannot be checked).
        InconsistentShares: the shares disagree and too few agree to say which
            are false.
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
    xs = tuple(sorted(points))
    base, rest = xs[:threshold], xs[threshold:]
    false_xs: tuple[int, ...] = ()
    if rest:
        newton = _newton_coefficients(points, base)
        if any(_newton_at(newton, base, x) != points[x] for x in rest):
            polynomial = _decode_errors(points, threshold)
            false_xs = tuple(x for x in xs if _evaluate(polynomial, x) != points[x])
            value = polynomial[0]
            return _fit(value, secret_length), false_xs
        return _fit(_newton_at(newton, base, 0), secret_length), false_xs
    weights = _lagrange_at_zero(base)
    value = sum(w * points[x] for w, x in zip(weights, base, strict=True)) % PRIME
    return _fit(value, secret_length), false_xs


def _fit(value: int, secret_length: int) -> bytes:
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


@lru_cache(maxsize=8192)
def _inverse(d: int) -> int:
    """1/d in the field, for the small differences of share indices x."""
    return pow(d % PRIME, -1, PRIME)


def _newton_coefficients(points: Mapping[int, int], base: tuple[int, ...]) -> list[int]:
    """The divided differences of the points at ``base``: the polynomial through
    them in Newton form, c0 + c1 (x - b0) + c2 (x - b0)(x - b1) + ..."""
    c = [points[x] for x in base]
    for j in range(1, len(base)):
        for i in range(len(base) - 1, j - 1, -1):
            c[i] = (c[i] - c[i - 1]) * _inverse(base[i] - base[i - j]) % PRIME
    return c


def _newton_at(c: list[int], base: tuple[int, ...], x: int) -> int:
    """The Newton-form polynomial ``c`` over ``base`` at ``x``: the factors
    (x - b) are small integers, so the value is reduced once, at the end."""
    y = c[-1]
    for j in range(len(c) - 2, -1, -1):
        y = y * (x - base[j]) + c[j]
    return y % PRIME


def _evaluate(coefficients: list[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def _decode_errors(points: Mapping[int, int], threshold: int) -> list[int]:
    """The polynomial of degree < ``threshold`` (coefficients, constant first) that
    the shares ``points`` (x -> y) agree with, all but at most (k - t) // 2 of them
    (Berlekamp-Welch: find E monic of degree e and Q of degree < t + e with
    Q(x) = y E(x) at every share; then f = Q / E).

    Raises:
        InconsistentShares: no such polynomial (too many shares disagree to decide).
    """
    xs = tuple(sorted(points))
    k, t = len(xs), threshold
    e = (k - t) // 2
    why = (f"the {k} shares do not lie on one polynomial of degree {t - 1}, and too few "
           "agree to tell the false ones (they are found only when the shares that agree "
           f"outnumber those that do not by t = {t})")
    if e == 0:
        raise InconsistentShares(why, xs)
    # unknowns: q_0 .. q_{t+e-1}, then e_0 .. e_{e-1}; row: sum q_j x^j - y sum e_j x^j
    # = y x^e
    rows = []
    for x in xs:
        y = points[x]
        powers = [1]
        for _ in range(t + e):
            powers.append(powers[-1] * x % PRIME)
        rows.append(powers[:t + e] + [-y * p % PRIME for p in powers[:e]]
                    + [y * powers[e] % PRIME])
    solution = _solve(rows, t + 2 * e)
    if solution is None:
        raise InconsistentShares(why, xs)
    q, err = solution[:t + e], [*solution[t + e:], 1]
    f, remainder = _divide(q, err)
    if any(remainder) or (len(f) > t and any(f[t:])):
        raise InconsistentShares(why, xs)
    f = (f + [0] * t)[:t]
    wrong = sum(1 for x in xs if _evaluate(f, x) != points[x])
    if k - 2 * wrong < t:
        raise InconsistentShares(why, xs)
    return f


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """A solution of the augmented system ``rows`` mod PRIME (free unknowns 0), or
    None when it has none."""
    rows = [list(r) for r in rows]
    pivots = []
    r = 0
    for c in range(unknowns):
        pivot = next((i for i in range(r, len(rows)) if rows[i][c]), None)
        if pivot is None:
            continue
        rows[r], rows[pivot] = rows[pivot], rows[r]
        inverse = pow(rows[r][c], -1, PRIME)
        rows[r] = [v * inverse % PRIME for v in rows[r]]
        for i in range(len(rows)):
            if i != r and rows[i][c]:
                factor = rows[i][c]
                rows[i] = [(a - factor * b) % PRIME for a, b in zip(rows[i], rows[r],
                                                                   strict=True)]
        pivots.append(c)
        r += 1
    if any(row[unknowns] for row in rows[r:]):
        return None
    solution = [0] * unknowns
    for i, c in enumerate(pivots):
        solution[c] = rows[i][unknowns]
    return solution


def _divide(numerator: list[int], denominator: list[int]) -> tuple[list[int], list[int]]:
    """(quotient, remainder) of two polynomials mod PRIME, coefficients constant
    first; ``denominator`` is monic."""
    remainder = list(numerator)
    d = len(denominator) - 1
    quotient = [0] * max(len(remainder) - d, 1)
    for i in range(len(remainder) - 1, d - 1, -1):
        c = remainder[i]
        if c:
            quotient[i - d] = c
            for j, dc in enumerate(denominator):
                remainder[i - d + j] = (remainder[i - d + j] - c * dc) % PRIME
    return quotient, remainder[:d]
