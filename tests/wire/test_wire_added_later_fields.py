"""A message field added after its type was first released (codec.ADDED_LATER) is left
out on encoding while it holds its default: a peer of the previous release, whose
decoder refuses fields it does not know, still reads a message that does not use it.
DatasetClasses gained ``tasks`` and ``input_shapes`` after 0.2.0; a coordinator built
before them (725d344, also "0.2.0") refused every DatasetClasses that carried them."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest

from fedge.wire import codec
from fedge.wire import messages as m


@dataclass(frozen=True)
class DatasetClasses:
    """DatasetClasses as the build before ``tasks``/``input_shapes`` declared it."""

    classes: dict[str, list[str]]


def decode_as_before_the_fields(frames: list) -> DatasetClasses:
    """The previous build's decoding of a DatasetClasses body (its schema, this
    codec's rules, which it shared); raises its WireError."""
    body = msgpack.unpackb(bytes(frames[1]), raw=False)
    return codec._dec(codec._struct_node(DatasetClasses), body, "body",
                      codec._DecodeContext([], None))


def _frames(body: object) -> list[bytes]:
    return [bytes(f) for f in codec.encode(body, sender="h1")]


def test_the_class_lists_alone_travel_without_the_later_fields_and_decode_both_ways():
    earlier = m.DatasetClasses(classes={"scans": ["a", "b", "c"]})
    frames = _frames(earlier)
    assert msgpack.unpackb(frames[1], raw=False) == {"classes": {"scans": ["a", "b", "c"]}}
    assert codec.decode(frames, max_bytes=1 << 20).body == earlier
    assert decode_as_before_the_fields(frames) == DatasetClasses({"scans": ["a", "b", "c"]})


def test_later_fields_that_say_something_are_sent_and_refused_by_the_previous_build():
    full = m.DatasetClasses(classes={}, tasks={"brca": "survival"},
                            input_shapes={"brca": [39]})
    frames = _frames(full)
    assert set(msgpack.unpackb(frames[1], raw=False)) == {"classes", "tasks", "input_shapes"}
    assert codec.decode(frames, max_bytes=1 << 20).body == full
    with pytest.raises(codec.UnexpectedField) as refused:
        decode_as_before_the_fields(frames)
    # the text 725d344's coordinator answered with (upgrade review, s2/out725.txt)
    assert f"{type(refused.value).__name__}: {refused.value}" == \
        "UnexpectedField: body.tasks: 'tasks' is not a field of DatasetClasses"


def test_only_fields_marked_added_later_are_left_out_at_their_default():
    assert codec.fields_added_later(m.DatasetClasses) == \
        ("tasks", "input_shapes", "standardise")
    # a field with a default but not marked is still written (EvalResult.metrics)
    assert not codec.fields_added_later(m.EvalResult)
    body = msgpack.unpackb(_frames(m.EvalResult(task_id="e", n_examples=1))[1], raw=False)
    assert "metrics" in body


def test_a_field_added_later_without_a_default_is_refused_at_registration():
    @dataclass(frozen=True)
    class Grown:
        a: int
        b: int = field(metadata=codec.ADDED_LATER)

    with pytest.raises(TypeError, match=r"Grown\.b: a field added later needs a default"):
        codec.message("test.grown_without_default")(Grown)
    assert "test.grown_without_default" not in codec.registered_types()
