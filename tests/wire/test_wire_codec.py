"""The wire codec: what is accepted, what is refused and with which named error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import numpy as np
import pytest
import zmq
from _wire_types import Everything, ModelBlob, Ping, Small, assert_same, everything

from fedge.wire import (
    HEADER_FIELDS,
    MAX_HEADER_BYTES,
    SCHEMA_VERSION,
    BadField,
    FrameCountMismatch,
    MalformedFrame,
    MissingField,
    OversizeMessage,
    Tensor,
    UnexpectedField,
    UnknownMessageType,
    UnsupportedVersion,
    WireError,
    decode,
    encode,
    lookup,
    max_bytes_of,
    message,
    registered_types,
    type_name_of,
)

LIMIT = 1 << 30


def header(**over: Any) -> dict[str, Any]:
    h = {
        "version": SCHEMA_VERSION,
        "type": "test.ping",
        "job": "job-1",
        "round": 2,
        "msg_id": "ab" * 16,
        "sender": "hospital-a",
        "sent_at": 1.5,
        "reply_to": None,
    }
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()


def frames_of(h: dict[str, Any], body: Any, *tensors: bytes) -> list[bytes]:
    return [msgpack.packb(h), msgpack.packb(body), *tensors]


# ---------------------------------------------------------------- round trips


def test_every_field_kind_round_trips_with_header() -> None:
    msg = everything()
    frames = encode(msg, sender="hospital-a", job="job-1", round=7, reply_to="cafe")
    env = decode(frames, max_bytes=LIMIT)
    assert_same(env.body, msg)
    h = env.header
    assert (h.version, h.type, h.job, h.round, h.sender, h.reply_to) == (
        SCHEMA_VERSION, "test.everything", "job-1", 7, "hospital-a", "cafe"
    )
    assert len(h.msg_id) == 32 and h.sent_at > 1e9
    assert env.nbytes == sum(memoryview(f).nbytes for f in frames)
    assert isinstance(env.body.ids, tuple) and isinstance(env.body.pair, tuple)


def test_msg_ids_are_unique_unless_given() -> None:
    a = decode(encode(Ping(1), sender="s"), max_bytes=LIMIT).header.msg_id
    b = decode(encode(Ping(1), sender="s"), max_bytes=LIMIT).header.msg_id
    c = decode(encode(Ping(1), sender="s", msg_id="m-1"), max_bytes=LIMIT).header.msg_id
    assert a != b and c == "m-1"


def test_fields_with_defaults_may_be_absent_on_the_wire() -> None:
    frames = encode(everything(), sender="s")
    body = msgpack.unpackb(frames[1])
    del body["note"], body["tags"], body["extra"]  # extra was the last tensor frame
    env = decode([frames[0], msgpack.packb(body), *frames[2:-1]], max_bytes=LIMIT)
    assert env.body.note == "default-note" and env.body.tags == [] and env.body.extra is None


def test_tensor_frames_are_views_of_the_arrays_not_copies() -> None:
    w = np.arange(1000, dtype=np.float32)
    frames = encode(ModelBlob(w), sender="s")
    assert len(frames) == 3
    assert np.shares_memory(np.frombuffer(frames[2], dtype=np.float32), w)


def test_decoded_tensors_are_views_of_the_frame_buffers() -> None:
    frames = [bytes(f) for f in encode(ModelBlob(np.arange(1000, dtype=np.float32)), sender="s")]
    env = decode(frames, max_bytes=LIMIT)
    frame_view = np.frombuffer(frames[2], dtype=np.uint8)
    assert np.shares_memory(env.body.weights, frame_view)
    assert not env.body.weights.flags.writeable  # a read-only view of an immutable frame


def test_zero_copy_through_a_real_zmq_socket() -> None:
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-zero-copy")
        b.connect("inproc://wire-zero-copy")
        w = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
        a.send_multipart(encode(ModelBlob(w), sender="s"), copy=False)
        assert b.poll(5000)
        got = b.recv_multipart(copy=False)
        env = decode(got, max_bytes=LIMIT)
        np.testing.assert_array_equal(env.body.weights, w)
        assert np.shares_memory(env.body.weights, np.frombuffer(got[2].buffer, dtype=np.uint8))
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_non_contiguous_arrays_are_sent_contiguous() -> None:
    w = np.arange(20, dtype=np.float32)[::2]
    env = decode(encode(ModelBlob(w), sender="s"), max_bytes=LIMIT)
    np.testing.assert_array_equal(env.body.weights, w)


def test_registry_lookups() -> None:
    assert registered_types()["test.ping"] is Ping
    assert lookup("test.ping") is Ping
    assert type_name_of(Ping(1)) == type_name_of(Ping) == "test.ping"
    assert max_bytes_of("test.small") == 256 and max_bytes_of("test.model") is None
    with pytest.raises(UnknownMessageType, match=r"no.such"):
        lookup("no.such")


# ---------------------------------------------------------------- encoding refuses bad bodies


@pytest.mark.parametrize(
    ("change", "field", "rule"),
    [
        ({"count": True}, "body.count", "must be an int"),
        ({"count": 2**64}, "body.count", "64 bits"),
        ({"ratio": "x"}, "body.ratio", "must be a float"),
        ({"names": ["a", 3]}, "body.names[1]", "must be a str"),
        ({"scores": {"a": "b"}}, "body.scores['a']", "must be a float"),
        ({"pair": ("x",)}, "body.pair", "tuple of 2"),
        ({"ids": [1]}, "body.ids", "must be a tuple"),
        ({"masked": np.zeros(3, np.int32)}, "body.masked", "dtype uint32"),
        ({"masked": np.zeros((3, 1), np.uint32)}, "body.masked", "ndim 1"),
        ({"rows": np.zeros((3, 15), np.float32)}, "body.rows", "dim 1 == 16"),
        ({"masked": [1, 2]}, "body.masked", "numpy.ndarray"),
    ],
)
def test_encode_refuses_ill_typed_fields(change: dict[str, Any], field: str, rule: str) -> None:
    msg = everything()
    bad = Everything(**{**msg.__dict__, **change})
    with pytest.raises(BadField) as err:
        encode(bad, sender="s")
    assert err.value.field == field and rule in err.value.rule


def test_encode_refuses_unregistered_and_oversize() -> None:
    @dataclass(frozen=True)
    class Loose:
        x: int

    with pytest.raises(UnknownMessageType, match=r"Loose"):
        encode(Loose(1), sender="s")
    with pytest.raises(OversizeMessage, match=r"max_bytes=256 of 'test.small'"):
        encode(Small("x" * 300), sender="s")
    with pytest.raises(BadField, match=r"header.round"):
        encode(Ping(1), sender="s", round=-1)
    with pytest.raises(BadField, match=r"header.sender"):
        encode(Ping(1), sender=3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- registration


def test_registration_refuses_unsupported_schemas() -> None:
    with pytest.raises(TypeError, match=r"frozen"):

        @message("test.bad1")
        @dataclass
        class NotFrozen:
            x: int

    with pytest.raises(TypeError, match=r"dtype and rank"):

        @message("test.bad2")
        @dataclass(frozen=True)
        class BareArray:
            x: np.ndarray

    with pytest.raises(TypeError, match=r"unsupported wire type"):

        @message("test.bad3")
        @dataclass(frozen=True)
        class SetField:
            x: set[int]

    with pytest.raises(TypeError, match=r"dict keys must be str"):

        @message("test.bad4")
        @dataclass(frozen=True)
        class IntKeys:
            x: dict[int, int]

    with pytest.raises(ValueError, match=r"already registered"):

        @message("test.ping")
        @dataclass(frozen=True)
        class Impostor:
            seq: int

    with pytest.raises(ValueError, match=r"already registered as message type 'test.ping'"):
        message("test.ping.alias")(Ping)

    with pytest.raises(ValueError, match=r"not a wire dtype"):
        Tensor(dtype="complex64", ndim=1)
    with pytest.raises(ValueError, match=r"max_bytes"):
        message("test.bad5", max_bytes=0)
    assert "test.bad1" not in registered_types()


def test_bad_annotated_extra_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Annotated"):

        @message("test.bad6")
        @dataclass(frozen=True)
        class Weird:
            x: Annotated[int, "meta"]


# ---------------------------------------------------------------- decoding refuses bad frames


def test_too_few_frames() -> None:
    with pytest.raises(FrameCountMismatch, match=r"at least 2"):
        decode([msgpack.packb(header())], max_bytes=LIMIT)


def test_oversize_against_decoder_limit_checked_before_parsing() -> None:
    frames = [b"\xc1" * 10, b"\xc1" * 10]  # not even msgpack: size is checked first
    with pytest.raises(OversizeMessage) as err:
        decode(frames, max_bytes=19)
    assert err.value.field == "message" and "20 bytes" in err.value.value


def test_oversize_against_type_limit() -> None:
    frames = frames_of(header(type="test.small"), {"text": "y" * 400})
    with pytest.raises(OversizeMessage, match=r"max_bytes=256 of 'test.small'"):
        decode(frames, max_bytes=LIMIT)


def test_oversize_header() -> None:
    frames = frames_of(header(sender="s" * (MAX_HEADER_BYTES + 1)), {"seq": 1})
    with pytest.raises(OversizeMessage, match=r"MAX_HEADER_BYTES"):
        decode(frames, max_bytes=LIMIT)


def test_header_that_is_not_msgpack_or_not_a_map() -> None:
    with pytest.raises(MalformedFrame, match=r"header.*not valid msgpack"):
        decode([b"\xc1", msgpack.packb({})], max_bytes=LIMIT)
    with pytest.raises(MalformedFrame, match=r"header.*must be a msgpack map"):
        decode([msgpack.packb([1, 2]), msgpack.packb({})], max_bytes=LIMIT)
    with pytest.raises(MalformedFrame, match=r"header.*not valid msgpack"):
        decode([msgpack.packb(header())[:-3], msgpack.packb({})], max_bytes=LIMIT)


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None])
def test_wrong_version(version: Any) -> None:
    with pytest.raises(UnsupportedVersion, match=f"header.version: {version!r} is not supported"):
        decode(frames_of(header(version=version), {"seq": 1}), max_bytes=LIMIT)


def test_unknown_type() -> None:
    with pytest.raises(UnknownMessageType, match=r"header.type: 'nope' is not a registered"):
        decode(frames_of(header(type="nope"), {"seq": 1}), max_bytes=LIMIT)
    with pytest.raises(UnknownMessageType):
        decode(frames_of(header(type=["test.ping"]), {"seq": 1}), max_bytes=LIMIT)


@pytest.mark.parametrize("missing", [k for k in HEADER_FIELDS if k != "reply_to"])
def test_missing_header_field(missing: str) -> None:
    with pytest.raises(MissingField, match=f"header.{missing}"):
        decode(frames_of(header(**{missing: _DROP}), {"seq": 1}), max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("round", -1, "0..2**63-1"),
        ("round", "1", "must be an int"),
        ("sent_at", 1, "finite float"),
        ("sent_at", float("nan"), "finite float"),
        ("sender", b"x", "must be a str"),
        ("msg_id", "", "must not be empty"),
        ("msg_id", "x" * 200, "at most 128"),
        ("reply_to", 5, "str or None"),
        ("job", None, "must be a str"),
    ],
)
def test_bad_header_field(name: str, value: Any, rule: str) -> None:
    with pytest.raises(BadField) as err:
        decode(frames_of(header(**{name: value}), {"seq": 1}), max_bytes=LIMIT)
    assert err.value.field == f"header.{name}" and rule in err.value.rule


def test_unexpected_header_field() -> None:
    with pytest.raises(UnexpectedField, match=r"header.priority"):
        decode(frames_of(header(priority=9), {"seq": 1}), max_bytes=LIMIT)


def test_body_missing_unexpected_and_ill_typed_fields() -> None:
    with pytest.raises(MissingField, match=r"body.seq: None is required by Ping"):
        decode(frames_of(header(), {}), max_bytes=LIMIT)
    with pytest.raises(UnexpectedField, match=r"body.admin: 'admin' is not a field of Ping"):
        decode(frames_of(header(), {"seq": 1, "admin": True}), max_bytes=LIMIT)
    with pytest.raises(BadField, match=r"body.seq: True must be an int"):
        decode(frames_of(header(), {"seq": True}), max_bytes=LIMIT)
    with pytest.raises(BadField, match=r"body: \[1\] must be a map \(Ping\)"):
        decode(frames_of(header(), [1]), max_bytes=LIMIT)
    with pytest.raises(MalformedFrame, match=r"body.*not valid msgpack"):
        decode([msgpack.packb(header()), b"\x92\x01"], max_bytes=LIMIT)


def test_message_rule_from_post_init_is_enforced_on_decode() -> None:
    frames = frames_of(header(type="test.ruled"), {"threshold": 0})
    with pytest.raises(BadField, match=r"threshold 0 must be >= 1"):
        decode(frames, max_bytes=LIMIT)


def _model_frames(desc: Any, *tensors: bytes) -> list[bytes]:
    return frames_of(header(type="test.model"), {"weights": desc}, *tensors)


@pytest.mark.parametrize(
    ("desc", "tensor", "rule"),
    [
        ([0, "float64", [2]], b"\0" * 16, "must have dtype float32"),
        ([0, "float32", [2, 1]], b"\0" * 8, "must have ndim 1"),
        ([0, "float32", [3]], b"\0" * 8, "must hold 3 x float32 = 12 bytes"),
        ([0, "float32", [-2]], b"\0" * 8, "ints >= 0"),
        ([1, "float32", [2]], b"\0" * 8, "index must be 0"),
        ([0, "float32"], b"\0" * 8, "descriptor"),
        ("AAAA", b"\0" * 8, "descriptor"),
    ],
)
def test_bad_tensor_descriptors(desc: Any, tensor: bytes, rule: str) -> None:
    with pytest.raises(BadField) as err:
        decode(_model_frames(desc, tensor), max_bytes=LIMIT)
    assert err.value.field == "body.weights" and rule in err.value.rule


@message("test.matrix")
@dataclass(frozen=True)
class Matrix:
    m: Annotated[np.ndarray, Tensor(dtype="float32", ndim=2)]


@pytest.mark.parametrize(
    "shape", [[0, 2**64 - 1], [0, 2**61], [2**62, 0], [2**32, 2**32]]
)
def test_shape_numpy_cannot_hold_is_a_bad_field_even_when_empty(shape: list[int]) -> None:
    # An empty tensor (a 0 dimension, no bytes) whose other dimensions overflow
    # numpy's index type: numpy's own ValueError must not escape decode.
    frames = frames_of(header(type="test.matrix"), {"m": [0, "float32", shape]}, b"")
    with pytest.raises(BadField) as err:
        decode(frames, max_bytes=LIMIT)
    assert err.value.field == "body.m" and "numpy's largest array" in err.value.rule


def test_empty_tensor_with_large_but_valid_dimension_decodes() -> None:
    frames = frames_of(header(type="test.matrix"), {"m": [0, "float32", [0, 2**61 - 1]]}, b"")
    assert decode(frames, max_bytes=LIMIT).body.m.shape == (0, 2**61 - 1)


def test_fixed_dimension_is_checked() -> None:
    frames = encode(everything(), sender="s")
    body = msgpack.unpackb(frames[1])
    body["rows"][2] = [4, 12]
    with pytest.raises(BadField, match=r"body.rows.*dim 1 == 16"):
        decode([frames[0], msgpack.packb(body), *frames[2:]], max_bytes=LIMIT)


def test_frame_count_must_match_descriptors() -> None:
    with pytest.raises(FrameCountMismatch, match=r"references 1"):
        decode(_model_frames([0, "float32", [2]], b"\0" * 8, b"\0" * 8), max_bytes=LIMIT)
    with pytest.raises(FrameCountMismatch, match=r"references tensor frames up to 0"):
        decode(_model_frames([0, "float32", [2]]), max_bytes=LIMIT)
    with pytest.raises(FrameCountMismatch, match=r"references 0"):
        decode(frames_of(header(), {"seq": 1}, b"extra"), max_bytes=LIMIT)


def test_errors_are_value_errors_with_field_value_rule() -> None:
    with pytest.raises(ValueError) as err:
        decode(frames_of(header(), {"seq": "one"}), max_bytes=LIMIT)
    assert isinstance(err.value, WireError)
    assert (err.value.field, err.value.value) == ("body.seq", "'one'")
    assert err.value.rule == "must be an int"
    assert str(err.value) == "body.seq: 'one' must be an int"


def test_long_values_are_shortened_in_errors() -> None:
    with pytest.raises(BadField) as err:
        decode(frames_of(header(), {"seq": list(range(10_000))}), max_bytes=LIMIT)
    assert err.value.value == "<list of 10000 items>"


def test_decode_rejects_non_positive_limit() -> None:
    with pytest.raises(ValueError, match=r"max_bytes 0"):
        decode(encode(Ping(1), sender="s"), max_bytes=0)


# ---------------------------------------------------------------- chunked tensors


def test_big_tensors_travel_as_chunk_views_and_decode_into_one_array() -> None:
    w = np.random.default_rng(1).standard_normal(2500).astype(np.float32)  # 10 000 bytes
    frames = encode(ModelBlob(w), sender="s", chunk_bytes=4096)
    assert [memoryview(f).nbytes for f in frames[2:]] == [4096, 4096, 1808]
    for f in frames[2:]:
        assert np.shares_memory(np.frombuffer(f, dtype=np.uint8), w)
    body = msgpack.unpackb(frames[1])
    assert body["weights"] == [0, "float32", [2500], 3]
    env = decode([bytes(f) for f in frames], max_bytes=LIMIT)
    np.testing.assert_array_equal(env.body.weights, w)
    assert env.body.weights.flags.writeable  # a fresh array, the one copy


def test_release_frames_lets_go_of_each_chunk_once_copied() -> None:
    w = np.arange(3000, dtype=np.float32)
    frames: list[Any] = [bytes(f) for f in encode(ModelBlob(w), sender="s", chunk_bytes=5000)]
    env = decode(frames, max_bytes=LIMIT, release_frames=True)
    np.testing.assert_array_equal(env.body.weights, w)
    assert frames[:2] != [None, None] and frames[2:] == [None, None, None]


def test_small_tensors_and_chunk_none_stay_single_zero_copy_frames() -> None:
    w = np.arange(3000, dtype=np.float32)
    assert len(encode(ModelBlob(w), sender="s")) == 3  # default chunk is 64 MiB
    assert len(encode(ModelBlob(w), sender="s", chunk_bytes=None)) == 3
    with pytest.raises(ValueError, match=r"chunk_bytes 0 must be a positive int"):
        encode(ModelBlob(w), sender="s", chunk_bytes=0)


@pytest.mark.parametrize(
    ("desc", "tensors", "error", "rule"),
    [
        ([0, "float32", [4], 1], [b"\0" * 16], BadField, "n_frames"),
        ([0, "float32", [4], 2], [b"\0" * 8, b"\0" * 4], BadField, "= 16 bytes"),
        ([0, "float32", [4], 3], [b"\0" * 8, b"\0" * 8], FrameCountMismatch, "up to 2"),
        ([0, "float32", [4], 2], [b"\0" * 8, b"\0" * 8, b"\0"], FrameCountMismatch, "references 2"),
    ],
)
def test_bad_chunked_descriptors(
    desc: Any, tensors: list[bytes], error: type[Exception], rule: str
) -> None:
    with pytest.raises(error) as err:
        decode(_model_frames(desc, *tensors), max_bytes=LIMIT)
    assert rule in str(err.value)
