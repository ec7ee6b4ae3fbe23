"""The CUDA kernels' per-item code, run on the host, equals the CPU path.

common.cuh holds every kernel's per-item body as a __host__ __device__
function; `_core.cuda_emulate_*` runs the same source on the CPU. This checks
the device AES tables, counter indexing, offsets, sign handling and the
quantisation arithmetic wherever the core is built with CUDA, GPU or not.
(What it cannot check: the device compiler's code and the launch geometry;
tests/core/test_cuda.py and bench/gpu_check.py do that on a GPU.)
"""

from __future__ import annotations

import numpy as np
import pytest
from core_oracle import openssl_words

from fedge import _core, core

pytestmark = pytest.mark.skipif(not core.info()["cuda_compiled"], reason="core built without CUDA")


@pytest.mark.parametrize(
    ("n", "offset"), [(0, 0), (1, 0), (3, 1), (5, 2), (4099, 7), (64, 2**40 + 3)]
)
def test_device_prg_code_equals_openssl(n: int, offset: int) -> None:
    seed = bytes(range(100, 116))
    np.testing.assert_array_equal(
        _core.cuda_emulate_prg(seed, n, offset), openssl_words(seed, n, offset)
    )


def test_device_mask_code_equals_the_cpu_masks() -> None:
    rng = np.random.default_rng(9)
    base = rng.integers(0, 2**32, 20_003, dtype=np.uint32)
    seeds = [rng.bytes(16) for _ in range(7)]
    signs = [1, -1, -1, 1, 1, -1, 1]
    cpu = base.copy()
    core.apply_masks(cpu, seeds, signs, offset_words=6)
    emu = base.copy()
    _core.cuda_emulate_apply_masks(emu, b"".join(seeds), signs, 6)
    np.testing.assert_array_equal(emu, cpu)


@pytest.mark.parametrize("bits", [1, 12, 24, 31])
def test_device_quantise_code_equals_the_cpu_bits(bits: int) -> None:
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(30_001) * 1.5).astype(np.float32)
    x[:3] = [1.25, -1.25, 9.0]
    seed = rng.bytes(16)
    np.testing.assert_array_equal(
        _core.cuda_emulate_quantise(x, 1.25, bits, seed),
        core.quantise(x, clip=1.25, bits=bits, seed=seed),
    )


def test_device_quantise_code_flags_nan() -> None:
    x = np.zeros(17, np.float32)
    x[16] = np.inf
    with pytest.raises(ValueError, match="x contains NaN or infinity"):
        _core.cuda_emulate_quantise(x, 1.0, 8, bytes(16))


def test_device_noise_code_uses_the_same_uniforms_as_the_cpu() -> None:
    # On the host the per-item code calls libm, so it must match the CPU path
    # bit for bit; on a GPU only CUDA's log/sin/cos differ (test_cuda.py).
    cpu = np.arange(1001, dtype=np.float32)
    emu = cpu.copy()
    core.add_gaussian_noise(cpu, std=0.5, seed=b"n" * 16)
    _core.cuda_emulate_gaussian_noise(emu, 0.5, b"n" * 16)
    np.testing.assert_array_equal(emu, cpu)
