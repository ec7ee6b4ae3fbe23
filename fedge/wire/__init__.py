"""fedge.wire — message types, (de)serialisation, size limits, versioning.

Public API (from :mod:`fedge.wire.codec`)::

    from typing import Annotated
    import numpy as np
    from fedge.wire import message, Tensor, encode, decode

    @message("example.update", max_bytes=64 << 20)
    @dataclass(frozen=True)
    class Update:
        client_id: str
        n_examples: int
        masked: Annotated[np.ndarray, Tensor(dtype="uint32", ndim=1)]
        note: str | None = None          # has a default: may be absent on the wire

    frames = encode(Update("h1", 10, vec), sender="h1", job="j1", round=3)
    sock.send_multipart(frames, copy=False)          # tensors are not copied
    env = decode(sock.recv_multipart(copy=False), max_bytes=limit)
    env.header.type, env.header.round, env.body.masked  # a read-only view of the frame

* ``SCHEMA_VERSION`` — the frame layout version; other versions are refused.
* ``message(type_name, *, max_bytes=DEFAULT_MAX_BYTES, tensors=None)`` —
  registers a frozen dataclass; field types: int, float, str, bytes, bool,
  ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``, nested frozen
  dataclasses and ``Annotated[np.ndarray, Tensor(dtype, ndim, shape=None)]``.
  For classes that annotate a bare ``np.ndarray`` (e.g. fedge.secagg.messages,
  which does not import the wire), declare it at registration:
  ``message("secagg.masked_input", tensors={"masked": Tensor("uint32", 1)})(MaskedInput)``.
* ``encode(body, *, sender, job="", round=0, msg_id=None, reply_to=None,
  sent_at=None, chunk_bytes=DEFAULT_CHUNK_BYTES) -> list[bytes | memoryview]`` —
  frames ``[header, body, *tensors]``; tensors are views of the arrays, those
  over ``chunk_bytes`` (1 MiB: libzmq sees a peer alive only per whole frame)
  split into several views.
* ``decode(frames, *, max_bytes, release_frames=False) -> Envelope(header:
  Header, body, nbytes)`` — single-frame tensors are read-only views of their
  frame; chunked ones are copied once into a fresh array (``release_frames``
  frees each chunk as it is copied, keeping the peak near one payload).
* Errors, all ``WireError`` (a ``ValueError``) with ``.field``, ``.value``,
  ``.rule``: ``MalformedFrame`` (and ``FrameCountMismatch``), ``UnsupportedVersion``,
  ``UnknownMessageType``, ``MissingField``, ``UnexpectedField``, ``BadField``,
  ``OversizeMessage``.
* ``registered_types()``, ``lookup(type_name)``, ``type_name_of(body_or_cls)``,
  ``max_bytes_of(type_name)``, ``frame_nbytes(frame)``.
* ``short(value, limit=80)`` — a repr of at most ``limit`` characters that never
  raises: quote a peer's value with it in errors, replies and logs.

The frame layout and validation order are described in :mod:`fedge.wire.codec`.
``fedge/wire/messages.py`` (the runtime's) defines the federation messages.
"""

from fedge.wire.codec import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_BYTES,
    HEADER_FIELDS,
    MAX_HEADER_BYTES,
    SCHEMA_VERSION,
    TENSOR_DTYPES,
    BadField,
    Envelope,
    FrameCountMismatch,
    Header,
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
    frame_nbytes,
    lookup,
    max_bytes_of,
    message,
    registered_types,
    short,
    type_name_of,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_BYTES",
    "HEADER_FIELDS",
    "MAX_HEADER_BYTES",
    "SCHEMA_VERSION",
    "TENSOR_DTYPES",
    "BadField",
    "Envelope",
    "FrameCountMismatch",
    "Header",
    "MalformedFrame",
    "MissingField",
    "OversizeMessage",
    "Tensor",
    "UnexpectedField",
    "UnknownMessageType",
    "UnsupportedVersion",
    "WireError",
    "decode",
    "encode",
    "frame_nbytes",
    "lookup",
    "max_bytes_of",
    "message",
    "registered_types",
    "short",
    "type_name_of",
]
