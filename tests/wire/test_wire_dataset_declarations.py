"""DatasetClasses gained ``tasks`` and ``input_shapes`` after release 0.2.0: a message
without them (an agent before them) still decodes, and hostile values are refused
by name."""

from __future__ import annotations

import msgpack
import pytest

from fedge.wire import BadField, codec
from fedge.wire import messages as m


def _frames(body: dict) -> list[bytes]:
    header = bytes(codec.encode(m.DatasetClasses(classes={}), sender="h1")[0])
    return [header, msgpack.packb(body)]


def test_a_message_of_the_earlier_form_decodes_with_nothing_declared():
    env = codec.decode(_frames({"classes": {"scans": ["a", "b"]}}), max_bytes=1 << 20)
    assert env.body == m.DatasetClasses(classes={"scans": ["a", "b"]})
    assert env.body.tasks == {} and env.body.input_shapes == {}


def test_tasks_and_shapes_travel():
    sent = m.DatasetClasses(classes={}, tasks={"brca": "survival", "scans": "binary"},
                            input_shapes={"brca": [39], "scans": [1, 64, 64]})
    frames = [bytes(f) for f in codec.encode(sent, sender="h1")]
    assert codec.decode(frames, max_bytes=1 << 20).body == sent


@pytest.mark.parametrize("body", [
    {"classes": {}, "tasks": {"brca": ""}},
    {"classes": {}, "tasks": {"brca": "s" * (m.TASK_NAME_MAX + 1)}},
    {"classes": {}, "input_shapes": {"brca": []}},
    {"classes": {}, "input_shapes": {"brca": [0]}},
    {"classes": {}, "input_shapes": {"brca": [-3]}},
    {"classes": {}, "input_shapes": {"brca": [1 << 31]}},
    {"classes": {}, "input_shapes": {"brca": [1, 2, 3, 4, 5]}},
    {"classes": {}, "input_shapes": {"brca": [1.5]}},
    {"classes": {}, "tasks": {"brca": 3}},
])
def test_hostile_declarations_are_refused_by_name(body):
    with pytest.raises(BadField) as info:
        codec.decode(_frames(body), max_bytes=1 << 20)
    assert "DatasetClasses" in str(info.value) or "body." in info.value.field
