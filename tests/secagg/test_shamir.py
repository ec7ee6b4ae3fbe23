"""Shamir secret sharing over GF(2^521 - 1)."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.secagg import shamir


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=64),
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_threshold_subset_recovers_the_secret(secret: bytes, n: int, data: st.DataObject):
    t = data.draw(st.integers(min_value=1, max_value=n))
    xs = data.draw(st.lists(st.integers(1, 65535), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, xs, t)
    subset = data.draw(st.lists(st.sampled_from(xs), min_size=t, max_size=n, unique=True))
    assert shamir.combine([shares[x] for x in subset], t, len(secret)) == secret


def test_every_subset_of_size_t_agrees() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, range(1, 8), 4)
    for subset in itertools.combinations(shares.values(), 4):
        assert shamir.combine(subset, 4, 32) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = shamir.split(b"k" * 16, [1, 2, 3, 4], 3)
    with pytest.raises(ValueError, match="2 shares given, threshold 3 needed"):
        shamir.combine([shares[1], shares[2]], 3, 16)


def test_t_minus_one_shares_interpolate_to_something_else() -> None:
    # with one share missing, interpolation at degree t-2 does not give the secret
    secret = os.urandom(16)
    shares = shamir.split(secret, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine([shares[1], shares[2]], 2, 16)


def test_share_tampered_in_its_high_bytes_is_detected_by_size() -> None:
    # the size check is no integrity check (a low-bit change passes); shares travel
    # under AES-GCM, and the server checks recovered mask keys against signed ones
    shares = shamir.split(os.urandom(16), [1, 2, 3], 2)
    bad = bytearray(shares[2])
    bad[10] ^= 1
    with pytest.raises(ValueError, match="inconsistent"):
        shamir.combine([shares[1], bytes(bad)], 2, 16)


def test_shares_are_fixed_size_and_carry_their_index() -> None:
    shares = shamir.split(b"\x00" * 32, [5, 9], 2)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    assert [shamir.share_x(shares[x]) for x in (5, 9)] == [5, 9]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ((b"", [1, 2], 1), "secret length 0"),
        ((b"x" * 65, [1, 2], 1), "secret length 65"),
        ((b"x", [0, 2], 1), "share index x=0"),
        ((b"x", [3, 3], 1), "x=3 is repeated"),
        ((b"x", [1, 2], 3), "threshold 3 must lie in 1..2"),
        (("x", [1, 2], 1), "secret must be bytes"),
    ],
)
def test_bad_split_arguments_are_named(args: tuple, fragment: str) -> None:
    with pytest.raises((ValueError, TypeError), match=fragment):
        shamir.split(*args)


def test_malformed_or_duplicate_shares_are_refused() -> None:
    shares = shamir.split(b"s" * 16, [1, 2], 2)
    with pytest.raises(ValueError, match="same x = 1"):
        shamir.combine([shares[1], shares[1]], 2, 16)
    with pytest.raises(ValueError, match=f"a share must be {shamir.SHARE_BYTES} bytes, got 3"):
        shamir.combine([b"abc", shares[1]], 2, 16)
    with pytest.raises(ValueError, match="x=0"):
        shamir.combine([bytes(shamir.SHARE_BYTES), shares[1]], 2, 16)
