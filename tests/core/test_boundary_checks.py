"""What the core refuses at its boundary, in fedge.core and again in the binding.

fedge.core checks every argument before the compiled core sees it, so each
rule is also tested on `fedge._core` directly: the binding is the last line in
front of C++ kernels that would otherwise run into undefined behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedge import _core, core

N = 1001
SEED = bytes(range(16))


def _misaligned(dtype: type, n: int = N) -> np.ndarray:
    """A writable 1-D array one byte past an aligned address, filled with 1s."""
    a = np.frombuffer(bytearray(np.dtype(dtype).itemsize * n + 1), dtype, count=n, offset=1)
    assert not a.flags.aligned and a.flags.writeable and a.flags.c_contiguous
    a[:] = 1
    return a


def _f32(n: int = N) -> np.ndarray:
    return np.ones(n, np.float32)


def _u32(n: int = N) -> np.ndarray:
    return np.ones(n, np.uint32)


# name of the misaligned argument -> a call that passes it misaligned; the
# same call with aligned arrays runs.
def _calls(api: object) -> dict[str, Callable[[Callable], object]]:
    fast = api is _core

    def quantise_out(mk: Callable) -> object:
        return api.quantise(_f32(), clip=1.0, bits=8, seed=SEED, out=mk(np.uint32))

    return {
        "apply_masks vec": lambda mk: api.apply_masks(
            mk(np.uint32), SEED if fast else [SEED], [1]
        ),
        "quantise x": lambda mk: api.quantise(mk(np.float32), clip=1.0, bits=8, seed=SEED),
        "quantise out": quantise_out,
        "dequantise total": lambda mk: api.dequantise(
            mk(np.uint32), n_summands=1, clip=1.0, bits=8
        ),
        "sgd_step params": lambda mk: api.sgd_step(mk(np.float32), _f32(), None, lr=0.1),
        "sgd_step grads": lambda mk: api.sgd_step(_f32(), mk(np.float32), None, lr=0.1),
        "sgd_step momentum_buf": lambda mk: api.sgd_step(
            _f32(), _f32(), mk(np.float32), lr=0.1, momentum=0.9
        ),
        "sgd_step global_params": lambda mk: api.sgd_step(
            _f32(), _f32(), None, lr=0.1, prox_mu=0.1, global_params=mk(np.float32)
        ),
        "sgd_step scaffold_c": lambda mk: api.sgd_step(
            _f32(), _f32(), None, lr=0.1, scaffold_c=mk(np.float32), scaffold_ci=_f32()
        ),
        "sgd_step scaffold_ci": lambda mk: api.sgd_step(
            _f32(), _f32(), None, lr=0.1, scaffold_c=_f32(), scaffold_ci=mk(np.float32)
        ),
        "adam_step params": lambda mk: api.adam_step(
            mk(np.float32), _f32(), _f32(), _f32(), step=1, lr=0.1
        ),
        "adam_step grads": lambda mk: api.adam_step(
            _f32(), mk(np.float32), _f32(), _f32(), step=1, lr=0.1
        ),
        "adam_step exp_avg": lambda mk: api.adam_step(
            _f32(), _f32(), mk(np.float32), _f32(), step=1, lr=0.1
        ),
        "adam_step exp_avg_sq": lambda mk: api.adam_step(
            _f32(), _f32(), _f32(), mk(np.float32), step=1, lr=0.1
        ),
        "clip_l2 vec": lambda mk: api.clip_l2(mk(np.float32), 0.5),
        "add_gaussian_noise vec": lambda mk: api.add_gaussian_noise(
            mk(np.float32), std=1.0, seed=SEED
        ),
    }


CASES = list(_calls(core))


@pytest.mark.parametrize("api", [core, _core], ids=["core", "_core"])
@pytest.mark.parametrize("case", CASES)
def test_a_misaligned_buffer_is_refused_before_any_kernel_runs(api: object, case: str) -> None:
    """A float32/uint32 buffer at an address that is no multiple of 4 would be
    undefined behaviour in every kernel; both layers refuse it by name, and
    leave it untouched."""
    call = _calls(api)[case]
    arg = case.split()[1]
    made: list[np.ndarray] = []

    def misaligned(dtype: type) -> np.ndarray:
        made.append(_misaligned(dtype))
        return made[-1]

    call(lambda dtype: np.ones(N, dtype))  # aligned: the call itself is valid
    with pytest.raises(ValueError, match=rf"^{arg} is not aligned: its address is not a multiple "
                       r"of 4 bytes"):
        call(misaligned)
    assert (made[0] == 1).all()


@pytest.mark.parametrize("api", [core, _core], ids=["core", "_core"])
def test_an_empty_buffer_at_an_odd_address_is_accepted(api: object) -> None:
    """No element is read, and numpy itself calls such an array aligned."""
    empty = np.frombuffer(bytearray(5), np.float32, count=0, offset=1)
    assert empty.flags.aligned
    assert api.clip_l2(empty, 1.0) == 0.0
    q = api.quantise(empty, clip=1.0, bits=8, seed=SEED)
    assert q.shape == (0,)


# ---------------------------------------------------------------- clip range

# clip values that pass "finite and > 0" but break the double arithmetic:
# 2*clip overflows (scale 0: all zeros, NaN on dequantise) or clip is
# subnormal (scale inf: everything -> -clip).
EXTREME_CLIPS = [1e308, 9e307, float(np.finfo(np.float64).max), 1e-310, 5e-324]


@pytest.mark.parametrize("api", [core, _core], ids=["core", "_core"])
@pytest.mark.parametrize("clip", EXTREME_CLIPS)
def test_quantise_refuses_a_clip_whose_scale_is_zero_or_infinite(api: object, clip: float) -> None:
    x = np.array([-1, 0, 0.5, 1], np.float32)
    head = re.escape(f"clip={clip:g}")
    with pytest.raises(ValueError, match=rf"^{head} is out of range for bits=8 and "
                       r"n_summands=1: the scale \(2\^bits - 1\)/\(2\*clip\) must be a finite "
                       r"number > 0 .* within about \[7\.0\d*e-307, 8\.98847e\+307\]$"):
        api.quantise(x, clip=clip, bits=8, seed=SEED)


@pytest.mark.parametrize("api", [core, _core], ids=["core", "_core"])
@pytest.mark.parametrize("clip", EXTREME_CLIPS)
def test_dequantise_refuses_a_clip_whose_scale_is_zero_or_infinite(
    api: object, clip: float
) -> None:
    head = re.escape(f"clip={clip:g}")
    with pytest.raises(ValueError, match=rf"^{head} is out of range for bits=8"):
        api.dequantise(np.zeros(4, np.uint32), n_summands=1, clip=clip, bits=8)


@pytest.mark.parametrize("api", [core, _core], ids=["core", "_core"])
def test_dequantise_refuses_a_sum_range_beyond_double(api: object) -> None:
    """S/s - n*clip: with 2*n*clip infinite the result would be NaN or inf."""
    with pytest.raises(ValueError, match=r"^clip=1e\+300 is out of range for bits=1 and "
                       r"n_summands=1000000000: .* within about "
                       r"\[2\.78134e-309, 8\.98847e\+298\]$"):
        api.dequantise(np.zeros(4, np.uint32), n_summands=10**9, clip=1e300, bits=1)
    out = api.dequantise(np.zeros(4, np.uint32), n_summands=10**7, clip=1e300, bits=1)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("clip", [1e-290, 1e-3, 1e6, 1e300])
def test_a_large_or_small_clip_inside_the_range_still_round_trips(clip: float) -> None:
    """|dequantise(quantise(x)) - clip(x)| < 1/s, with s = (2^b - 1)/(2 clip)."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(N) * min(clip, 1e30)).astype(np.float32)
    for bits in (1, 8, 31):
        q = core.quantise(x, clip=clip, bits=bits, seed=SEED)
        back = core.dequantise(q, n_summands=1, clip=clip, bits=bits)
        step = 2 * clip / ((1 << bits) - 1)
        want = np.clip(x.astype(np.float64), -clip, clip)
        assert np.isfinite(back).all()
        assert (np.abs(back - want) <= step * (1 + 1e-9)).all(), (clip, bits)


