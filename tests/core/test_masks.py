"""apply_masks: one pass adding/subtracting many seeds' streams, in place."""

from __future__ import annotations

import os

import numpy as np
import pytest
from core_oracle import openssl_words
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge import core


def _reference(vec: np.ndarray, seeds: list[bytes], signs: list[int], off: int) -> np.ndarray:
    out = vec.astype(np.uint64)
    for s, g in zip(seeds, signs, strict=True):
        out = out + (g % (1 << 32)) * openssl_words(s, len(vec), off).astype(np.uint64)
    return (out % (1 << 32)).astype(np.uint32)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 4099, 200_003])
def test_masks_equal_the_openssl_reference(path: str, n: int) -> None:
    rng = np.random.default_rng(n)
    vec = rng.integers(0, 2**32, n, dtype=np.uint32)
    seeds = [rng.bytes(16) for _ in range(5)]
    signs = [1, -1, 1, 1, -1]
    off = int(rng.integers(0, 1000))
    expected = _reference(vec, seeds, signs, off)
    core.apply_masks(vec, seeds, signs, offset_words=off, path=path)
    np.testing.assert_array_equal(vec, expected)


def test_cancelling_pairwise_masks_sum_to_the_plain_sum(path: str) -> None:
    # Four clients; each pair (i, j) shares a seed, i < j adds it and j subtracts.
    rng = np.random.default_rng(7)
    n, d = 4, 100_001
    inputs = [rng.integers(0, 2**20, d, dtype=np.uint32) for _ in range(n)]
    pair_seed = {(i, j): rng.bytes(16) for i in range(n) for j in range(i + 1, n)}
    masked = []
    for i in range(n):
        seeds, signs = [], []
        for j in range(n):
            if j != i:
                seeds.append(pair_seed[min(i, j), max(i, j)])
                signs.append(1 if i < j else -1)
        v = inputs[i].copy()
        core.apply_masks(v, seeds, signs, threads=2, path=path)
        assert not np.array_equal(v, inputs[i])
        masked.append(v)
    total = np.zeros(d, np.uint32)
    for v in masked:
        total += v  # uint32 arithmetic wraps mod 2^32
    np.testing.assert_array_equal(total, np.sum(inputs, axis=0, dtype=np.uint32))


def test_threads_and_paths_give_identical_results() -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 2**32, 1_000_001, dtype=np.uint32)
    seeds = np.frombuffer(rng.bytes(16 * 6), np.uint8).reshape(6, 16)
    signs = np.array([1, -1, -1, 1, 1, -1])
    ref = base.copy()
    core.apply_masks(ref, seeds, signs, offset_words=13, path="portable")
    for p in core.info()["paths"]:
        for t in (1, 2, 3, 8):
            v = base.copy()
            core.apply_masks(v, seeds, signs, offset_words=13, threads=t, path=p)
            np.testing.assert_array_equal(v, ref, err_msg=f"path={p} threads={t}")


def test_mask_then_unmask_restores_the_vector() -> None:
    v = np.arange(12345, dtype=np.uint32)
    seeds = [os.urandom(16) for _ in range(3)]
    core.apply_masks(v, seeds, [1, 1, -1], offset_words=99)
    core.apply_masks(v, seeds, [-1, -1, 1], offset_words=99)
    np.testing.assert_array_equal(v, np.arange(12345, dtype=np.uint32))


def test_masks_are_applied_in_place_on_a_torch_view() -> None:
    torch = pytest.importorskip("torch")
    t = torch.zeros(1000, dtype=torch.uint32)
    seed = b"\x01" * 16
    core.apply_masks(t, [seed], [1])
    np.testing.assert_array_equal(t.numpy(), openssl_words(seed, 1000))


def test_no_seeds_leaves_the_vector_alone() -> None:
    v = np.arange(10, dtype=np.uint32)
    core.apply_masks(v, [], [])
    np.testing.assert_array_equal(v, np.arange(10, dtype=np.uint32))


def _ok() -> dict:
    return {"vec": np.zeros(8, np.uint32), "seeds": [bytes(16)], "signs": [1]}


