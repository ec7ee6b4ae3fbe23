"""DatasetClasses.standardise (added after tasks and input_shapes, ADDED_LATER): how
each data set is standardised at the site, so the coordinator can refuse at
submission a DP-SGD plan the sites would refuse (plan-matrix review s16, MEDIUM 3).
It travels only when it says something, so a coordinator of the previous build (which
knows tasks and input shapes but not it) still reads a message without it, and
refuses one with it naming the field (the agent's cue to leave it out)."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import pytest

from fedge.wire import codec
from fedge.wire import messages as m


@dataclass(frozen=True)
class DatasetClasses:
    """DatasetClasses as the build before ``standardise`` declared it."""

    classes: dict[str, list[str]]
    tasks: dict[str, str] = field(default_factory=dict, metadata=codec.ADDED_LATER)
    input_shapes: dict[str, list[int]] = field(default_factory=dict,
                                               metadata=codec.ADDED_LATER)


def _decode_as_the_previous_build(frames: list[bytes]) -> DatasetClasses:
    body = msgpack.unpackb(frames[1], raw=False)
    return codec._dec(codec._struct_node(DatasetClasses), body, "body",
                      codec._DecodeContext([], None))


def _frames(body: object) -> list[bytes]:
    return [bytes(f) for f in codec.encode(body, sender="h1")]


def test_standardise_is_the_latest_field_added_to_dataset_classes():
    assert codec.fields_added_later(m.DatasetClasses) == \
        ("tasks", "input_shapes", "standardise")


def test_standardise_travels_and_the_previous_build_refuses_it_by_name():
    full = m.DatasetClasses(classes={}, tasks={"brca": "survival"},
                            input_shapes={"brca": [39]}, standardise={"brca": "continuous"})
    frames = _frames(full)
    assert codec.decode(frames, max_bytes=1 << 20).body == full
    with pytest.raises(codec.UnexpectedField) as refused:
        _decode_as_the_previous_build(frames)
    assert f"{type(refused.value).__name__}: {refused.value}" == \
        "UnexpectedField: body.standardise: 'standardise' is not a field of DatasetClasses"


def test_without_standardise_the_message_is_the_previous_builds():
    before = m.DatasetClasses(classes={}, tasks={"brca": "survival"},
                              input_shapes={"brca": [39]})
    frames = _frames(before)
    assert set(msgpack.unpackb(frames[1], raw=False)) == {"classes", "tasks", "input_shapes"}
    assert _decode_as_the_previous_build(frames) == DatasetClasses(
        {}, {"brca": "survival"}, {"brca": [39]})
    assert codec.decode(frames, max_bytes=1 << 20).body.standardise == {}


def test_a_standardise_mode_out_of_bounds_is_refused():
    with pytest.raises(ValueError, match=r"DatasetClasses.standardise\['brca'\] has 0 "):
        m.DatasetClasses(classes={}, standardise={"brca": ""})
    with pytest.raises(ValueError, match="has 65 characters"):
        m.DatasetClasses(classes={}, standardise={"brca": "x" * 65})
