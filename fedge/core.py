"""The typed Python face of the compiled core `fedge._core`.

Every function checks its inputs here, naming the argument, the value and the
rule it broke, and then calls one C++ function that releases the GIL. Arrays
are 1-D, C-contiguous and aligned, with an exact dtype: a wrong one raises instead of
being converted, so an array written in place is never silently copied.

CPU torch tensors are accepted where an array is (as their `.numpy()` view).
A tensor written in place must not require grad while grad mode is on (as
with torch's own in-place ops; an optimiser step runs under torch.no_grad()),
and its autograd version is bumped after the write.
CUDA torch tensors are accepted by every function taking arrays when the core
was built with CUDA; `prg(..., device="cuda")`
returns a CUDA tensor. The device path gives the same bits as the CPU path.

PRG: AES-128-CTR exactly as OpenSSL's EVP_aes_128_ctr keyed by the 16-byte
seed with a zero IV, read as little-endian uint32 words; word i of the stream
is the word at index i - offset_words of the result.

Quantisation: s = (2^b - 1)/(2c); q = min(floor((clip(x) + c)·s + u), 2^b − 1)
with u = w·2^-32, w the PRG word (keyed by `seed`) at the element's index; all
in IEEE double without fused multiply-add. The sum S of n quantised vectors
dequantises to S/s − n·c; for one vector |dequantise(q) − clip(x)| < 1/s, and
E[dequantise(q)] = clip(x) (up to the 2^-32 resolution of u).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedge import _core

__all__ = [
    "adam_step",
    "add_gaussian_noise",
    "apply_masks",
    "buffer_pool",
    "check_simd",
    "clip_l2",
    "dequantise",
    "info",
    "prg",
    "quant_bits",
    "quantise",
    "release_buffers",
    "sgd_step",
]

SEED_BYTES = 16
_MAX_WORDS = 1 << 62
PATHS = ("vaes", "vaes256", "aesni", "portable")


def info() -> dict[str, Any]:
    """What this build can do.

    Returns a dict with ``version``, ``simd`` (the PRG path in effect:
    $FEDGE_SIMD if set and usable, else the fastest this CPU supports: "vaes",
    "vaes256", "aesni" or "portable"), ``paths`` (all usable paths, fastest first),
    ``simd_forced`` ($FEDGE_SIMD or None), ``cuda_compiled`` and ``gpus``
    (CUDA devices visible; 0 without a driver or GPU), and ``simd_error``: None,
    or why a $FEDGE_SIMD that names no usable path makes every masking and
    quantising call that names no path raise (``simd`` is then the path a call
    naming none would have had without it, which no such call gets).
    """
    d = dict(_core.info())
    forced = d.get("simd_forced")
    d["simd_error"] = None
    if forced and forced not in d.get("paths", ()):
        d["simd_error"] = (f"FEDGE_SIMD={forced!r} names no usable path (this CPU has: "
                           f"{', '.join(d.get('paths', ()))}): masking and quantising "
                           "refuse to run; unset it or name one of those")
    return d


def check_simd() -> None:
    """Raise ValueError (`info`'s ``simd_error``) when $FEDGE_SIMD names no usable
    path: a process that would mask or quantise checks this when it starts."""
    error = info()["simd_error"]
    if error:
        raise ValueError(error)


# ---------------------------------------------------------------- validation


def _is_torch_tensor(obj: object) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "is_cuda")


def _is_cuda_tensor(obj: object) -> bool:
    return _is_torch_tensor(obj) and bool(obj.is_cuda)  # type: ignore[attr-defined]


def _check_writable_tensor(obj: object, name: str) -> None:
    """Refuses to write a torch tensor in place where autograd would need to record it.

    The kernels write through the tensor's memory, which autograd cannot see:
    like torch's own in-place ops on a tensor that requires grad, that is
    allowed only under torch.no_grad() (as in an optimiser step), and then
    `_tensors_written` bumps the tensor's version afterwards.

    Raises:
        TypeError: a tensor that requires grad while grad mode is on.
    """
    if _is_torch_tensor(obj) and obj.requires_grad:  # type: ignore[attr-defined]
        import torch

        if torch.is_grad_enabled():
            raise TypeError(
                f"{name} requires grad and is written in place, which autograd cannot record; "
                "write it under torch.no_grad() (as an optimiser step does) or pass "
                f"{name}.detach()"
            )


def _tensors_written(*objs: object) -> None:
    """Bumps the autograd version of each torch tensor a kernel wrote in place.

    The kernels write through numpy views or data pointers, which torch does
    not see. Bumped, a graph that saved one of these tensors refuses to run
    backward ("modified by an inplace operation") instead of silently using
    the new values, exactly as after a torch in-place op.
    """
    tensors = [t for t in objs if _is_torch_tensor(t)]
    if tensors:
        import torch

        torch.autograd.graph.increment_version(tensors)


def _array(obj: object, name: str, dtype: type, *, writable: bool = False) -> np.ndarray:
    """Checks a 1-D C-contiguous array of exactly `dtype`; never copies.

    A written torch tensor must also pass `_check_writable_tensor`; the caller
    then calls `_tensors_written` on it after the kernel.

    Raises:
        TypeError: not an array (or dense CPU tensor numpy can view), the
            wrong dtype (or byte order), or a written tensor that requires
            grad under grad mode.
        ValueError: not 1-D, not C-contiguous, misaligned, or read-only when
            written.
    """
    if _is_torch_tensor(obj):
        import torch

        t: Any = obj
        if t.is_cuda:
            raise TypeError(f"{name} is a CUDA tensor but this operation runs on the CPU")
        if t.device.type != "cpu" or t.layout != torch.strided:  # meta, sparse, ...
            raise TypeError(
                f"{name} must be a dense CPU tensor, got a {t.layout} tensor on {t.device}"
            )
        if writable:
            _check_writable_tensor(obj, name)
        try:
            obj = obj.detach().numpy()  # type: ignore[attr-defined]
        except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
            raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}: {exc}") from exc
        except RuntimeError as exc:  # a lazily negated or conjugated view
            raise TypeError(
                f"{name} is a tensor numpy cannot view without a copy (resolve_neg()/"
                f"resolve_conj() it first): {exc}"
            ) from exc
    if not isinstance(obj, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(obj).__name__}")
    want = np.dtype(dtype)
    if obj.dtype != want:
        if obj.dtype.name == want.name:  # the same type in the other byte order
            raise TypeError(
                f"{name} must have dtype {want.name} in native byte order ({want.str}), "
                f"got {obj.dtype.str}"
            )
        raise TypeError(f"{name} must have dtype {want.name}, got {obj.dtype.name}")
    if obj.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {obj.shape}")
    if not obj.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {obj.strides})")
    if not obj.flags.aligned:
        # The kernels load and store whole elements: a misaligned address
        # (np.frombuffer(..., offset=1) makes one) is undefined behaviour in C++.
        raise ValueError(
            f"{name} is not aligned: its address is not a multiple of {obj.itemsize} bytes, "
            f"as a {want.name} array's must be; pass an aligned copy (numpy.array({name}))"
        )
    if writable and not obj.flags.writeable:
        raise ValueError(f"{name} is read-only but is written in place")
    return obj


def _int(value: object, name: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
    return v


def _float(value: object, name: str, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _check_clip(clip: float, bits: int, n_summands: int = 1) -> None:
    """Refuses a clip at which the quantisation arithmetic breaks down in double.

    The scale s = (2^bits - 1)/(2·clip) must be a finite number > 0: a clip so
    large that 2·clip overflows gives s = 0 (every q is 0, dequantise returns
    NaN), a subnormal one s = inf (every q is 2^bits - 1). A sum of n_summands
    vectors spans 2·n_summands·clip, which must be finite too. The compiled
    core applies the same rule.

    Raises:
        ValueError: clip outside that range, with the range for these bits and
            n_summands.
    """
    qmax = float((1 << bits) - 1)
    scale = qmax / (2.0 * clip)
    if not (0.0 < scale < math.inf) or not math.isfinite(2.0 * n_summands * clip):
        big = sys.float_info.max
        raise ValueError(
            f"clip={clip:g} is out of range for bits={bits} and n_summands={n_summands}: the "
            "scale (2^bits - 1)/(2*clip) must be a finite number > 0 and the sum's range "
            f"2*n_summands*clip finite, so clip must be within about "
            f"[{qmax / big / 2.0:g}, {big / 2.0 / n_summands:g}]"
        )


def _seed(seed: object, name: str = "seed") -> bytes:
    if not isinstance(seed, bytes | bytearray | memoryview):
        raise TypeError(f"{name} must be {SEED_BYTES} bytes, got {type(seed).__name__}")
    b = bytes(seed)
    if len(b) != SEED_BYTES:
        raise ValueError(f"{name} must be {SEED_BYTES} bytes, got {len(b)}")
    return b


def _path(path: str | None) -> str | None:
    if path is None:
        return None
    if path not in PATHS:
        raise ValueError(f"path={path!r} is not a PRG path; expected one of {PATHS}")
    usable = _core.info()["paths"]
    if path not in usable:
        raise ValueError(f"path={path!r} is not supported by this CPU (available: {usable})")
    return path


def _threads(threads: object) -> int:
    return _int(threads, "threads", minimum=1, maximum=1024)


def _seeds(seeds: object) -> bytes:
    if isinstance(seeds, np.ndarray):
        if seeds.dtype != np.uint8 or seeds.ndim != 2 or seeds.shape[1] != SEED_BYTES:
            raise ValueError(
                f"seeds as an array must be uint8 of shape (k, {SEED_BYTES}), "
                f"got {seeds.dtype.name} {seeds.shape}"
            )
        return np.ascontiguousarray(seeds).tobytes()
    if isinstance(seeds, bytes | bytearray | str) or not isinstance(seeds, Sequence):
        raise TypeError(
            f"seeds must be a sequence of {SEED_BYTES}-byte seeds or a (k, {SEED_BYTES}) "
            f"uint8 array, got {type(seeds).__name__}"
        )
    return b"".join(_seed(s, f"seeds[{i}]") for i, s in enumerate(seeds))


def _signs(signs: object, k: int) -> list[int]:
    if isinstance(signs, np.ndarray):
        if signs.ndim != 1 or not np.issubdtype(signs.dtype, np.integer):
            raise ValueError(
                f"signs must be a 1-D integer array, got {signs.dtype.name} {signs.shape}"
            )
        values = [int(s) for s in signs]
    elif isinstance(signs, Sequence) and not isinstance(signs, str | bytes):
        values = []
        for i, s in enumerate(signs):
            if isinstance(s, bool) or not isinstance(s, int | np.integer):
                raise TypeError(f"signs[{i}] must be +1 or -1, got {s!r}")
            values.append(int(s))
    else:
        raise TypeError(f"signs must be a sequence of +1/-1, got {type(signs).__name__}")
    if len(values) != k:
        raise ValueError(f"signs has {len(values)} entries but there are {k} seeds")
    for i, s in enumerate(values):
        if s not in (1, -1):
            raise ValueError(f"signs[{i}] must be +1 or -1, got {s}")
    return values


def _cuda() -> Any:
    if not hasattr(_core, "cuda_apply_masks"):
        raise RuntimeError("fedge._core was built without CUDA (info()['cuda_compiled'] is False)")
    return _core


def _cuda_tensor(t: Any, name: str, dtypes: tuple[str, ...], device: Any = None) -> Any:
    """Checks a contiguous 1-D CUDA tensor; returns it.

    Raises:
        TypeError: not a CUDA tensor, or the wrong dtype.
        ValueError: not 1-D, not contiguous, or on another device than `device`.
    """
    if not _is_cuda_tensor(t):
        raise TypeError(f"{name} must be a CUDA tensor, got {type(t).__name__}")
    dt = str(t.dtype).removeprefix("torch.")
    if dt not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(dtypes)}, got {dt}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")
    return t


def _cuda_group(**tensors: Any) -> tuple[Any, int, dict[str, int]]:
    """Checks float32 CUDA tensors of one length on one device (None = absent).

    The first tensor sets the device and length. Returns (device, length,
    {name: data_ptr or 0}).

    Raises:
        TypeError: a tensor that is not a float32 CUDA tensor.
        ValueError: not 1-D/contiguous, another device, or another length.
    """
    names = list(tensors)
    first = _cuda_tensor(tensors[names[0]], names[0], ("float32",))
    ptrs: dict[str, int] = {}
    for name in names:
        t = tensors[name]
        if t is None:
            ptrs[name] = 0
            continue
        ct = _cuda_tensor(t, name, ("float32",), first.device)
        if ct.numel() != first.numel():
            raise ValueError(f"{name} has {ct.numel()} elements but {names[0]} has {first.numel()}")
        ptrs[name] = ct.data_ptr()
    return first.device, int(first.numel()), ptrs


def _cuda_disjoint(function: str, n: int, ptrs: dict[str, int], written: tuple[str, ...]) -> None:
    """Refuses a written CUDA buffer that shares memory with another operand.

    `ptrs` as from `_cuda_group` (float32, n elements each, 0 = absent); the
    same rule as the CPU binding's check.

    Raises:
        ValueError: a buffer in `written` overlaps another operand.
    """
    size = 4 * n
    names = [k for k, p in ptrs.items() if p]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a not in written and b not in written:
                continue
            if size and ptrs[a] < ptrs[b] + size and ptrs[b] < ptrs[a] + size:
                w, o = (b, a) if b in written else (a, b)
                raise ValueError(
                    f"{w} overlaps {o} in memory; {function} writes {w} in place, "
                    "so it needs a buffer of its own"
                )


def _where(device: Any) -> tuple[int, int]:
    """(device index, current torch stream handle) for a CUDA device."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(index), int(torch.cuda.current_stream(index).cuda_stream)


# ---------------------------------------------------------------------- PRG


def prg(
    seed: bytes,
    n_words: int,
    offset_words: int = 0,
    *,
    path: str | None = None,
    device: str | None = None,
) -> Any:
    """Words [offset_words, offset_words + n_words) of the AES-128-CTR stream.

    `path` forces the CPU implementation ("vaes", "vaes256", "aesni",
    "portable");
    default: $FEDGE_SIMD, else the fastest. `device="cuda"` (or "cuda:N")
    computes it on the GPU and returns a torch uint32 CUDA tensor.

    Raises:
        TypeError: seed not bytes, counts not ints.
        ValueError: seed not 16 bytes, negative counts, offset_words + n_words
            beyond 2^62, or an unknown/unsupported path.
        RuntimeError: device given but the core has no CUDA.
    """
    key = _seed(seed)
    n = _int(n_words, "n_words", maximum=_MAX_WORDS)
    off = _int(offset_words, "offset_words", maximum=_MAX_WORDS)
    if off + n > _MAX_WORDS:
        raise ValueError(
            f"offset_words + n_words must be at most 2^62, got {off} + {n} = {off + n}"
        )
    if device is not None:
        import torch

        core = _cuda()
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device!r}")
        out = torch.empty(n, dtype=torch.uint32, device=dev)
        core.cuda_prg(*_where(out.device), out.data_ptr(), n, key, off)
        return out
    return _core.prg(key, n, off, path=_path(path))


