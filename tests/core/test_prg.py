"""The PRG is OpenSSL's AES-128-CTR keystream, on every path this CPU has."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from core_oracle import PATHS, openssl_words
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge import _core, core


def test_info_reports_the_build() -> None:
    info = core.info()
    assert info["simd"] in ("vaes", "vaes256", "aesni", "portable")
    if info["simd_forced"] is None:
        assert info["simd"] == info["paths"][0]  # the fastest
    assert "portable" in info["paths"]
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["gpus"], int) and info["gpus"] >= 0


def test_fips197_appendix_c1_block(path: str) -> None:
    # FIPS-197 C.1: AES-128 of 00112233..ff under key 000102..0f. A counter
    # block equal to the plaintext yields the ciphertext as keystream.
    key = bytes(range(16))
    block = bytes.fromhex("00112233445566778899aabbccddeeff")
    out = _core.ctr_blocks(key, block, 1, path=path)
    assert out.hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"


def test_fips197_appendix_b_block(path: str) -> None:
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    block = bytes.fromhex("3243f6a8885a308d313198a2e0370734")
    assert _core.ctr_blocks(key, block, 1, path=path).hex() == "3925841d02dc09fbdc118597196a0b32"


def test_sp800_38a_f51_ctr_aes128(path: str) -> None:
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    counter = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    plaintext = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172a"
        "ae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52ef"
        "f69f2445df4f9b17ad2b417be66c3710"
    )
    expected = bytes.fromhex(
        "874d6191b620e3261bef6864990db6ce"
        "9806f66b7970fdff8617187bb9fffdff"
        "5ae4df3edbd5d35e5b4f09020db03eab"
        "1e031dda2fbe03d1792170a0f3009cee"
    )
    ks = _core.ctr_blocks(key, counter, 4, path=path)
    assert bytes(a ^ b for a, b in zip(ks, plaintext, strict=True)) == expected


@pytest.mark.parametrize("n_words", [0, 1, 3, 4, 5, 31, 32, 33, 129, 1_000_003])
def test_prg_equals_openssl_from_word_zero(path: str, n_words: int) -> None:
    seed = os.urandom(16)
    got = core.prg(seed, n_words, path=path)
    assert got.dtype == np.uint32 and got.shape == (n_words,)
    np.testing.assert_array_equal(got, openssl_words(seed, n_words))


def test_prg_equals_openssl_at_random_offsets(path: str) -> None:
    rng = np.random.default_rng(1234)
    for _ in range(25):
        seed = rng.bytes(16)
        n = int(rng.integers(0, 3000))
        off = int(rng.integers(0, 1 << 40))
        np.testing.assert_array_equal(
            core.prg(seed, n, off, path=path), openssl_words(seed, n, off)
        )


def test_prg_offset_is_a_slice_of_the_stream(path: str) -> None:
    seed = b"\x07" * 16
    whole = core.prg(seed, 5000, path=path)
    for off in (1, 2, 3, 4, 5, 127, 128, 129, 4093):
        np.testing.assert_array_equal(core.prg(seed, 200, off, path=path), whole[off : off + 200])


def test_counter_crosses_the_32_bit_block_boundary(path: str) -> None:
    seed = b"\xa5" * 16
    off = 4 * (2**32 - 3) + 1  # blocks 2^32-3 .. 2^32+something
    np.testing.assert_array_equal(
        core.prg(seed, 101, off, path=path), openssl_words(seed, 101, off)
    )


def test_all_paths_agree_on_a_long_stream() -> None:
    seed = os.urandom(16)
    ref = core.prg(seed, 70_001, 3, path="portable")
    for p in PATHS:
        np.testing.assert_array_equal(core.prg(seed, 70_001, 3, path=p), ref)


def test_env_var_forces_the_path() -> None:
    code = (
        "import fedge.core as c, numpy as np;"
        "i = c.info(); print(i['simd_forced'], i['simd'], int(c.prg(bytes(16), 9, 2)[-1]))"
    )
    expected_word = int(openssl_words(bytes(16), 9, 2)[-1])
    for p in PATHS:
        env = dict(os.environ, FEDGE_SIMD=p)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [p, p, str(expected_word)]
    assert core.info()["simd_error"] is None or os.environ.get("FEDGE_SIMD")


def test_env_var_naming_an_unknown_path_is_an_error() -> None:
    env = dict(os.environ, FEDGE_SIMD="sse9")
    code = "import fedge.core as c; c.prg(bytes(16), 4)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "FEDGE_SIMD='sse9'" in out.stderr
    # info() says so, and check_simd (what the agent runs at start) refuses
    code = ("import fedge.core as c; print(c.info()['simd_error']); c.check_simd()")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert out.stdout.startswith("FEDGE_SIMD='sse9' names no usable path")
    assert "ValueError: FEDGE_SIMD='sse9' names no usable path" in out.stderr


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"seed": b"short", "n_words": 4}, ValueError, "seed must be 16 bytes, got 5"),
        ({"seed": "x" * 16, "n_words": 4}, TypeError, "seed must be 16 bytes"),
        ({"seed": bytes(16), "n_words": -1}, ValueError, "n_words must be >= 0"),
        ({"seed": bytes(16), "n_words": 2.0}, TypeError, "n_words must be an int"),
        ({"seed": bytes(16), "n_words": 4, "offset_words": -3}, ValueError, "offset_words"),
        ({"seed": bytes(16), "n_words": 4, "offset_words": 1 << 63}, ValueError, "offset_words"),
        ({"seed": bytes(16), "n_words": 4, "path": "neon"}, ValueError, "path='neon'"),
    ],
)
def test_prg_rejects_bad_arguments(kwargs: dict, exc: type, words: str) -> None:
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        core.prg(**kwargs)


def test_unsupported_path_is_named() -> None:
    missing = [p for p in ("vaes", "vaes256", "aesni") if p not in PATHS]
    if not missing:
        pytest.skip("this CPU has every path")
    with pytest.raises(ValueError, match="not supported by this CPU"):
        core.prg(bytes(16), 4, path=missing[0])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.binary(min_size=16, max_size=16),
    n_words=st.integers(0, 300),
    offset_words=st.integers(0, 2**62 - 301),
    path=st.sampled_from(PATHS),
)
def test_any_window_of_the_stream_equals_openssl(
    seed: bytes, n_words: int, offset_words: int, path: str
) -> None:
    got = core.prg(seed, n_words, offset_words, path=path)
    np.testing.assert_array_equal(got, openssl_words(seed, n_words, offset_words))


def test_ctr_blocks_refuses_a_count_whose_buffer_size_would_wrap() -> None:
    # 4 * (2^62 + 1) words wraps to 4: the kernel would write 2^62 + 1 blocks
    # into a 16-byte buffer with the GIL released.
    for n_blocks in (2**62 + 1, 2**61, 2**60 + 1):
        with pytest.raises(ValueError, match=f"n_blocks must be at most 2\\^60.*got {n_blocks}"):
            _core.ctr_blocks(bytes(16), bytes(16), n_blocks, path="portable")


@pytest.mark.parametrize(
    ("n_words", "offset_words"), [(4, 2**62), (1, 2**62), (2**61 + 1, 2**61), (2**62, 1)]
)
def test_a_window_ending_beyond_word_2_62_is_refused(n_words: int, offset_words: int) -> None:
    # Each count alone is within 2^62; their sum is not.
    with pytest.raises(ValueError, match=r"offset_words \+ n_words must be at most 2\^62"):
        core.prg(bytes(16), n_words, offset_words)
    with pytest.raises(ValueError, match=r"offset_words \+ n_words must be at most 2\^62"):
        _core.prg(bytes(16), n_words, offset_words)


def test_a_window_ending_exactly_at_word_2_62_is_served(path: str) -> None:
    seed = b"\x3c" * 16
    np.testing.assert_array_equal(
        core.prg(seed, 7, 2**62 - 7, path=path), openssl_words(seed, 7, 2**62 - 7)
    )
    assert core.prg(seed, 0, 2**62, path=path).shape == (0,)
