"""Oracles for the compiled-core tests: OpenSSL's keystream and the CPU paths.

(A uniquely named module, not conftest.py: several test directories have a
conftest, and `from conftest import` would find whichever was loaded last.)
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedge import core

PATHS: list[str] = core.info()["paths"]


def openssl_words(seed: bytes, n_words: int, offset_words: int = 0) -> np.ndarray:
    """OpenSSL's AES-128-CTR (zero IV) encrypting zeros, as little-endian uint32."""
    first_block, skip = divmod(offset_words, 4)
    n_blocks = (skip + n_words + 3) // 4
    counter = first_block.to_bytes(16, "big")
    enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    ks = np.frombuffer(enc.update(bytes(16 * n_blocks)), dtype="<u4")
    return ks[skip : skip + n_words].astype(np.uint32)