@pytest.mark.parametrize(
    ("clip", "bits", "n"),
    [(c, b, n) for c in (1e308, 8.98e307, 8.99e307, 1e-310, 3e-309, 7e-307, 1e-300)
     for b in (1, 8, 31) for n in (1, 2, 10**9)],
)
def test_the_binding_and_fedge_core_draw_the_clip_line_in_the_same_place(
    clip: float, bits: int, n: int
) -> None:
    def outcome(api: object) -> str:
        try:
            api.dequantise(np.zeros(2, np.uint32), n_summands=n, clip=clip, bits=bits)
        except ValueError as exc:
            return str(exc)
        return "accepted"

    # fedge.core also refuses a width the sum could wrap, before the clip rule
    if n * ((1 << bits) - 1) <= 0xFFFFFFFF:
        assert outcome(core) == outcome(_core)


# ------------------------------------------------------------ type messages


def test_a_byte_swapped_array_is_named_by_its_byte_order() -> None:
    with pytest.raises(TypeError, match=r"^vec must have dtype uint32 in native byte order "
                       r"\(<u4\), got >u4$"):
        core.apply_masks(np.zeros(8, ">u4"), [SEED], [1])
    with pytest.raises(TypeError, match=r"^x must have dtype float32 in native byte order "
                       r"\(<f4\), got >f4$"):
        core.quantise(np.zeros(8, ">f4"), clip=1.0, bits=8, seed=SEED)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: torch.zeros(8, device="meta"), "a torch.strided tensor on meta"),
        (lambda: torch.zeros(8).to_sparse(), "a torch.sparse_coo tensor on cpu"),
    ],
    ids=["meta", "sparse"],
)
def test_a_float32_tensor_numpy_cannot_view_is_not_blamed_on_its_dtype(
    make: Callable[[], torch.Tensor], words: str
) -> None:
    t = make()
    assert t.dtype == torch.float32
    with pytest.raises(TypeError, match=rf"^x must be a dense CPU tensor, got {words}$"):
        core.quantise(t, clip=1.0, bits=8, seed=SEED)
    with pytest.raises(TypeError, match=rf"^vec must be a dense CPU tensor, got {words}$"):
        core.clip_l2(t, 1.0)
