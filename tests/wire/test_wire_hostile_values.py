"""What a hostile peer can put in a message must come back as a named WireError with a
short message, never as another exception or a reply too large to send."""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import pytest

from fedge.update.version import parse_version
from fedge.wire import BadField, MalformedFrame, WireError, decode, encode, message, short
from fedge.wire import messages as m

LIMIT = 1 << 20


def frames_of(body, **replace):
    """``body`` encoded, with body fields replaced by raw wire values (which the
    dataclass itself would refuse to hold)."""
    header, raw = (bytes(f) for f in encode(body, sender="s"))
    fields = msgpack.unpackb(raw)
    fields.update(replace)
    return [header, msgpack.packb(fields, use_bin_type=True)]


@pytest.mark.parametrize("depth", [500, 900, 1000, 1023, 1100, 5000])
def test_a_body_nested_a_thousand_levels_deep_is_a_wire_error_not_a_recursion_error(depth):
    header = bytes(encode(m.Rejected("x"), sender="s")[0])
    with pytest.raises(WireError) as err:
        decode([header, b"\x91" * depth + b"\xc0"], max_bytes=LIMIT)
    assert len(str(err.value)) < 300


@message("test.hostile.raises")
@dataclass(frozen=True)
class RaisesOddly:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise RuntimeError("a rule with a bug in it")


def test_any_other_exception_while_decoding_is_reported_as_malformed_frame():
    with pytest.raises(MalformedFrame, match="RuntimeError"):
        decode(frames_of(RaisesOddly(1), n=-1), max_bytes=LIMIT)


def test_a_map_key_of_half_a_megabyte_is_named_short():
    body = frames_of(m.TrainDone("t", 5), metrics={"\x00" * 500_000: "not a float"})
    with pytest.raises(BadField) as err:
        decode(body, max_bytes=LIMIT)
    assert len(str(err.value)) < 400 and "must be a float" in str(err.value)
    unexpected = frames_of(m.TrainDone("t", 5), **{"\x00" * 500_000: 1})
    with pytest.raises(WireError) as err:
        decode(unexpected, max_bytes=LIMIT)
    assert len(str(err.value)) < 400


def test_short_quotes_anything_in_at_most_its_limit_and_never_raises():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    for value in ("\x00" * 300_000, b"\xff" * 300_000, [[[[[[1]]]]]], 10 ** 5000,
                  {"k": list(range(99))}, nested):
        text = short(value)
        assert isinstance(text, str) and len(text) <= 80
    assert len(short("\x00" * 1000, 20)) <= 20


@pytest.mark.parametrize(("cls", "n"), [
    (m.TrainDone, 2 ** 64 - 1), (m.TrainDone, 2 ** 40 + 1), (m.TrainDone, 0),
    (m.TrainDone, -1), (m.EvalResult, 2 ** 64 - 1), (m.EvalResult, 2 ** 40 + 1),
    (m.EvalResult, -1)])
def test_an_example_count_outside_its_range_is_refused_by_the_decoder(cls, n):
    """A count past 2**40 overflowed SQLite at commit and ended the coordinator; one
    site's huge TrainDone count also set every other site's weight to about 0."""
    with pytest.raises(BadField, match=rf"n_examples {n} is not in"):
        decode(frames_of(cls("t", 5), n_examples=n), max_bytes=LIMIT)


@pytest.mark.parametrize(("cls", "n"), [(m.TrainDone, 1), (m.TrainDone, 2 ** 40),
                                        (m.EvalResult, 0), (m.EvalResult, 2 ** 40)])
def test_example_counts_at_the_ends_of_their_range_are_accepted(cls, n):
    assert decode(frames_of(cls("t", 5), n_examples=n), max_bytes=LIMIT).body.n_examples == n


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 0.0, -0.5, 1.5])
def test_an_aggregate_begin_with_a_weight_scale_outside_0_1_is_refused(scale):
    begin = m.AggregateBegin("t", ["a"], 0.5, False, 1)
    with pytest.raises(BadField, match="weight_scale"):
        decode(frames_of(begin, weight_scale=scale), max_bytes=LIMIT)


@pytest.mark.parametrize("when", [math.nan, math.inf])
def test_a_heartbeat_ack_with_a_non_finite_time_is_refused(when):
    with pytest.raises(BadField, match=r"HeartbeatAck\.time"):
        decode(frames_of(m.HeartbeatAck(1.0, "1.0"), time=when), max_bytes=LIMIT)


@pytest.mark.parametrize("version", ["\x00" * 300_000, "1.0." + "9" * 100, "1.0.0\x00"])
def test_a_version_too_long_or_unprintable_is_refused_and_quoted_short(version):
    with pytest.raises(ValueError) as err:
        parse_version(version, what="agent version")
    assert len(str(err.value)) < 200


def test_reasons_are_clipped_below_the_rejected_limit():
    reason = m.clip_reason("\x00" * 2_000_000)
    assert len(reason) == m.MAX_REASON_CHARS
    encode(m.Rejected(reason), sender="coordinator")
    assert m.clip_reason("short") == "short"
