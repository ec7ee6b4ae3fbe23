"""The whole federation vocabulary (fedge.wire.messages, which also registers the
secagg and update messages) goes through the codec: every registered type
round-trips with every field filled, and mutated real messages are refused
with a WireError or decode to a valid message — never anything else.

Samples are built from each type's compiled schema, so a type or field added
later is covered without touching this file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedge.wire.messages  # noqa: F401  registers the vocabulary
from fedge.wire import TENSOR_DTYPES, WireError, codec, decode, encode

OURS = ("test.", "bench.")
VOCABULARY = sorted(n for n in codec.registered_types() if not n.startswith(OURS))


def sample(node: tuple[Any, ...], depth: int = 0) -> Any:
    kind = node[0]
    if kind == "int":
        return 7
    if kind == "float":
        return 0.25
    if kind == "str":
        return "hospital-ä"
    if kind == "bytes":
        return b"\x00\x01\xfe"
    if kind == "bool":
        return True
    if kind == "opt":
        return sample(node[1], depth)
    if kind == "list":
        return [sample(node[1], depth + 1) for _ in range(2)]
    if kind == "vtuple":
        return tuple(sample(node[1], depth + 1) for _ in range(2))
    if kind == "tuple":
        return tuple(sample(n, depth + 1) for n in node[1])
    if kind == "dict":
        return {"a": sample(node[1], depth + 1), "b": sample(node[1], depth + 1)}
    if kind == "tensor":
        spec = node[1]
        shape = tuple(d if d is not None else 3 for d in (spec.shape or (None,) * spec.ndim))
        return np.arange(int(np.prod(shape)), dtype=TENSOR_DTYPES[spec.dtype]).reshape(shape)
    if kind == "struct":
        cls, fields = node[1], node[2]
        return cls(**{name: sample(sub, depth + 1) for name, (sub, _req) in fields.items()})
    raise AssertionError(kind)


def sample_message(type_name: str) -> Any:
    return sample(codec._BY_NAME[type_name].node)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return bool(a == b)


def test_the_vocabulary_is_registered() -> None:
    # the runtime's messages and the secure-aggregation ones at least
    assert {"train_task", "plain_update", "secagg.masked_input"} <= set(VOCABULARY)


@pytest.mark.parametrize("type_name", VOCABULARY)
def test_every_message_type_round_trips(type_name: str) -> None:
    msg = sample_message(type_name)
    env = decode(encode(msg, sender="site-1", job="job-7", round=4), max_bytes=1 << 24)
    assert env.header.type == type_name and (env.header.job, env.header.round) == ("job-7", 4)
    assert same(env.body, msg)


_VALID = [[bytes(f) for f in encode(sample_message(n), sender="s")] for n in VOCABULARY]


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    frames = list(draw(st.sampled_from(_VALID)))
    i = draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    op = draw(st.sampled_from(["flip", "truncate", "drop", "append"]))
    if op == "flip" and f:
        f[draw(st.integers(0, len(f) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del f[draw(st.integers(0, len(f))):]
    elif op == "drop":
        del frames[i]
        return frames
    else:
        f += draw(st.binary(min_size=1, max_size=4))
    frames[i] = bytes(f)
    return frames


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(mutated())
def test_mutated_vocabulary_messages_are_refused_or_valid(frames: list[bytes]) -> None:
    try:
        env = decode(frames, max_bytes=1 << 24)
    except WireError as err:
        assert err.field and err.rule
        return
    assert env.header.type in VOCABULARY
    decode(encode(env.body, sender="again"), max_bytes=1 << 24)
