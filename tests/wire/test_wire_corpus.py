"""Replays tests/wire/corpus/*.json: each malformed message is refused with the
named error naming the expected field (regenerate with make_corpus.py)."""

from __future__ import annotations

import json
from pathlib import Path

import _wire_types  # noqa: F401  registers the test.* message types
import pytest

import fedge.wire as wire

CORPUS = sorted((Path(__file__).resolve().parent / "corpus").glob("*.json"))


def test_corpus_is_present() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_case_is_refused_with_named_error(path: Path) -> None:
    case = json.loads(path.read_text())
    frames = [bytes.fromhex(h) for h in case["frames_hex"]]
    expected = getattr(wire, case["expect"])
    with pytest.raises(wire.WireError) as err:
        wire.decode(frames, max_bytes=case["max_bytes"])
    assert type(err.value) is expected, f"{path.stem}: {err.value!r}"
    assert err.value.field == case["field"], str(err.value)
    assert err.value.rule
