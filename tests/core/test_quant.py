"""Quantisation: clipping, unbiased stochastic rounding, no wrap in the sum."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from core_oracle import openssl_words

from fedge import core


def numpy_quantise(x: np.ndarray, clip: float, bits: int, seed: bytes) -> np.ndarray:
    """The CONTRACTS.md formula in numpy (IEEE double, no FMA): the reference."""
    u = openssl_words(seed, len(x)).astype(np.float64) * 2.0**-32
    s = (2**bits - 1) / (2 * clip)
    v = np.clip(x.astype(np.float64), -clip, clip)
    return np.minimum(np.floor((v + clip) * s + u), 2**bits - 1).astype(np.uint32)


@pytest.mark.parametrize(
    ("n", "bits"), [(1, 31), (2, 31), (3, 30), (4, 30), (5, 29), (1000, 22), (2**32 - 1, 1)]
)
def test_quant_bits_is_the_largest_safe_width(n: int, bits: int) -> None:
    b = core.quant_bits(n)
    assert b == bits
    assert n * (2**b - 1) <= 2**32 - 1
    assert b == 31 or n * (2 ** (b + 1) - 1) > 2**32 - 1


def test_quant_bits_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="n_summands must be >= 1, got 0"):
        core.quant_bits(0)
    with pytest.raises(ValueError, match="n_summands=4294967296 is too many"):
        core.quant_bits(2**32)


@pytest.mark.parametrize("bits", [1, 8, 16, 24, 31])
def test_quantise_matches_the_numpy_formula_bit_for_bit(path: str, bits: int) -> None:
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(50_003) * 2).astype(np.float32)
    x[:4] = [3.0, -3.0, 2.5, -2.5]  # exactly at and beyond the clip
    seed = rng.bytes(16)
    q = core.quantise(x, clip=2.5, bits=bits, seed=seed, path=path)
    assert q.dtype == np.uint32
    np.testing.assert_array_equal(q, numpy_quantise(x, 2.5, bits, seed))
    assert int(q.max()) <= 2**bits - 1


def test_threads_give_the_same_bits() -> None:
    x = np.random.default_rng(0).standard_normal(600_001).astype(np.float32)
    seed = b"q" * 16
    ref = core.quantise(x, clip=1.0, bits=20, seed=seed)
    for t in (2, 3, 7):
        np.testing.assert_array_equal(
            core.quantise(x, clip=1.0, bits=20, seed=seed, threads=t), ref
        )


def test_round_trip_error_is_within_one_step() -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(200_000) * 0.5).astype(np.float32)
    clip, bits = 1.0, 12
    q = core.quantise(x, clip=clip, bits=bits, seed=rng.bytes(16))
    back = core.dequantise(q, n_summands=1, clip=clip, bits=bits)
    assert back.dtype == np.float64
    step = 2 * clip / (2**bits - 1)
    err = np.abs(back - np.clip(x.astype(np.float64), -clip, clip))
    assert err.max() < step * (1 + 1e-9)


def test_sum_of_n_dequantises_to_the_sum_within_n_steps() -> None:
    rng = np.random.default_rng(6)
    n, d, clip = 7, 50_000, 0.25
    bits = core.quant_bits(n)
    xs = [(rng.standard_normal(d) * 0.1).astype(np.float32) for _ in range(n)]
    total = np.zeros(d, np.uint32)
    for x in xs:
        total += core.quantise(x, clip=clip, bits=bits, seed=rng.bytes(16))
    got = core.dequantise(total, n_summands=n, clip=clip, bits=bits)
    want = np.sum([np.clip(x.astype(np.float64), -clip, clip) for x in xs], axis=0)
    assert np.abs(got - want).max() < n * 2 * clip / (2**bits - 1)


def test_stochastic_rounding_is_unbiased() -> None:
    # 4-bit grid, clip 1: the grid step is 2/15, so deterministic rounding of
    # these values would be off by up to 0.067; stochastic rounding's mean
    # error must fall within 5 standard errors of zero.
    clip, bits, m = 1.0, 4, 400_000
    step = 2 * clip / (2**bits - 1)
    for value in (0.123, -0.71, 0.3 * step, 0.999):
        x = np.full(m, value, np.float32)
        q = core.quantise(x, clip=clip, bits=bits, seed=b"unbiased-rounding"[:16])
        back = core.dequantise(q, n_summands=1, clip=clip, bits=bits)
        frac = ((float(np.float32(value)) + clip) / step) % 1.0
        sd = step * np.sqrt(frac * (1 - frac)) / np.sqrt(m)
        bias = back.mean() - float(np.float32(value))
        assert abs(bias) <= 5 * sd + 1e-12, (value, bias, sd)
        # and it really does round both ways
        assert len(np.unique(q)) == (1 if frac == 0 else 2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_refused(bad: float) -> None:
    x = np.zeros(1000, np.float32)
    x[777] = bad
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        core.quantise(x, clip=1.0, bits=8, seed=bytes(16))


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"clip": 0.0}, ValueError, "clip must be > 0, got 0.0"),
        ({"clip": float("nan")}, ValueError, "clip must be finite"),
        ({"bits": 32}, ValueError, "bits must be <= 31, got 32"),
        ({"bits": 0}, ValueError, "bits must be >= 1, got 0"),
        ({"seed": bytes(8)}, ValueError, "seed must be 16 bytes, got 8"),
        ({"x": np.zeros(4, np.float64)}, TypeError, "x must have dtype float32, got float64"),
        ({"x": np.zeros((2, 2), np.float32)}, ValueError, "x must be 1-D"),
    ],
)
def test_quantise_rejects_bad_arguments(kwargs: dict, exc: type, words: str) -> None:
    args = {"x": np.zeros(4, np.float32), "clip": 1.0, "bits": 8, "seed": bytes(16)} | kwargs
    x = args.pop("x")
    with pytest.raises(exc, match=words):
        core.quantise(x, **args)


def test_dequantise_refuses_a_width_that_could_have_wrapped() -> None:
    with pytest.raises(ValueError, match="bits=31 with n_summands=3 can wrap"):
        core.dequantise(np.zeros(4, np.uint32), n_summands=3, clip=1.0, bits=31)
    with pytest.raises(TypeError, match="total must have dtype uint32"):
        core.dequantise(np.zeros(4, np.int32), n_summands=1, clip=1.0, bits=8)


def test_out_buffer_is_filled_in_place_with_the_same_bits(path: str) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal(70_001).astype(np.float32)
    seed = rng.bytes(16)
    out = np.full(x.size, 0xDEADBEEF, np.uint32)
    got = core.quantise(x, clip=2.0, bits=22, seed=seed, path=path, out=out, threads=2)
    assert got is out
    np.testing.assert_array_equal(out, numpy_quantise(x, 2.0, 22, seed))
    # reused for another vector: every word is rewritten
    y = rng.standard_normal(x.size).astype(np.float32)
    core.quantise(y, clip=2.0, bits=22, seed=seed, path=path, out=out)
    np.testing.assert_array_equal(out, numpy_quantise(y, 2.0, 22, seed))


def test_out_may_be_a_cpu_tensor_and_is_returned_as_given() -> None:
    torch = pytest.importorskip("torch")
    x = np.linspace(-1, 1, 1001, dtype=np.float32)
    t = torch.zeros(1001, dtype=torch.uint32)
    assert core.quantise(x, clip=1.0, bits=12, seed=bytes(16), out=t) is t
    np.testing.assert_array_equal(t.numpy(), core.quantise(x, clip=1.0, bits=12, seed=bytes(16)))


def _bad_outs() -> list[tuple[object, type, str]]:
    ro = np.zeros(8, np.uint32)
    ro.flags.writeable = False
    return [
        (np.zeros(7, np.uint32), ValueError, "out has 7 elements but x has 8"),
        (np.zeros(8, np.int32), TypeError, "out must have dtype uint32, got int32"),
        (np.zeros(16, np.uint32)[::2], ValueError, "out must be C-contiguous"),
        (ro, ValueError, "out is read-only but is written in place"),
        ([0] * 8, TypeError, "out must be a numpy array, got list"),
    ]


@pytest.mark.parametrize(("out", "exc", "words"), _bad_outs())
def test_a_bad_out_buffer_is_refused_and_left_untouched(out: object, exc: type, words: str) -> None:
    x = np.ones(8, np.float32)
    before = np.array(out, copy=True) if isinstance(out, np.ndarray) else None
    with pytest.raises(exc, match=words):
        core.quantise(x, clip=1.0, bits=8, seed=bytes(16), out=out)
    if before is not None:
        np.testing.assert_array_equal(out, before)


def test_out_overlapping_x_is_refused_in_the_binding_too() -> None:
    buf = np.zeros(128, np.float32)
    x = buf[:64]
    for out in (x.view(np.uint32), buf[32:96].view(np.uint32)):  # same memory; partly shared
        with pytest.raises(ValueError, match="out overlaps x"):
            core.quantise(x, clip=1.0, bits=8, seed=bytes(16), out=out)
    assert not buf.any()  # nothing written
    disjoint = buf[64:].view(np.uint32)  # adjacent but separate
    core.quantise(x, clip=1.0, bits=8, seed=bytes(16), out=disjoint)
    assert (disjoint == core.quantise(x, clip=1.0, bits=8, seed=bytes(16))).all()


# ------------------------------------------------ recycled result buffers
POOL_WORDS = 1 << 18  # 1 MiB of uint32: the smallest result the pool serves


def _addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def test_a_dropped_result_is_recycled_for_the_next_call_of_its_length() -> None:
    core.release_buffers()
    x = np.random.default_rng(1).standard_normal(POOL_WORDS).astype(np.float32)
    first = core.quantise(x, clip=2.0, bits=20, seed=bytes(16))
    where = _addr(first)
    assert where % 64 == 0
    del first
    assert core.buffer_pool()["buffers"] == 1
    before = core.buffer_pool()["reused"]
    again = core.quantise(x, clip=2.0, bits=20, seed=b"\x01" * 16)
    assert _addr(again) == where  # the same pages, not fresh ones
    assert core.buffer_pool()["reused"] == before + 1
    assert core.buffer_pool()["buffers"] == 0
    np.testing.assert_array_equal(again, numpy_quantise(x, 2.0, 20, b"\x01" * 16))


def test_a_live_result_or_a_view_of_one_is_never_handed_out_again() -> None:
    core.release_buffers()
    rng = np.random.default_rng(2)
    x = rng.standard_normal(POOL_WORDS).astype(np.float32)
    kept = core.quantise(x, clip=2.0, bits=20, seed=bytes(16))
    tail = core.quantise(x, clip=2.0, bits=20, seed=b"\x02" * 16)[POOL_WORDS // 2 :]
    kept_copy, tail_copy = kept.copy(), tail.copy()
    for i in range(3):
        other = core.quantise(x * (i + 2), clip=2.0, bits=20, seed=b"\x03" * 16)
        assert _addr(other) not in (_addr(kept), _addr(tail) - 4 * (POOL_WORDS // 2))
        del other
    np.testing.assert_array_equal(kept, kept_copy)
    np.testing.assert_array_equal(tail, tail_copy)


def test_the_pool_stays_within_its_bounds_and_can_be_emptied() -> None:
    core.release_buffers()
    limits = core.buffer_pool()
    x = np.ones(POOL_WORDS + 5 * 16, np.float32)
    results = [
        core.quantise(x[: POOL_WORDS + 16 * i], clip=1.0, bits=8, seed=bytes(16)) for i in range(6)
    ]
    del results
    now = core.buffer_pool()
    assert now["buffers"] == limits["max_buffers"] == 4  # six dropped, the oldest two freed
    assert now["bytes"] <= limits["max_bytes"]
    core.release_buffers()
    assert core.buffer_pool()["buffers"] == core.buffer_pool()["bytes"] == 0


def test_small_results_and_refused_calls_leave_the_pool_alone() -> None:
    core.release_buffers()
    small = core.quantise(np.ones(POOL_WORDS - 1, np.float32), clip=1.0, bits=8, seed=bytes(16))
    del small
    assert core.buffer_pool()["buffers"] == 0
    bad = np.zeros(POOL_WORDS, np.float32)
    bad[-1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        core.quantise(bad, clip=1.0, bits=8, seed=bytes(16))
    assert core.buffer_pool()["buffers"] == 1  # the refused call's buffer came back


def test_a_pooled_result_is_counted_by_tracemalloc_while_it_lives() -> None:
    import tracemalloc

    core.release_buffers()
    x = np.ones(POOL_WORDS, np.float32)
    core.quantise(x, clip=1.0, bits=8, seed=bytes(16))  # one buffer now waits in the pool
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        q = core.quantise(x, clip=1.0, bits=8, seed=bytes(16))  # served from the pool
        assert core.buffer_pool()["buffers"] == 0
        assert tracemalloc.get_traced_memory()[0] - before >= q.nbytes
        del q
        assert tracemalloc.get_traced_memory()[0] - before < 4096
    finally:
        tracemalloc.stop()


def test_the_pool_keeps_within_its_byte_bound_and_frees_a_result_too_big_for_it() -> None:
    """Three dropped 200 MiB results: the oldest is freed to stay within 512 MiB; a
    result larger than the whole bound goes straight back to the system. (About
    1.1 GB at the peak, for under a second.)"""
    core.release_buffers()
    limits = core.buffer_pool()
    words = (200 << 20) // 4
    x = np.ones(words + 2, np.float32)
    results = [core.quantise(x[: words + i], clip=1.0, bits=8, seed=bytes(16)) for i in range(3)]
    while results:  # dropped oldest first: the pool keeps the last two
        results.pop(0)
    now = core.buffer_pool()
    assert now["buffers"] == 2 and now["bytes"] == 4 * (2 * words + 3) <= limits["max_bytes"]
    del x
    core.release_buffers()
    big = (limits["max_bytes"] // 4) + 1024
    y = np.ones(big, np.float32)
    q = core.quantise(y, clip=1.0, bits=8, seed=bytes(16))
    assert q[-1] == q[0]
    del q
    assert core.buffer_pool()["buffers"] == core.buffer_pool()["bytes"] == 0


# ------------------------------------------------ out= while other threads run
_RESIZE_OUT_DURING_QUANTISE = """
import array, sys, threading, time
import numpy as np
from fedge import _core