@pytest.mark.parametrize(
    ("change", "exc", "words"),
    [
        ({"vec": np.zeros(8, np.int64)}, TypeError, "vec must have dtype uint32, got int64"),
        ({"vec": np.zeros(8, np.float32)}, TypeError, "vec must have dtype uint32"),
        ({"vec": [0, 1, 2]}, TypeError, "vec must be a numpy array"),
        ({"vec": np.zeros((2, 4), np.uint32)}, ValueError, "vec must be 1-D"),
        ({"vec": np.zeros(16, np.uint32)[::2]}, ValueError, "vec must be C-contiguous"),
        ({"seeds": [bytes(15)]}, ValueError, r"seeds\[0\] must be 16 bytes, got 15"),
        ({"seeds": bytes(16)}, TypeError, "seeds must be a sequence"),
        ({"seeds": np.zeros((1, 8), np.uint8)}, ValueError, "shape"),
        ({"signs": [1, -1]}, ValueError, "signs has 2 entries but there are 1 seeds"),
        ({"signs": [2]}, ValueError, r"signs\[0\] must be \+1 or -1, got 2"),
        ({"signs": [True]}, TypeError, r"signs\[0\]"),
    ],
)
def test_bad_arguments_are_named(change: dict, exc: type, words: str) -> None:
    args = _ok() | change
    with pytest.raises(exc, match=words):
        core.apply_masks(args["vec"], args["seeds"], args["signs"])


def test_read_only_vector_is_refused_and_untouched() -> None:
    v = np.arange(8, dtype=np.uint32)
    v.flags.writeable = False
    with pytest.raises(ValueError, match="vec is read-only"):
        core.apply_masks(v, [bytes(16)], [1])
    np.testing.assert_array_equal(v, np.arange(8))


def test_bad_threads_is_named() -> None:
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        core.apply_masks(np.zeros(4, np.uint32), [bytes(16)], [1], threads=0)


def test_binding_layer_checks_buffers_itself() -> None:
    # The C++ binding refuses what the Python wrapper would have refused.
    from fedge import _core

    with pytest.raises(TypeError, match="vec must have dtype uint32"):
        _core.apply_masks(np.zeros(4, np.int32), bytes(16), [1])
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.apply_masks(np.zeros(8, np.uint32)[::2], bytes(16), [1])
    with pytest.raises(ValueError, match="signs"):
        _core.apply_masks(np.zeros(8, np.uint32), bytes(32), [1])


def test_a_contiguous_view_is_masked_in_its_parent() -> None:
    parent = np.zeros(1000, np.uint32)
    view = parent[100:200]
    seed = b"\x02" * 16
    core.apply_masks(view, [seed], [1])
    np.testing.assert_array_equal(parent[100:200], openssl_words(seed, 100))
    assert not parent[:100].any() and not parent[200:].any()


def test_the_gil_is_released_while_masking() -> None:
    import threading
    import time

    stamps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    vec = np.zeros(3_000_000, np.uint32)
    seeds = [bytes([i]) * 16 for i in range(4)]
    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        core.apply_masks(vec, seeds, [1, 1, 1, 1], path="portable")  # ~0.1-0.5 s
        t1 = time.perf_counter()
    finally:
        stop.set()
        ticker.join(timeout=10)
    assert t1 - t0 > 0.05, "the call was too short to tell"
    inside = [s for s in stamps if t0 + 0.01 < s < t1 - 0.01]
    assert inside, "no Python thread ran while apply_masks held the CPU"


@settings(max_examples=25, deadline=None)
@given(
    n_clients=st.integers(2, 6),
    d=st.integers(0, 5000),
    offset=st.integers(0, 2**40),
    threads=st.integers(1, 3),
    data=st.data(),
)
def test_pairwise_masks_cancel_for_any_cohort(
    n_clients: int, d: int, offset: int, threads: int, data: st.DataObject
) -> None:
    seeds = {
        (i, j): data.draw(st.binary(min_size=16, max_size=16))
        for i in range(n_clients)
        for j in range(i + 1, n_clients)
    }
    rng = np.random.default_rng(d)
    inputs = [rng.integers(0, 2**32, d, dtype=np.uint32) for _ in range(n_clients)]
    total = np.zeros(d, np.uint32)
    for i, x in enumerate(inputs):
        others = [j for j in range(n_clients) if j != i]
        v = x.copy()
        core.apply_masks(
            v,
            [seeds[min(i, j), max(i, j)] for j in others],
            [1 if i < j else -1 for j in others],
            offset_words=offset,
            threads=threads,
        )
        total += v
    np.testing.assert_array_equal(total, np.sum(inputs, axis=0, dtype=np.uint32))


def test_masking_beyond_word_2_62_is_refused_and_untouched() -> None:
    v = np.zeros(8, np.uint32)
    with pytest.raises(ValueError, match=r"offset_words \+ n_words must be at most 2\^62"):
        core.apply_masks(v, [bytes(16)], [1], offset_words=2**62 - 7)
    assert not v.any()
    core.apply_masks(v, [bytes(16)], [1], offset_words=2**62 - 8)  # ends exactly at 2^62
    np.testing.assert_array_equal(v, openssl_words(bytes(16), 8, 2**62 - 8))
