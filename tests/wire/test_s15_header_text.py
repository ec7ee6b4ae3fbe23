"""Header names and ids are printable: a peer cannot put a line break or a terminal
escape into the other side's log through them.

The ids of the header (job, msg_id, reply_to) are made by the sending side and
logged as they are by the other; a coordinator that set ``job`` to "...\\n<a forged line>"
wrote a fake ERROR line into an appliance's log (logs review, session 15, M1).
"""

from __future__ import annotations

import re
import secrets
import time

import msgpack
import pytest

from fedge.wire import codec
from fedge.wire import messages as m
from fedge.wire.codec import BadField, decode, encode

LIMIT = 1 << 20
FORGED = "job-1\n2026-11-30 18:00:00,000 fedge-agent[1] ERROR fedge.agent: FORGED \x1b[31mRED"


def header(**fields: object) -> bytes:
    h = {"version": codec.SCHEMA_VERSION, "type": m.HeartbeatAck.__wire_type__,
         "job": "", "round": 0, "msg_id": "m1", "sender": "coordinator", "sent_at": 1.0,
         "reply_to": None}
    h.update(fields)
    return msgpack.packb(h)


def ack_body() -> bytes:
    frames = encode(m.HeartbeatAck(time=1.0, coordinator_version="1.0"), sender="coordinator")
    return bytes(frames[1])


@pytest.mark.parametrize("name", ["job", "msg_id", "reply_to"])
@pytest.mark.parametrize("bad", [FORGED, "a\rb", "bell\x07", "\x1b]0;title\x07", "nul\x00",
                                 "del\x7f", "c1\x9b31m", "line\u2028sep"])
def test_a_header_name_with_a_control_character_is_refused_by_field(name: str, bad: str) -> None:
    with pytest.raises(BadField) as err:
        decode([header(**{name: bad}), ack_body()], max_bytes=LIMIT)
    assert err.value.field == f"header.{name}"
    assert "must be printable" in str(err.value)
    # the error itself, which both sides log, is one printable line
    assert str(err.value).isprintable()


def test_encode_refuses_a_job_with_a_line_break_too() -> None:
    with pytest.raises(BadField, match=r"header\.job"):
        encode(m.HeartbeatAck(time=1.0, coordinator_version="1.0"), sender="coordinator",
               job=FORGED)


def test_the_job_ids_the_coordinator_makes_and_the_names_peers_use_pass() -> None:
    # the format of fedge.coordinator.service.Coordinator.submit_job and of
    # `fedge coordinator submit` (fedge/coordinator/cli.py)
    job = f"job-{time.strftime('%Y%m%d%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    assert re.fullmatch(r"job-\d{14}-[0-9a-f]{6}", job)
    for sender in ("coordinator", "console", "site-a", "Hospital_3.ward"):
        env = decode(encode(m.HeartbeatAck(time=1.0, coordinator_version="1.0"), sender=sender,
                            job=job, round=3, reply_to="ab" * 16), max_bytes=LIMIT)
        assert (env.header.job, env.header.sender) == (job, sender)
    # a name with letters beyond ASCII is printable, and stays allowed
    env = decode([header(job="étude-ü"), ack_body()], max_bytes=LIMIT)
    assert env.header.job == "étude-ü"


def test_printable_escapes_what_would_forge_a_line_and_keeps_the_rest() -> None:
    assert codec.printable("job-20261130-abc") == "job-20261130-abc"
    assert codec.printable(FORGED) == FORGED.replace("\n", "\\n").replace("\x1b", "\\x1b")
    assert codec.printable("\x9b\u2028é") == "\\x9b\\u2028é"
    assert codec.printable(ValueError("a\nb")) == "a\\nb"