n = 1 << 21
x = np.linspace(-2, 2, n, dtype=np.float32)
out = array.array("I", bytes(4 * n))
in_call = threading.Event()
stop = threading.Event()
refused = resized = 0

def resizer():
    global refused, resized
    while not stop.is_set():
        if not in_call.is_set():
            time.sleep(0)
            continue
        try:
            out.append(0)  # may move the buffer the kernel is writing
            del out[n:]
            resized += 1
        except BufferError:
            refused += 1

t = threading.Thread(target=resizer)
t.start()
deadline = time.monotonic() + 20
calls = 0
try:
    while time.monotonic() < deadline and (calls < 5 or refused == 0):
        in_call.set()
        try:
            _core.quantise(x, clip=1.0, bits=16, seed=bytes(16), out=out, path="portable")
            calls += 1
        except ValueError:
            pass  # resized before the call took its export: the length check saw n + 1
        in_call.clear()
finally:
    stop.set()
    t.join()
del out[n:]
want = _core.quantise(x, clip=1.0, bits=16, seed=bytes(16), path="portable")
print(calls, refused, resized, bool((np.frombuffer(out, np.uint32) == want).all()))
"""


def test_out_stays_exported_while_the_kernel_writes_it() -> None:
    # quantise releases the GIL: another thread that resizes `out` meanwhile
    # must get BufferError (the export is held), not free the memory under the
    # kernel. In a subprocess: on failure the kernel writes freed memory.
    proc = subprocess.run(
        [sys.executable, "-c", _RESIZE_OUT_DURING_QUANTISE],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls, refused, _resized, equal = proc.stdout.split()
    assert int(refused) > 0, f"no resize was refused during {calls} calls"
    assert equal == "True"
