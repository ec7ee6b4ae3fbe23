"""CUDA kernels: bit-identical to the CPU path.

Two layers, skipped apart:

* the kernels themselves (``fedge._core.cuda_*`` on device memory taken from the
  CUDA driver API through ctypes) need only the CUDA build of the core and a GPU it
  can see (``core.info()``): they run on a GPU machine whose torch is CPU-only;
* fedge.core's torch face (CUDA tensors in, CUDA tensors out, its checks of them)
  needs a CUDA-enabled torch as well.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import numpy as np
import pytest

from fedge import _core, core

try:
    import torch
except ImportError:  # the kernel tests need no torch
    torch = None

_INFO = core.info()
if not _INFO["cuda_compiled"]:
    _NO_DEVICE: str | None = "fedge._core was built without CUDA (core.info()['cuda_compiled'] " \
                             "is False)"
elif _INFO["gpus"] == 0:
    _NO_DEVICE = "no CUDA device visible to fedge._core (core.info()['gpus'] == 0)"
else:
    _NO_DEVICE = None

if torch is None:
    _NO_TORCH_CUDA: str | None = "torch is not installed"
elif not torch.cuda.is_available():
    _NO_TORCH_CUDA = (f"torch {torch.__version__} has no CUDA (torch.cuda.is_available() is "
                      "False): fedge.core's CUDA tensor interface cannot be exercised")
else:
    _NO_TORCH_CUDA = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_NO_DEVICE is not None, reason=_NO_DEVICE or ""),
]
# a test of the torch interface: the device reason first, then torch's
needs_torch_cuda = pytest.mark.skipif(
    _NO_DEVICE is not None or _NO_TORCH_CUDA is not None,
    reason=_NO_DEVICE or _NO_TORCH_CUDA or "",
)


# --------------------------------------------- kernels on raw device memory


class DeviceMemory:
    """Device buffers from the CUDA driver API (libcuda, present wherever the NVIDIA
    driver is), allocated in device 0's primary context: the one the core's CUDA
    runtime uses, so the core's kernels can read and write them."""

    def __init__(self) -> None:
        try:
            self._cu = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            pytest.fail(f"core.info() sees {_INFO['gpus']} GPU(s) but libcuda.so.1 does "
                        f"not load: {exc}")
        cu = self._cu
        cu.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
        cu.cuMemFree_v2.argtypes = [ctypes.c_uint64]
        cu.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        cu.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
        cu.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self._check("cuInit", cu.cuInit(0))
        dev = ctypes.c_int()
        self._check("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), 0))
        self._ctx = ctypes.c_void_p()
        self._check("cuDevicePrimaryCtxRetain",
                    cu.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), dev))
        self._dev = dev
        self._check("cuCtxSetCurrent", cu.cuCtxSetCurrent(self._ctx))
        self._live: list[int] = []

    def _check(self, call: str, rc: int) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self._cu.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{call} failed: {rc} {(name.value or b'?').decode()}")

    def empty(self, nbytes: int) -> int:
        """A new device buffer of ``nbytes`` (at least 4) bytes; its address."""
        self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))
        ptr = ctypes.c_uint64()
        self._check("cuMemAlloc", self._cu.cuMemAlloc_v2(ctypes.byref(ptr), max(nbytes, 4)))
        self._live.append(ptr.value)
        return ptr.value

    def put(self, a: np.ndarray) -> int:
        """A new device buffer holding a copy of ``a``; its address."""
        a = np.ascontiguousarray(a)
        ptr = self.empty(a.nbytes)
        if a.nbytes:
            self._check("cuMemcpyHtoD", self._cu.cuMemcpyHtoD_v2(ptr, a.ctypes.data, a.nbytes))
        return ptr

    def get(self, ptr: int, dtype: type, n: int) -> np.ndarray:
        """The ``n`` elements of ``dtype`` at ``ptr``, after all the context's work."""
        self._check("cuCtxSynchronize", self._cu.cuCtxSynchronize())
        out = np.empty(n, dtype)
        if out.nbytes:
            self._check("cuMemcpyDtoH", self._cu.cuMemcpyDtoH_v2(out.ctypes.data, ptr,
                                                                  out.nbytes))
        return out

    def close(self) -> None:
        self._cu.cuCtxSynchronize()
        for ptr in self._live:
            self._cu.cuMemFree_v2(ptr)
        self._live.clear()
        self._cu.cuDevicePrimaryCtxRelease_v2(self._dev)


