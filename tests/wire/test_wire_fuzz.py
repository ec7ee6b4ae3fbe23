"""Hypothesis fuzzing of the decoder: whatever arrives, decode returns a valid
message or raises a WireError — never another exception, never a crash.

Together with test_wire_vocabulary these run 11 700 examples in the normal test run.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from _wire_types import Everything, ModelBlob, Ping, Share, everything
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedge.wire import SCHEMA_VERSION, WireError, decode, encode

LIMIT = 1 << 20
FAST = settings(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def _decode_or_wire_error(frames: list[bytes]) -> None:
    try:
        env = decode(frames, max_bytes=LIMIT)
    except WireError as err:
        assert err.field and err.rule  # every refusal names what and why
        return
    # Accepted: it must re-encode to something that decodes to the same body.
    again = decode(encode(env.body, sender=env.header.sender), max_bytes=LIMIT)
    assert type(again.body) is type(env.body)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=6,
)

TYPES = ["test.ping", "test.everything", "test.model", "test.small", "test.ruled", "other"]
header_maps = st.fixed_dictionaries(
    {
        "version": st.sampled_from([SCHEMA_VERSION, SCHEMA_VERSION, 0, 2]),
        "type": st.sampled_from(TYPES),
        "job": st.text(max_size=5),
        "round": st.integers(min_value=-2, max_value=2**64 - 1),
        "msg_id": st.text(max_size=4),
        "sender": st.text(max_size=4),
        "sent_at": st.floats(),
    },
    optional={"reply_to": st.none() | st.text(max_size=3), "extra": msgpack_values},
)


@settings(FAST, max_examples=4000)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames(frames: list[bytes]) -> None:
    _decode_or_wire_error(frames)


@settings(FAST, max_examples=2500)
@given(header_maps, msgpack_values, st.lists(st.binary(max_size=80), max_size=4))
def test_structured_garbage(h: dict[str, Any], body: Any, tensors: list[bytes]) -> None:
    _decode_or_wire_error([msgpack.packb(h), msgpack.packb(body), *tensors])


_VALID = [
    [bytes(f) for f in encode(everything(d=3), sender="s", job="j", round=1)],
    [bytes(f) for f in encode(ModelBlob(np.arange(4, dtype=np.float32)), sender="s")],
    [bytes(f) for f in encode(Ping(3), sender="s")],
    [bytes(f) for f in encode(ModelBlob(np.arange(40, dtype=np.float32)), sender="s",
                              chunk_bytes=48)],
]


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    frames = list(draw(st.sampled_from(_VALID)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "drop", "dup", "insert", "swap"]))
        i = draw(st.integers(0, len(frames) - 1))
        f = bytearray(frames[i])
        if op == "flip" and f:
            j = draw(st.integers(0, len(f) - 1))
            f[j] ^= 1 << draw(st.integers(0, 7))
            frames[i] = bytes(f)
        elif op == "truncate":
            frames[i] = bytes(f[: draw(st.integers(0, len(f)))])
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "insert" and f:
            j = draw(st.integers(0, len(f)))
            frames[i] = bytes(f[:j]) + draw(st.binary(min_size=1, max_size=8)) + bytes(f[j:])
        elif op == "swap" and len(frames) > 1:
            k = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[k] = frames[k], frames[i]
    return frames


@settings(FAST, max_examples=3500)
@given(mutated())
def test_mutated_valid_messages(frames: list[bytes]) -> None:
    _decode_or_wire_error(frames)


u32 = st.lists(st.integers(0, 2**32 - 1), max_size=30).map(lambda v: np.array(v, np.uint32))


@settings(FAST, max_examples=200)
@given(
    count=st.integers(-(2**63), 2**63 - 1),
    ratio=st.floats(allow_nan=False),
    name=st.text(max_size=30),
    blob=st.binary(max_size=30),
    names=st.lists(st.text(max_size=5), max_size=4),
    scores=st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False), max_size=4),
    shares=st.lists(st.builds(Share, st.text(max_size=5), st.binary(max_size=8)), max_size=3),
    masked=u32,
    n_rows=st.integers(0, 4),
    maybe=st.none() | st.integers(0, 5),
)
def test_valid_messages_round_trip(
    count: int, ratio: float, name: str, blob: bytes, names: list[str],
    scores: dict[str, float], shares: list[Share], masked: np.ndarray, n_rows: int,
    maybe: int | None,
) -> None:
    base = everything()
    msg = Everything(
        **{
            **base.__dict__,
            "count": count, "ratio": ratio, "name": name, "blob": blob, "names": names,
            "scores": scores, "shares": shares, "masked": masked, "maybe": maybe,
            "rows": np.ones((n_rows, 16), np.float32),
        }
    )
    env = decode(encode(msg, sender=name[:5]), max_bytes=LIMIT)
    got = env.body
    assert (got.count, got.ratio, got.name, got.blob, got.names, got.scores, got.shares) == (
        count, ratio, name, blob, names, scores, shares
    )
    assert got.maybe == maybe and got.rows.shape == (n_rows, 16)
    np.testing.assert_array_equal(got.masked, masked)
