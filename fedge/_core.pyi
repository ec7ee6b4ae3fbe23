"""Type stub for the compiled core. Use fedge.core: it validates and documents."""

from typing import Any

import numpy as np
import numpy.typing as npt

def info() -> dict[str, Any]: ...
def prg(
    seed: bytes, n_words: int, offset_words: int = 0, *, path: str | None = None
) -> npt.NDArray[np.uint32]: ...
def ctr_blocks(key: bytes, counter: bytes, n_blocks: int, *, path: str | None = None) -> bytes: ...
def apply_masks(
    vec: npt.NDArray[np.uint32],
    seeds: bytes,
    signs: list[int],
    *,
    offset_words: int = 0,
    threads: int = 1,
    path: str | None = None,
) -> None: ...
def quant_bits(n_summands: int) -> int: ...
def quantise(
    x: npt.NDArray[np.float32],
    *,
    clip: float,
    bits: int,
    seed: bytes,
    threads: int = 1,
    path: str | None = None,
    out: npt.NDArray[np.uint32] | None = None,
) -> npt.NDArray[np.uint32]: ...
def pool_stats() -> dict[str, int]: ...
def release_pool() -> None: ...
def dequantise(
    total: npt.NDArray[np.uint32], *, n_summands: int, clip: float, bits: int
) -> npt.NDArray[np.float64]: ...
def sgd_step(
    params: npt.NDArray[np.float32],
    grads: npt.NDArray[np.float32],
    momentum_buf: npt.NDArray[np.float32] | None,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    prox_mu: float = 0.0,
    global_params: npt.NDArray[np.float32] | None = None,
    scaffold_c: npt.NDArray[np.float32] | None = None,
    scaffold_ci: npt.NDArray[np.float32] | None = None,
    first_step: bool = False,
) -> None: ...
def adam_step(
    params: npt.NDArray[np.float32],
    grads: npt.NDArray[np.float32],
    exp_avg: npt.NDArray[np.float32],
    exp_avg_sq: npt.NDArray[np.float32],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> None: ...
def clip_l2(vec: npt.NDArray[np.float32], max_norm: float) -> float: ...
def add_gaussian_noise(
    vec: npt.NDArray[np.float32], *, std: float, seed: bytes, path: str | None = None
) -> None: ...

# Present only when built with CUDA (info()["cuda_compiled"]); pointers are
# device addresses (torch.Tensor.data_ptr()), stream a cudaStream_t as int.
def cuda_device_count() -> int: ...
def cuda_prg(
    device: int, stream: int, out_ptr: int, n_words: int, seed: bytes, offset_words: int
) -> None: ...
def cuda_apply_masks(
    device: int,
    stream: int,
    vec_ptr: int,
    n: int,
    seeds: bytes,
    signs: list[int],
    offset_words: int,
) -> None: ...
def cuda_quantise(
    device: int, stream: int, x_ptr: int, out_ptr: int, n: int, clip: float, bits: int, seed: bytes
) -> bool: ...
def cuda_dequantise(
    device: int,
    stream: int,
    total_ptr: int,
    out_ptr: int,
    n: int,
    n_summands: int,
    clip: float,
    bits: int,
) -> None: ...
def cuda_sgd_step(
    device: int,
    stream: int,
    params: int,
    grads: int,
    momentum_buf: int,
    n: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    prox_mu: float,
    global_params: int,
    scaffold_c: int,
    scaffold_ci: int,
    first_step: bool,
) -> None: ...
def cuda_adam_step(
    device: int,
    stream: int,
    params: int,
    grads: int,
    exp_avg: int,
    exp_avg_sq: int,
    n: int,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> None: ...
def cuda_emulate_prg(seed: bytes, n_words: int, offset_words: int) -> npt.NDArray[np.uint32]: ...
def cuda_emulate_apply_masks(
    vec: npt.NDArray[np.uint32], seeds: bytes, signs: list[int], offset_words: int
) -> None: ...
def cuda_emulate_quantise(
    x: npt.NDArray[np.float32], clip: float, bits: int, seed: bytes
) -> npt.NDArray[np.uint32]: ...
def cuda_clip_l2(device: int, stream: int, vec_ptr: int, n: int, max_norm: float) -> float: ...
def cuda_add_gaussian_noise(
    device: int, stream: int, vec_ptr: int, n: int, std: float, seed: bytes
) -> None: ...
def cuda_emulate_gaussian_noise(vec: npt.NDArray[np.float32], std: float, seed: bytes) -> None: ...
