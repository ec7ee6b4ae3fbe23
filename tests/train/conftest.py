"""Shared fixtures for the training tests: the real Fed-TCGA-BRCA data beside the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "../shared/data"
TCGA = DATA / "fed_tcga_brca"


@pytest.fixture(scope="session")
def tcga_dir() -> Path:
    if not (TCGA / "brca.csv").is_file():
        pytest.skip(f"Fed-TCGA-BRCA not found at {TCGA}")
    return TCGA
