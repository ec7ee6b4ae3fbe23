"""Shared helpers for the compiled-core tests: the oracle and the paths."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedge import core

PATHS = core.info()["paths"]


def openssl_words(seed: bytes, n_words: int, offset_words: int = 0) -> np.ndarray:
    """The oracle: OpenSSL's AES-128-CTR (zero IV) encrypting zeros, as LE uint32."""
    first_block, skip = divmod(offset_words, 4)
    n_blocks = (skip + n_words + 3) // 4
    counter = first_block.to_bytes(16, "big")
    enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    ks = np.frombuffer(enc.update(bytes(16 * n_blocks)), dtype="<u4")
    return ks[skip : skip + n_words].astype(np.uint32)


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    return request.param
