"""The secure-aggregation messages (fedge.secagg.messages) travel through the codec.

They annotate the masked input as a bare ``np.ndarray``; registration declares
its dtype and rank with ``tensors=``.  Every field of every message is filled
from its annotation, so a field added later is covered too.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from fedge.secagg import messages as sm
from fedge.wire import BadField, Tensor, decode, encode, message, registered_types

TENSORS = {"secagg.masked_input": {"masked": Tensor(dtype="uint32", ndim=1)}}
for _name, _cls in sm.MESSAGE_TYPES.items():
    if _name not in registered_types():
        message(_name, max_bytes=None, tensors=TENSORS.get(_name))(_cls)

SAMPLES: dict[typing.Any, typing.Any] = {
    int: 3,
    str: "hospital-b",
    bytes: b"\x01\x02key",
    bool: True,
    float: 0.5,
    list[str]: ["hospital-a", "hospital-b"],
    dict[str, bytes]: {"hospital-a": b"ct-a", "hospital-b": b""},
    np.ndarray: np.array([0, 1, 2**32 - 1], dtype=np.uint32),
}


def sample(cls: type) -> typing.Any:
    hints = typing.get_type_hints(cls)
    return cls(**{name: SAMPLES[hint] for name, hint in hints.items()})


@pytest.mark.parametrize("type_name", sorted(sm.MESSAGE_TYPES))
def test_secagg_message_round_trips(type_name: str) -> None:
    msg = sample(sm.MESSAGE_TYPES[type_name])
    env = decode(encode(msg, sender="coordinator", job="j", round=3), max_bytes=1 << 20)
    assert env.header.type == type_name and type(env.body) is type(msg)
    for name in typing.get_type_hints(type(msg)):
        got, want = getattr(env.body, name), getattr(msg, name)
        if isinstance(want, np.ndarray):
            assert got.dtype == np.uint32
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want, name


def test_masked_input_with_wrong_dtype_is_refused_both_ways() -> None:
    good = sample(sm.MaskedInput)
    bad = sm.MaskedInput(**{**good.__dict__, "masked": good.masked.astype(np.int64)})
    with pytest.raises(BadField, match=r"body\.masked.*dtype uint32"):
        encode(bad, sender="h1")
    frames = [bytes(f) for f in encode(good, sender="h1")]
    body = msgpack.unpackb(frames[1])
    body["masked"][1] = "float32"
    with pytest.raises(BadField, match=r"body\.masked.*dtype uint32"):
        decode([frames[0], msgpack.packb(body), frames[2]], max_bytes=1 << 20)


def test_tensors_override_must_name_a_bare_ndarray_field() -> None:
    @dataclass(frozen=True)
    class Bare:
        client_id: str
        masked: np.ndarray

    with pytest.raises(TypeError, match="must name a field"):
        message("test.secagg.bad", tensors={"nope": Tensor("uint32", 1)})(Bare)
    with pytest.raises(TypeError, match=r"bare np\.ndarray"):
        message("test.secagg.bad", tensors={"client_id": Tensor("uint32", 1)})(Bare)
    with pytest.raises(TypeError, match="dtype and rank"):
        message("test.secagg.bad")(Bare)
    assert "test.secagg.bad" not in registered_types()