def apply_masks(
    vec: Any,
    seeds: Sequence[bytes] | np.ndarray,
    signs: Sequence[int] | np.ndarray,
    *,
    offset_words: int = 0,
    threads: int = 1,
    path: str | None = None,
) -> None:
    """vec[i] += signs[j] · PRG(seeds[j])[offset_words + i] (mod 2^32), in place.

    One cache-blocked pass over `vec` for all seeds, split over `threads`
    contiguous ranges. `vec` may be a uint32 (or int32) CUDA tensor.

    Raises:
        TypeError: vec not a uint32 array, seeds/signs of the wrong type, vec a
            tensor that requires grad under grad mode.
        ValueError: vec not 1-D/contiguous/writable, a seed not 16 bytes, a
            sign not ±1, len(signs) != len(seeds), offset_words + len(vec)
            beyond 2^62, threads < 1, bad path.
    """
    key_bytes = _seeds(seeds)
    sign_list = _signs(signs, len(key_bytes) // SEED_BYTES)
    off = _int(offset_words, "offset_words", maximum=_MAX_WORDS)
    nthreads = _threads(threads)
    if _is_cuda_tensor(vec):
        core = _cuda()
        t = _cuda_tensor(vec, "vec", ("uint32", "int32"))
        _check_writable_tensor(t, "vec")
        core.cuda_apply_masks(*_where(t.device), t.data_ptr(), t.numel(), key_bytes, sign_list, off)
        _tensors_written(t)
        return
    arr = _array(vec, "vec", np.uint32, writable=True)
    _core.apply_masks(
        arr, key_bytes, sign_list, offset_words=off, threads=nthreads, path=_path(path)
    )
    _tensors_written(vec)


# ------------------------------------------------------------- quantisation


def quant_bits(n_summands: int) -> int:
    """Largest b <= 31 with n_summands · (2^b − 1) <= 2^32 − 1.

    Raises:
        TypeError: not an int.
        ValueError: n_summands < 1, or so large that even 1 bit could wrap.
    """
    n = _int(n_summands, "n_summands", minimum=1)
    b = _core.quant_bits(n) if n <= 0xFFFFFFFF else 0
    if b == 0:
        raise ValueError(
            f"n_summands={n} is too many: even 1-bit values could wrap a uint32 sum "
            f"(at most {0xFFFFFFFF})"
        )
    return int(b)


def quantise(
    x: Any,
    *,
    clip: float,
    bits: int,
    seed: bytes,
    threads: int = 1,
    path: str | None = None,
    out: Any = None,
) -> Any:
    """Clips x to [−clip, clip] and rounds it stochastically to `bits`-bit ints.

    Returns a new uint32 array (a uint32 CUDA tensor when x is one), or `out`
    filled in place when given. A new array of 1 MiB or more comes from a small
    pool of recycled buffers (see `buffer_pool`): once the previous round's
    result is gone, the next one of the same length reuses its pages and skips
    the kernel's zeroing of fresh ones (about 0.5 ns a word, as much as the
    quantise itself at 1e7 words on this machine). `out` does the same for a
    caller that keeps its own buffer.

    Raises:
        TypeError: x not float32, out not uint32 (or not on x's device, or a
            tensor that requires grad under grad mode), seed not bytes.
        ValueError: x not 1-D/contiguous or holding NaN/Inf; out of another
            length, not contiguous, misaligned, read-only or overlapping x;
            clip not a finite number > 0, or so large or small that the scale
            (2^bits - 1)/(2·clip) is 0 or infinite; bits outside [1, 31];
            seed not 16 bytes.
    """
    c = _float(clip, "clip", positive=True)
    b = _int(bits, "bits", minimum=1, maximum=31)
    _check_clip(c, b)
    key = _seed(seed)
    nthreads = _threads(threads)
    if _is_cuda_tensor(x):
        import torch

        core = _cuda()
        t = _cuda_tensor(x, "x", ("float32",))
        if out is None:
            dst = torch.empty(t.numel(), dtype=torch.uint32, device=t.device)
        else:
            dst = _cuda_tensor(out, "out", ("uint32",), t.device)
            _check_writable_tensor(dst, "out")
            if dst.numel() != t.numel():
                raise ValueError(f"out has {dst.numel()} elements but x has {t.numel()}")
            n4 = 4 * t.numel()
            if n4 and dst.data_ptr() < t.data_ptr() + n4 and t.data_ptr() < dst.data_ptr() + n4:
                raise ValueError(
                    "out overlaps x in memory; quantise needs a separate output buffer"
                )
        ok = core.cuda_quantise(
            *_where(t.device), t.data_ptr(), dst.data_ptr(), t.numel(), c, b, key
        )
        _tensors_written(out)
        if not ok:
            raise ValueError("x contains NaN or infinity")
        return dst
    arr = _array(x, "x", np.float32)
    buf = None if out is None else _array(out, "out", np.uint32, writable=True)
    try:
        q = _core.quantise(
            arr, clip=c, bits=b, seed=key, threads=nthreads, path=_path(path), out=buf
        )
    finally:
        _tensors_written(out)  # also on an error: NaN/Inf is found after writing
    return q if out is None else out


def buffer_pool() -> dict[str, int]:
    """What the pool of recycled result buffers holds now.

    Keys: ``buffers`` and ``bytes`` kept, ``reused`` (results served from the
    pool since import), and its bounds ``max_buffers``, ``max_bytes`` and
    ``min_bytes`` (smaller results come from numpy's allocator). A buffer is
    kept only once no array views it; the oldest is freed first when the pool
    is full.
    """
    return {str(k): int(v) for k, v in _core.pool_stats().items()}


def release_buffers() -> None:
    """Frees every buffer the pool keeps (arrays still alive are not touched)."""
    _core.release_pool()


def dequantise(total: Any, *, n_summands: int, clip: float, bits: int) -> Any:
    """Maps a uint32 sum of `n_summands` quantised vectors back to float64.

    Raises:
        TypeError: total not uint32.
        ValueError: total not 1-D/contiguous/aligned; n_summands < 1 or too
            large for `bits` (the sum could have wrapped); bits out of range;
            clip not a finite number > 0, or so large or small that the scale
            (2^bits - 1)/(2·clip) or the sum's range 2·n_summands·clip is 0 or
            infinite.
    """
    n = _int(n_summands, "n_summands", minimum=1)
    c = _float(clip, "clip", positive=True)
    b = _int(bits, "bits", minimum=1, maximum=31)
    if n * ((1 << b) - 1) > 0xFFFFFFFF:
        raise ValueError(
            f"bits={b} with n_summands={n} can wrap the uint32 sum; use quant_bits({n})"
            f" = {quant_bits(n) if n <= 0xFFFFFFFF else 'none'}"
        )
    _check_clip(c, b, n)
    if _is_cuda_tensor(total):
        import torch

        core = _cuda()
        t = _cuda_tensor(total, "total", ("uint32",))
        out = torch.empty(t.numel(), dtype=torch.float64, device=t.device)
        core.cuda_dequantise(*_where(t.device), t.data_ptr(), out.data_ptr(), t.numel(), n, c, b)
        return out
    arr = _array(total, "total", np.uint32)
    return _core.dequantise(arr, n_summands=n, clip=c, bits=b)


# --------------------------------------------------------- training kernels


def sgd_step(
    params: Any,
    grads: Any,
    momentum_buf: Any,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    global_params: Any = None,
    scaffold_c: Any = None,
    scaffold_ci: Any = None,
    first_step: bool = False,
) -> None:
    """One fused SGD step over flat float32 buffers, in place.

    The same update as torch.optim.SGD, applied to the corrected gradient
    g' = g + prox_mu·(params − global_params) + (scaffold_c − scaffold_ci)
    (FedProx and SCAFFOLD; each term only when its arrays are given),
    computed in double and rounded once to float32 (torch rounds each float32
    operation, so the two agree to ~1e-6 relative, not bit for bit).
    torch starts the momentum buffer as the first gradient: pass
    `first_step=True` on the first step (with a zero buffer and dampening 0
    both conventions agree). `momentum_buf` may be None when momentum is 0.
    All arrays may instead be CUDA tensors on one device.

    Raises:
        TypeError: an array of the wrong dtype or type; params or momentum_buf
            a tensor that requires grad under grad mode.
        ValueError: arrays of different lengths, not 1-D/contiguous/writable;
            params or momentum_buf sharing memory with another array;
            a non-finite or negative hyper-parameter; nesterov without
            momentum; prox_mu > 0 without global_params; one SCAFFOLD control
            variate without the other; momentum > 0 without momentum_buf.
    """
    lr_ = _float(lr, "lr", nonneg=True)
    mom = _float(momentum, "momentum", nonneg=True)
    wd = _float(weight_decay, "weight_decay", nonneg=True)
    damp = _float(dampening, "dampening", nonneg=True)
    mu = _float(prox_mu, "prox_mu", nonneg=True)
    if nesterov and (mom <= 0 or damp != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening 0")
    if mu > 0 and global_params is None:
        raise ValueError(f"prox_mu={mu} needs global_params")
    if (scaffold_c is None) != (scaffold_ci is None):
        raise ValueError("scaffold_c and scaffold_ci must be given together")
    if mom > 0 and momentum_buf is None:
        raise ValueError(f"momentum={mom} needs momentum_buf")
    gp = global_params if mu > 0 else None
    if _is_cuda_tensor(params):
        core = _cuda()
        _check_writable_tensor(params, "params")
        _check_writable_tensor(momentum_buf, "momentum_buf")
        dev, n, ptr = _cuda_group(
            params=params, grads=grads, momentum_buf=momentum_buf, global_params=gp,
            scaffold_c=scaffold_c, scaffold_ci=scaffold_ci,
        )  # fmt: skip
        _cuda_disjoint("sgd_step", n, ptr, ("params", "momentum_buf"))
        core.cuda_sgd_step(
            *_where(dev), ptr["params"], ptr["grads"], ptr["momentum_buf"], n, lr_, mom, wd,
            damp, bool(nesterov), mu, ptr["global_params"], ptr["scaffold_c"],
            ptr["scaffold_ci"], bool(first_step),
        )  # fmt: skip
        _tensors_written(params, momentum_buf)
        return
    _core.sgd_step(
        _array(params, "params", np.float32, writable=True),
        _array(grads, "grads", np.float32),
        None
        if momentum_buf is None
        else _array(momentum_buf, "momentum_buf", np.float32, writable=True),
        lr=lr_,
        momentum=mom,
        weight_decay=wd,
        dampening=damp,
        nesterov=bool(nesterov),
        prox_mu=mu,
        global_params=None if gp is None else _array(gp, "global_params", np.float32),
        scaffold_c=None if scaffold_c is None else _array(scaffold_c, "scaffold_c", np.float32),
        scaffold_ci=None if scaffold_ci is None else _array(scaffold_ci, "scaffold_ci", np.float32),
        first_step=bool(first_step),
    )
    _tensors_written(params, momentum_buf)


def adam_step(
    params: Any,
    grads: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None:
    """One Adam step (AdamW when `decoupled`), in place; `step` counts from 1.

    The same update as torch.optim.Adam / torch.optim.AdamW (amsgrad off,
    maximize off), computed in double and rounded once to float32 (torch
    rounds each float32 operation, so the two agree to ~1e-6 relative, not
    bit for bit).
    All arrays may instead be CUDA tensors on one device.

    Raises:
        TypeError: an array of the wrong dtype or type; params, exp_avg or
            exp_avg_sq a tensor that requires grad under grad mode.
        ValueError: arrays of different lengths or not 1-D/contiguous/writable;
            params, exp_avg or exp_avg_sq sharing memory with another array;
            step < 1; betas outside [0, 1); eps <= 0; lr or weight_decay < 0.
    """
    s = _int(step, "step", minimum=1)
    lr_ = _float(lr, "lr", nonneg=True)
    b1 = _float(beta1, "beta1", nonneg=True)
    b2 = _float(beta2, "beta2", nonneg=True)
    if b1 >= 1:
        raise ValueError(f"beta1 must be in [0, 1), got {b1}")
    if b2 >= 1:
        raise ValueError(f"beta2 must be in [0, 1), got {b2}")
    e = _float(eps, "eps", positive=True)
    wd = _float(weight_decay, "weight_decay", nonneg=True)
    if _is_cuda_tensor(params):
        core = _cuda()
        for name, t in (("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            _check_writable_tensor(t, name)
        dev, n, ptr = _cuda_group(
            params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq
        )
        _cuda_disjoint("adam_step", n, ptr, ("params", "exp_avg", "exp_avg_sq"))
        core.cuda_adam_step(
            *_where(dev), ptr["params"], ptr["grads"], ptr["exp_avg"], ptr["exp_avg_sq"], n, s,
            lr_, b1, b2, e, wd, bool(decoupled),
        )  # fmt: skip
        _tensors_written(params, exp_avg, exp_avg_sq)
        return
    _core.adam_step(
        _array(params, "params", np.float32, writable=True),
        _array(grads, "grads", np.float32),
        _array(exp_avg, "exp_avg", np.float32, writable=True),
        _array(exp_avg_sq, "exp_avg_sq", np.float32, writable=True),
        step=s,
        lr=lr_,
        beta1=b1,
        beta2=b2,
        eps=e,
        weight_decay=wd,
        decoupled=bool(decoupled),
    )
    _tensors_written(params, exp_avg, exp_avg_sq)


def clip_l2(vec: Any, max_norm: float) -> float:
    """Scales float32 `vec` in place so its L2 norm is at most `max_norm`.

    Returns the norm before clipping (computed in float64). `vec` may be a
    CUDA tensor (its norm then agrees with the CPU's to rounding: the
    summation order differs).

    Raises:
        TypeError: vec not float32, or a tensor that requires grad under grad
            mode.
        ValueError: vec not 1-D/contiguous/writable or holding NaN/Inf (vec is
            then left unchanged); max_norm not a finite number > 0.
    """
    m = _float(max_norm, "max_norm", positive=True)
    if _is_cuda_tensor(vec):
        _check_writable_tensor(vec, "vec")
        dev, n, ptr = _cuda_group(vec=vec)
        norm = float(_cuda().cuda_clip_l2(*_where(dev), ptr["vec"], n, m))
    else:
        norm = float(_core.clip_l2(_array(vec, "vec", np.float32, writable=True), m))
    if norm > m:
        _tensors_written(vec)
    return norm


def add_gaussian_noise(vec: Any, *, std: float, seed: bytes, path: str | None = None) -> None:
    """vec += std · N(0, 1) noise, in place, deterministic in `seed`.

    Normals come from Box–Muller on 53-bit uniforms built from the AES-CTR
    stream keyed by `seed` (four words per pair of normals). `vec` may be a
    CUDA tensor: same uniforms, CUDA's log/sin/cos (same distribution, bits
    may differ from the CPU's in the last place).

    Raises:
        TypeError: vec not float32 (or a tensor that requires grad under grad
            mode), seed not bytes.
        ValueError: vec not 1-D/contiguous/writable; std negative or not
            finite; seed not 16 bytes.
    """
    sd = _float(std, "std", nonneg=True)
    key = _seed(seed)
    if _is_cuda_tensor(vec):
        _check_writable_tensor(vec, "vec")
        dev, n, ptr = _cuda_group(vec=vec)
        _cuda().cuda_add_gaussian_noise(*_where(dev), ptr["vec"], n, sd, key)
    else:
        _core.add_gaussian_noise(
            _array(vec, "vec", np.float32, writable=True), std=sd, seed=key, path=_path(path)
        )
    _tensors_written(vec)


def fresh_seed() -> bytes:
    """A new random 16-byte seed from the OS (for quantisation and noise)."""
    return os.urandom(SEED_BYTES)
