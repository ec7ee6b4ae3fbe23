"""The only place secagg touches vectors: quantise, mask and unmask with the compiled core.

All mask bits come from ``fedge.core`` (AES-128-CTR PRG), so a CPU client, a
GPU client and the coordinator produce and cancel the same streams.  Pairwise
masks use the sign convention: client i adds +PRG(s_ij) when i < j (by id)
and -PRG(s_ij) otherwise, so each pair cancels in the sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` sorts before ``peer``: the sign with which ``me`` adds their shared mask."""
    return 1 if me < peer else -1


def quantise_and_mask(
    x: np.ndarray,
    *,
    clip: float,
    bits: int,
    quantise_seed: bytes,
    self_seed: bytes,
    pair_seeds: Sequence[bytes],
    pair_signs: Sequence[int],
    threads: int = 1,
) -> np.ndarray:
    """Quantise ``x`` and add its self mask and pairwise masks in place, mod 2^32."""
    from fedge import core

    masked = core.quantise(x, clip=clip, bits=bits, seed=quantise_seed, threads=threads)
    core.apply_masks(
        masked, [self_seed, *pair_seeds], [1, *pair_signs], threads=threads
    )
    return masked


def remove_masks(
    total: np.ndarray, seeds: Sequence[bytes], signs: Sequence[int], *, threads: int = 1
) -> None:
    """Add ``signs[i] * PRG(seeds[i])`` to ``total`` in place, for all i at once."""
    from fedge import core

    if seeds:
        core.apply_masks(total, list(seeds), list(signs), threads=threads)


def dequantise(total: np.ndarray, *, n_summands: int, clip: float, bits: int) -> np.ndarray:
    from fedge import core

    return core.dequantise(total, n_summands=n_summands, clip=clip, bits=bits)


def quant_bits(n: int) -> int:
    from fedge import core

    return core.quant_bits(n)