@pytest.fixture(scope="module")
def mem() -> Iterator[DeviceMemory]:
    memory = DeviceMemory()
    yield memory
    memory.close()


DEV, STREAM = 0, 0  # device 0, its legacy default stream


@pytest.mark.parametrize(
    ("n", "offset"), [(0, 0), (1, 0), (5, 3), (1_000_003, 7), (4096, 2**34 + 1)]
)
def test_prg_kernel_equals_cpu(mem: DeviceMemory, n: int, offset: int) -> None:
    seed = bytes(range(16))
    out = mem.empty(4 * n)
    _core.cuda_prg(DEV, STREAM, out, n, seed, offset)
    np.testing.assert_array_equal(mem.get(out, np.uint32, n), core.prg(seed, n, offset))


def _mask_case() -> tuple[np.ndarray, list[bytes], list[int], np.ndarray]:
    """A vector, 70 seeds (more than one launch's worth of keys) with their signs, and
    the vector masked on the CPU at offset 5."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, 300_001, dtype=np.uint32)
    seeds = [rng.bytes(16) for _ in range(70)]
    signs = [1 if i % 3 else -1 for i in range(70)]
    cpu = base.copy()
    core.apply_masks(cpu, seeds, signs, offset_words=5)
    return base, seeds, signs, cpu


def test_mask_kernel_equals_cpu(mem: DeviceMemory) -> None:
    base, seeds, signs, cpu = _mask_case()
    dev = mem.put(base)
    _core.cuda_apply_masks(DEV, STREAM, dev, base.size, b"".join(seeds), signs, 5)
    np.testing.assert_array_equal(mem.get(dev, np.uint32, base.size), cpu)


def test_quantise_and_dequantise_kernels_equal_cpu(mem: DeviceMemory) -> None:
    x = (np.random.default_rng(1).standard_normal(100_003) * 2).astype(np.float32)
    seed = b"k" * 16
    q_cpu = core.quantise(x, clip=1.5, bits=24, seed=seed)
    q_dev = mem.empty(4 * x.size)
    assert _core.cuda_quantise(DEV, STREAM, mem.put(x), q_dev, x.size, 1.5, 24, seed) is True
    np.testing.assert_array_equal(mem.get(q_dev, np.uint32, x.size), q_cpu)
    back = mem.empty(8 * x.size)
    _core.cuda_dequantise(DEV, STREAM, q_dev, back, x.size, 1, 1.5, 24)
    np.testing.assert_array_equal(
        mem.get(back, np.float64, x.size), core.dequantise(q_cpu, n_summands=1, clip=1.5, bits=24)
    )


def test_quantise_kernel_reports_nan(mem: DeviceMemory) -> None:
    x = np.zeros(1000, np.float32)
    x[500] = np.nan
    out = mem.empty(4 * x.size)
    assert _core.cuda_quantise(DEV, STREAM, mem.put(x), out, x.size, 1.0, 8, bytes(16)) is False


def test_sgd_kernel_equals_cpu(mem: DeviceMemory) -> None:
    rng = np.random.default_rng(2)
    w, g, wg, c, ci = (rng.standard_normal(10_001).astype(np.float32) for _ in range(5))
    buf = np.zeros_like(w)
    lr, momentum, wd, mu = 0.1, 0.9, 1e-3, 0.01
    dw, dg, dbuf, dwg, dc, dci = (mem.put(a) for a in (w, g, buf, wg, c, ci))
    for first in (True, False):
        core.sgd_step(w, g, buf, lr=lr, momentum=momentum, weight_decay=wd, prox_mu=mu,
                      global_params=wg, scaffold_c=c, scaffold_ci=ci, first_step=first)
        _core.cuda_sgd_step(DEV, STREAM, dw, dg, dbuf, w.size, lr, momentum, wd, 0.0, False,
                            mu, dwg, dc, dci, first)
    np.testing.assert_array_equal(mem.get(dw, np.float32, w.size), w)
    np.testing.assert_array_equal(mem.get(dbuf, np.float32, w.size), buf)


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_kernel_equals_cpu(mem: DeviceMemory, decoupled: bool) -> None:
    rng = np.random.default_rng(3)
    w, g = (rng.standard_normal(10_001).astype(np.float32) for _ in range(2))
    m, v = np.zeros_like(w), np.zeros_like(w)
    dw, dg, dm, dv = (mem.put(a) for a in (w, g, m, v))
    for step in (1, 2, 3):
        core.adam_step(w, g, m, v, step=step, lr=1e-3, weight_decay=0.01, decoupled=decoupled)
        _core.cuda_adam_step(DEV, STREAM, dw, dg, dm, dv, w.size, step, 1e-3, 0.9, 0.999, 1e-8,
                             0.01, decoupled)
    # libm's and CUDA's sqrt are both correctly rounded; pow is computed on the host
    np.testing.assert_array_equal(mem.get(dw, np.float32, w.size), w)
    np.testing.assert_array_equal(mem.get(dv, np.float32, w.size), v)


def test_clip_l2_kernel_agrees_with_cpu(mem: DeviceMemory) -> None:
    v = np.random.default_rng(4).standard_normal(100_001).astype(np.float32)
    dev = mem.put(v)
    n_cpu = core.clip_l2(v, 10.0)
    n_dev = _core.cuda_clip_l2(DEV, STREAM, dev, v.size, 10.0)
    assert n_dev == pytest.approx(n_cpu, rel=1e-12)
    np.testing.assert_allclose(mem.get(dev, np.float32, v.size), v, rtol=1e-6)


def test_noise_kernel_has_the_cpu_values_to_a_few_ulps(mem: DeviceMemory) -> None:
    cpu = np.zeros(100_001, np.float32)
    dev = mem.put(cpu)
    core.add_gaussian_noise(cpu, std=1.0, seed=b"g" * 16)
    _core.cuda_add_gaussian_noise(DEV, STREAM, dev, cpu.size, 1.0, b"g" * 16)
    np.testing.assert_allclose(mem.get(dev, np.float32, cpu.size), cpu, rtol=1e-5, atol=1e-6)


# ------------------------------------- fedge.core's torch CUDA tensor interface
# The same kernels reached as fedge.core's callers reach them: CUDA tensors, their
# pointers, devices and streams handed on by fedge/core.py, and its checks of them.


def _host_u32(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int32).cpu().numpy().view(np.uint32)


@needs_torch_cuda
@pytest.mark.parametrize(
    ("n", "offset"), [(0, 0), (1, 0), (5, 3), (1_000_003, 7), (4096, 2**34 + 1)]
)
def test_prg_on_device_equals_cpu(n: int, offset: int) -> None:
    seed = bytes(range(16))
    got = core.prg(seed, n, offset, device="cuda")
    np.testing.assert_array_equal(_host_u32(got), core.prg(seed, n, offset))


@needs_torch_cuda
def test_masks_on_device_equal_cpu() -> None:
    base, seeds, signs, cpu = _mask_case()
    dev = torch.from_numpy(base.view(np.int32).copy()).cuda()
    core.apply_masks(dev, seeds, signs, offset_words=5)
    np.testing.assert_array_equal(_host_u32(dev), cpu)


@needs_torch_cuda
def test_quantise_and_dequantise_on_device_equal_cpu() -> None:
    x = (np.random.default_rng(1).standard_normal(100_003) * 2).astype(np.float32)
    seed = b"k" * 16
    q_cpu = core.quantise(x, clip=1.5, bits=24, seed=seed)
    q_dev = core.quantise(torch.from_numpy(x).cuda(), clip=1.5, bits=24, seed=seed)
    np.testing.assert_array_equal(_host_u32(q_dev), q_cpu)
    back = core.dequantise(q_dev, n_summands=1, clip=1.5, bits=24)
    np.testing.assert_array_equal(
        back.cpu().numpy(), core.dequantise(q_cpu, n_summands=1, clip=1.5, bits=24)
    )


@needs_torch_cuda
def test_quantise_on_device_into_out_equals_cpu_and_checks_out() -> None:
    x = (np.random.default_rng(3).standard_normal(50_001)).astype(np.float32)
    seed = b"o" * 16
    xd = torch.from_numpy(x).cuda()
    out = torch.zeros(x.size, dtype=torch.uint32, device="cuda")
    assert core.quantise(xd, clip=1.0, bits=20, seed=seed, out=out) is out
    np.testing.assert_array_equal(_host_u32(out), core.quantise(x, clip=1.0, bits=20, seed=seed))
    with pytest.raises(ValueError, match="out has 10 elements but x has 50001"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=out[:10])
    with pytest.raises(TypeError, match="out must be a CUDA tensor"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=np.zeros(x.size, np.uint32))
    with pytest.raises(ValueError, match="out overlaps x"):
        core.quantise(xd, clip=1.0, bits=20, seed=seed, out=xd.view(torch.uint32))


@needs_torch_cuda
def test_quantise_on_device_refuses_nan() -> None:
    x = torch.zeros(1000, device="cuda")
    x[500] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN"):
        core.quantise(x, clip=1.0, bits=8, seed=bytes(16))


@needs_torch_cuda
def test_sgd_on_device_equals_cpu() -> None:
    rng = np.random.default_rng(2)
    w, g, wg, c, ci = (rng.standard_normal(10_001).astype(np.float32) for _ in range(5))
    buf = np.zeros_like(w)
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "prox_mu": 0.01}
    dev = [torch.from_numpy(a.copy()).cuda() for a in (w, g, buf, wg, c, ci)]
    for first in (True, False):
        core.sgd_step(w, g, buf, global_params=wg, scaffold_c=c, scaffold_ci=ci,
                      first_step=first, **kw)  # fmt: skip
        core.sgd_step(dev[0], dev[1], dev[2], global_params=dev[3], scaffold_c=dev[4],
                      scaffold_ci=dev[5], first_step=first, **kw)  # fmt: skip
    np.testing.assert_array_equal(dev[0].cpu().numpy(), w)
    np.testing.assert_array_equal(dev[2].cpu().numpy(), buf)


@needs_torch_cuda
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_on_device_equals_cpu(decoupled: bool) -> None:
    rng = np.random.default_rng(3)
    w, g = (rng.standard_normal(10_001).astype(np.float32) for _ in range(2))
    m, v = np.zeros_like(w), np.zeros_like(w)
    dev = [torch.from_numpy(a.copy()).cuda() for a in (w, g, m, v)]
    kw = {"lr": 1e-3, "weight_decay": 0.01, "decoupled": decoupled}
    for step in (1, 2, 3):
        core.adam_step(w, g, m, v, step=step, **kw)
        core.adam_step(*dev, step=step, **kw)
    # libm's and CUDA's sqrt are both correctly rounded; pow is computed on the host
    np.testing.assert_array_equal(dev[0].cpu().numpy(), w)
    np.testing.assert_array_equal(dev[3].cpu().numpy(), v)


@needs_torch_cuda
def test_device_operands_must_share_a_length() -> None:
    p = torch.zeros(10, device="cuda")
    with pytest.raises(ValueError, match="grads has 9 elements but params has 10"):
        core.sgd_step(p, torch.zeros(9, device="cuda"), None, lr=0.1)
    with pytest.raises(TypeError, match="grads must be a CUDA tensor"):
        core.sgd_step(p, np.zeros(10, np.float32), None, lr=0.1)


@needs_torch_cuda
def test_clip_l2_on_device_agrees_with_cpu() -> None:
    v = np.random.default_rng(4).standard_normal(100_001).astype(np.float32)
    dev = torch.from_numpy(v.copy()).cuda()
    n_cpu = core.clip_l2(v, 10.0)
    n_dev = core.clip_l2(dev, 10.0)
    assert n_dev == pytest.approx(n_cpu, rel=1e-12)
    np.testing.assert_allclose(dev.cpu().numpy(), v, rtol=1e-6)


@needs_torch_cuda
def test_noise_on_device_has_the_cpu_values_to_a_few_ulps() -> None:
    cpu = np.zeros(100_001, np.float32)
    dev = torch.zeros(100_001, device="cuda")
    core.add_gaussian_noise(cpu, std=1.0, seed=b"g" * 16)
    core.add_gaussian_noise(dev, std=1.0, seed=b"g" * 16)
    np.testing.assert_allclose(dev.cpu().numpy(), cpu, rtol=1e-5, atol=1e-6)
