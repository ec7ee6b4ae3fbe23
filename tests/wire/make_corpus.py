"""Regenerate tests/wire/corpus/*.json: malformed messages with their expected refusal.

Run from the repository root: ``.venv/bin/python tests/wire/make_corpus.py``.
Each file holds ``frames_hex`` (the frames as hex), ``max_bytes`` for decode,
``expect`` (the WireError subclass name) and ``field`` (the field it must name).
New cases found by fuzzing or in the field are added here, or as files by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _wire_types import ModelBlob, Ping, everything

from fedge.wire import SCHEMA_VERSION, encode

OUT = Path(__file__).resolve().parent / "corpus"
LIMIT = 1 << 20


def hdr(**over: Any) -> bytes:
    h: dict[str, Any] = {
        "version": SCHEMA_VERSION, "type": "test.ping", "job": "j", "round": 1,
        "msg_id": "m1", "sender": "h1", "sent_at": 1.0, "reply_to": None,
    }
    h.update(over)
    return msgpack.packb({k: v for k, v in h.items() if v != "__drop__"})


def model(desc: Any, *tensors: bytes) -> list[bytes]:
    return [hdr(type="test.model"), msgpack.packb({"weights": desc}), *tensors]


def main() -> None:
    ok_ping = [bytes(f) for f in encode(Ping(1), sender="h1", msg_id="m1", sent_at=1.0)]
    ok_every = [bytes(f) for f in encode(everything(d=2), sender="h1", msg_id="m2", sent_at=1.0)]
    ok_model = [bytes(f) for f in encode(ModelBlob(np.ones(4, np.float32)), sender="h1",
                                         msg_id="m3", sent_at=1.0)]
    every_body = msgpack.unpackb(ok_every[1])
    cases: dict[str, tuple[list[bytes], str, str, int]] = {
        "empty_message": ([], "FrameCountMismatch", "frames", LIMIT),
        "header_only": ([ok_ping[0]], "FrameCountMismatch", "frames", LIMIT),
        "header_reserved_byte": ([b"\xc1", ok_ping[1]], "MalformedFrame", "header", LIMIT),
        "header_truncated": ([ok_ping[0][:-4], ok_ping[1]], "MalformedFrame", "header", LIMIT),
        "header_trailing_bytes": ([ok_ping[0] + b"\x00", ok_ping[1]], "MalformedFrame", "header",
                                  LIMIT),
        "header_is_array": ([msgpack.packb([1, "test.ping"]), ok_ping[1]], "MalformedFrame",
                            "header", LIMIT),
        "header_huge_map_claim": ([b"\xdf\xff\xff\xff\xff", ok_ping[1]], "MalformedFrame",
                                  "header", LIMIT),
        "header_deep_nesting": ([b"\x91" * 4000, ok_ping[1]], "MalformedFrame", "header", LIMIT),
        "body_deep_nesting": ([ok_ping[0], b"\x91" * 100_000 + b"\x01"], "MalformedFrame", "body",
                              LIMIT),
        "version_future": ([hdr(version=SCHEMA_VERSION + 1), ok_ping[1]], "UnsupportedVersion",
                           "header.version", LIMIT),
        "version_missing": ([hdr(version="__drop__"), ok_ping[1]], "MissingField",
                            "header.version", LIMIT),
        "version_bool": ([hdr(version=True), ok_ping[1]], "UnsupportedVersion", "header.version",
                         LIMIT),
        "type_unknown": ([hdr(type="admin.shutdown"), ok_ping[1]], "UnknownMessageType",
                         "header.type", LIMIT),
        "type_missing": ([hdr(type="__drop__"), ok_ping[1]], "MissingField", "header.type", LIMIT),
        "round_negative": ([hdr(round=-1), ok_ping[1]], "BadField", "header.round", LIMIT),
        "sender_bytes": ([hdr(sender=b"h1"), ok_ping[1]], "BadField", "header.sender", LIMIT),
        "sent_at_int": ([hdr(sent_at=5), ok_ping[1]], "BadField", "header.sent_at", LIMIT),
        "header_extra_key": ([hdr(admin=True), ok_ping[1]], "UnexpectedField", "header.admin",
                             LIMIT),
        "header_bytes_key": ([hdr(**{"x": 1}).replace(b"\xa1x", b"\xc4\x01x"), ok_ping[1]],
                             "UnexpectedField", "header", LIMIT),
        "oversize_total": (ok_every, "OversizeMessage", "message", 64),
        "oversize_header": ([hdr(job="j" * 5000), ok_ping[1]], "OversizeMessage", "header",
                            LIMIT),
        "body_not_msgpack": ([ok_ping[0], b"\xc1"], "MalformedFrame", "body", LIMIT),
        "body_is_int": ([ok_ping[0], msgpack.packb(1)], "BadField", "body", LIMIT),
        "body_missing_field": ([ok_ping[0], msgpack.packb({})], "MissingField", "body.seq", LIMIT),
        "body_extra_field": ([ok_ping[0], msgpack.packb({"seq": 1, "x": 0})], "UnexpectedField",
                             "body.x", LIMIT),
        "body_bool_for_int": ([ok_ping[0], msgpack.packb({"seq": False})], "BadField", "body.seq",
                              LIMIT),
        "body_float_for_int": ([ok_ping[0], msgpack.packb({"seq": 1.0})], "BadField", "body.seq",
                               LIMIT),
        "body_int_for_float": ([ok_every[0], msgpack.packb({**every_body, "ratio": 1}),
                                *ok_every[2:]], "BadField", "body.ratio", LIMIT),
        "body_str_for_bytes": ([ok_every[0], msgpack.packb({**every_body, "blob": "x"}),
                                *ok_every[2:]], "BadField", "body.blob", LIMIT),
        "body_nested_missing": ([ok_every[0], msgpack.packb(
            {**every_body, "shares": [{"holder": "h2"}]}), *ok_every[2:]], "MissingField",
            "body.shares[0].ciphertext", LIMIT),
        "body_tuple_wrong_len": ([ok_every[0], msgpack.packb({**every_body, "pair": ["x"]}),
                                  *ok_every[2:]], "BadField", "body.pair", LIMIT),
        "tensor_wrong_dtype": (model([0, "float64", [4]], b"\0" * 32), "BadField",
                               "body.weights", LIMIT),
        "tensor_big_endian_name": (model([0, ">f4", [4]], b"\0" * 16), "BadField",
                                   "body.weights", LIMIT),
        "tensor_wrong_ndim": (model([0, "float32", [2, 2]], b"\0" * 16), "BadField",
                              "body.weights", LIMIT),
        "tensor_short_frame": (model([0, "float32", [4]], b"\0" * 15), "BadField",
                               "body.weights", LIMIT),
        "tensor_shape_overflow_claim": (model([0, "float32", [2**62]], b"\0" * 16), "BadField",
                                        "body.weights", LIMIT),
        "tensor_reused_index": ([ok_every[0], msgpack.packb(
            {**every_body, "rows": every_body["masked"]}), *ok_every[2:]], "BadField",
            "body.rows", LIMIT),
        "tensor_frame_missing": (ok_model[:2], "FrameCountMismatch", "frames", LIMIT),
        "tensor_frame_extra": ([*ok_model, b"\0" * 16], "FrameCountMismatch", "frames", LIMIT),
        "tensor_descriptor_is_bin": (model(b"\0" * 16), "BadField", "body.weights", LIMIT),
        "tensor_chunks_short": (model([0, "float32", [4], 2], b"\0" * 8, b"\0" * 4), "BadField",
                                "body.weights", LIMIT),
        "tensor_chunk_count_one": (model([0, "float32", [4], 1], b"\0" * 16), "BadField",
                                   "body.weights", LIMIT),
        "tensor_chunk_count_beyond_frames": (model([0, "float32", [4], 9], b"\0" * 16),
                                             "FrameCountMismatch", "frames", LIMIT),
        "fixed_dim_wrong": ([ok_every[0], msgpack.packb(
            {**every_body, "rows": [1, "float32", [1, 8]]}), *ok_every[2:]], "BadField",
            "body.rows", LIMIT),
    }
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, (frames, expect, field, max_bytes) in cases.items():
        doc = {"name": name, "max_bytes": max_bytes, "expect": expect, "field": field,
               "frames_hex": [bytes(f).hex() for f in frames]}
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
