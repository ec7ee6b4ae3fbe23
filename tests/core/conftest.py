"""Fixtures for the compiled-core tests."""

from __future__ import annotations

import pytest
from core_oracle import PATHS


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> str:
    """Every PRG path this CPU has (portable, aesni, vaes256, vaes)."""
    return request.param
