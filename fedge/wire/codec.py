"""The fedge wire codec: typed messages <-> ZeroMQ multipart frames.

Theory of operation
-------------------
A message on the wire is a list of frames::

    [header, body, tensor_0, tensor_1, ...]

* ``header`` — a msgpack map with the keys of :data:`HEADER_FIELDS`: schema
  ``version``, message ``type``, ``job``, ``round``, ``msg_id``, ``sender``,
  ``sent_at`` (UNIX seconds) and ``reply_to`` (a ``msg_id`` or nil).
* ``body`` — a msgpack map, one entry per dataclass field.  A tensor field is
  written in the body as a descriptor ``[frame_index, dtype, shape]`` and its
  bytes travel as their own frame, raw little-endian, C order.  Tensor frames
  appear in the order their descriptors are met in a depth-first walk of the
  body; every tensor frame is referenced exactly once.

Encoding hands out ``memoryview`` s of the arrays' own buffers (send them with
``copy=False``); decoding builds arrays with ``np.frombuffer`` over the frame
buffers (receive with ``copy=False``), so a tensor of one frame is never copied
by the codec: it is a read-only view; ``.copy()`` one to write to it.  A tensor
larger than ``chunk_bytes`` (:data:`DEFAULT_CHUNK_BYTES`) travels as several
frames, and decoding copies those once into a fresh, writable array.

Message types are frozen dataclasses registered with :func:`message`.  The
field annotations are the schema; supported annotations are

* ``int``, ``float``, ``str``, ``bytes``, ``bool``;
* ``X | None`` (``Optional[X]``), ``list[X]``, ``tuple[X, ...]``,
  ``tuple[X, Y]``, ``dict[str, X]`` of supported types;
* another (frozen) dataclass whose fields follow the same rule;
* ``Annotated[np.ndarray, Tensor(dtype="uint32", ndim=1)]`` — a tensor of one
  dtype (one of :data:`TENSOR_DTYPES`) and rank, optionally with fixed
  dimensions (``Tensor("float32", ndim=2, shape=(None, 16))``).

A field with a dataclass default may be absent on the wire (the default is
used); every other field is required.  Every field is written on encoding, except
one marked :data:`ADDED_LATER` while it holds its default: a peer whose
schema predates that field refuses it as unexpected, and this way a message that
does not use it still reaches that peer.  ``bool`` is not an ``int`` and an
``int`` is not a ``float`` on the wire.  A dataclass ``__post_init__`` that
raises ``ValueError``/``TypeError`` turns into :class:`BadField`, so a message
type can add its own rules (ranges, lengths) and they hold for decoded input.

Decoding checks, in this order, and stops at the first failure: frame count,
total size against ``max_bytes``, header (well-formed, version, type, the
type's own ``max_bytes``, header field types), body (well-formed, missing,
unexpected and ill-typed fields, tensor descriptors against the declared
dtype/rank/shape and the frame sizes), frame count against the descriptors.
Every failure is a :class:`WireError` subclass whose message names the field,
the value and the rule, and whose attributes ``field``, ``value`` and ``rule``
carry them for logs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import os
import reprlib
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, Union

import msgpack
import numpy as np

from fedge.text import printable  # noqa: F401  (codec.printable: its callers' name)

__all__ = [
    "ADDED_LATER",
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
    "fields_added_later",
    "frame_nbytes",
    "lookup",
    "max_bytes_of",
    "message",
    "registered_types",
    "short",
    "type_name_of",
]

#: Version of the frame layout and header.  A peer speaking another version is
#: refused with :class:`UnsupportedVersion`; bump it on any incompatible change.
SCHEMA_VERSION = 1

#: Per-type size limit when ``@message`` is given none (whole message, bytes).
DEFAULT_MAX_BYTES = 1 << 20

#: Tensors larger than this are sent as several frames of this size (see encode).
#: libzmq resets its ZMTP heartbeat timeout and TTL timers only when a whole
#: frame has been received, so a frame must cross the slowest link within
#: ``fedge.transport.heartbeat.ZMTP_TIMEOUT_FLOOR`` (30 s): 1 MiB does so down to
#: ~35 KB/s, where one 64 MiB frame needed ~2.2 MB/s and a site on a slower link
#: lost its connection in the middle of every model.  Small chunks also bound
#: libzmq's CURVE buffers (~2 transient copies of the frame being sent).  Any
#: chunk size decodes in every release (the descriptor counts the frames), and a
#: 64 GiB tensor stays within the transport's 65536 frames per message.
DEFAULT_CHUNK_BYTES = 1 << 20

#: Upper bound for the header frame; checked before it is parsed.
MAX_HEADER_BYTES = 4096

#: Header keys, in wire order.
HEADER_FIELDS = ("version", "type", "job", "round", "msg_id", "sender", "sent_at", "reply_to")

#: Tensor dtypes accepted on the wire (names as in numpy), all little-endian.
TENSOR_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}

_MAX_ID_LEN = 128  # msg_id, reply_to
_MAX_NAME_LEN = 256  # sender, job, type
_MAX_TENSOR_NDIM = 32
_REPR_LIMIT = 80
_FIELD_LIMIT = 200


# --------------------------------------------------------------------------- errors


# Containers are shown two levels deep, a few items each: a peer's value nested a
# thousand levels deep must cost a short string, not a RecursionError.
_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxstring = _REPR.maxother = _REPR_LIMIT
_REPR.maxlong = 40


def short(value: Any, limit: int = _REPR_LIMIT) -> str:
    """A repr of ``value`` of at most ``limit`` characters, for quoting a peer's value
    in an error, a reply or a log line.

    Safe for anything a peer can send: a string of any length is cut before it is
    quoted (a NUL repr-expands fourfold), a container nested past Python's recursion
    limit is shown a few levels deep, and a value whose repr raises is named by type.
    Never raises.
    """
    try:
        if isinstance(value, list | tuple | dict) and len(value) > 8:
            return f"<{type(value).__name__} of {len(value)} items>"
        cut = isinstance(value, bytes | str)
        text = repr(value[:limit]) if cut else _REPR.repr(value)
    except Exception:  # a repr that raises (RecursionError, a huge int...): say what it is
        return f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text


_short = short  # the name this module's errors use


class WireError(ValueError):
    """A message that cannot be encoded or was refused on decoding.

    Attributes ``field`` (dotted path, e.g. ``"body.shares[2].ciphertext"``),
    ``value`` (a short repr of the offending value) and ``rule`` (what was
    expected) say exactly what was wrong; ``str(err)`` combines them.
    """

    def __init__(self, field: str, value: Any, rule: str) -> None:
        if len(field) > _FIELD_LIMIT:  # a path through a peer's map keys
            field = field[: _FIELD_LIMIT - 3] + "..."
        self.field = field
        self.value = _short(value)
        self.rule = rule
        super().__init__(f"{field}: {self.value} {rule}")


class MalformedFrame(WireError):
    """A frame is not what the layout says (not msgpack, not a map, truncated...)."""


class FrameCountMismatch(MalformedFrame):
    """The number of frames does not match the header/body and tensor descriptors."""


class UnsupportedVersion(WireError):
    """The header's schema version is not :data:`SCHEMA_VERSION`."""


class UnknownMessageType(WireError):
    """The message type is not registered (or an unregistered class was encoded)."""


class MissingField(WireError):
    """A required header or body field is absent."""


class UnexpectedField(WireError):
    """A header or body field that the schema does not declare."""


class BadField(WireError):
    """A field has the wrong type, dtype, rank, shape or violates the type's own rule."""


class OversizeMessage(WireError):
    """The message exceeds the decoder's or the message type's ``max_bytes``."""


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Tensor:
    """Annotation marker for a tensor field: ``Annotated[np.ndarray, Tensor("uint32", 1)]``.

    ``shape`` optionally fixes dimensions (``None`` leaves one free); its
    length must equal ``ndim``.

    Raises:
        ValueError: unknown dtype, negative ndim, or a shape that does not fit ndim.
    """

    dtype: str
    ndim: int
    shape: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in TENSOR_DTYPES:
            raise ValueError(
                f"Tensor dtype {self.dtype!r} is not a wire dtype; use one of "
                f"{sorted(TENSOR_DTYPES)}"
            )
        if not isinstance(self.ndim, int) or not 0 <= self.ndim <= _MAX_TENSOR_NDIM:
            raise ValueError(f"Tensor ndim {self.ndim!r} must be an int in 0..{_MAX_TENSOR_NDIM}")
        if self.shape is not None:
            if len(self.shape) != self.ndim:
                raise ValueError(
                    f"Tensor shape {self.shape!r} has {len(self.shape)} dims, ndim is {self.ndim}"
                )
            for dim in self.shape:
                if dim is not None and (not isinstance(dim, int) or dim < 0):
                    raise ValueError(f"Tensor shape {self.shape!r}: dims must be ints >= 0 or None")


# Schema nodes: small tuples built once per registered type.
#   ("int",) ("float",) ("str",) ("bytes",) ("bool",)
#   ("opt", node) ("list", node) ("tuple", (nodes...)) ("vtuple", node)
#   ("dict", node) ("tensor", Tensor)
#   ("struct", cls, {name: (node, required)}, {name: default of an ADDED_LATER field})
_Node = tuple[Any, ...]

#: ``dataclasses.field`` metadata for a message field added after the message type
#: was first released: ``field(default_factory=dict, metadata=ADDED_LATER)``.
#: :func:`encode` leaves such a field out while it holds its default.  The previous
#: release's decoder refuses any field it does not know (:class:`UnexpectedField`),
#: so a message that leaves the new field at its default still decodes there; this
#: release's decoder takes the field's absence as its default, so nothing changes
#: between peers of this release.  The field must have a default.
ADDED_LATER: Mapping[str, bool] = types.MappingProxyType({"fedge.wire.added_later": True})


def fields_added_later(cls: type) -> tuple[str, ...]:
    """The names of ``cls``'s fields marked :data:`ADDED_LATER`, in order."""
    return tuple(f.name for f in dataclasses.fields(cls) if _added_later(f))


def _added_later(f: dataclasses.Field[Any]) -> bool:
    return all(f.metadata.get(k) == v for k, v in ADDED_LATER.items())

_SCALARS: dict[Any, _Node] = {
    int: ("int",),
    float: ("float",),
    str: ("str",),
    bytes: ("bytes",),
    bool: ("bool",),
}

_STRUCTS: dict[type, _Node] = {}


def _compile(annotation: Any, where: str) -> _Node:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base, *extras = args
        tensors = [e for e in extras if isinstance(e, Tensor)]
        if base is np.ndarray and len(tensors) == 1:
            return ("tensor", tensors[0])
        raise TypeError(f"{where}: Annotated[...] is supported only as "
                        f"Annotated[np.ndarray, Tensor(...)], got {annotation!r}")
    if annotation is np.ndarray or origin is np.ndarray:
        raise TypeError(f"{where}: a numpy array field needs its dtype and rank: "
                        f"Annotated[np.ndarray, Tensor(dtype=..., ndim=...)]")
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(non_none) == 1:
            return ("opt", _compile(non_none[0], where))
        raise TypeError(f"{where}: only X | None unions are supported, got {annotation!r}")
    if origin is list and len(args) == 1:
        return ("list", _compile(args[0], f"{where}[]"))
    if origin is tuple and args:
        if len(args) == 2 and args[1] is Ellipsis:
            return ("vtuple", _compile(args[0], f"{where}[]"))
        return ("tuple", tuple(_compile(a, f"{where}[{i}]") for i, a in enumerate(args)))
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str, got {args[0]!r}")
        return ("dict", _compile(args[1], f"{where}[]"))
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _struct_node(annotation)
    raise TypeError(f"{where}: unsupported wire type {annotation!r}")


def _struct_node(cls: type, tensors: Mapping[str, Tensor] | None = None) -> _Node:
    if tensors is None:
        node = _STRUCTS.get(cls)
        if node is not None:
            return node
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__qualname__}: wire messages must be frozen dataclasses")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    for name, spec in (tensors or {}).items():
        if name not in names or not isinstance(spec, Tensor):
            raise TypeError(
                f"{cls.__qualname__}: tensors[{name!r}] must name a field and be a Tensor(...)"
            )
        if hints[name] is not np.ndarray:
            raise TypeError(
                f"{cls.__qualname__}.{name}: tensors= applies to bare np.ndarray fields, "
                f"not {hints[name]!r}"
            )
        hints[name] = Annotated[np.ndarray, spec]
    fields: dict[str, tuple[_Node, bool]] = {}
    added: dict[str, Any] = {}  # ADDED_LATER fields: omitted on encoding at this default
    for f in dataclasses.fields(cls):
        if not f.init:
            raise TypeError(f"{cls.__qualname__}.{f.name}: init=False fields are not supported")
        required = (
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        fields[f.name] = (_compile(hints[f.name], f"{cls.__qualname__}.{f.name}"), required)
        if _added_later(f):
            if required:
                raise TypeError(f"{cls.__qualname__}.{f.name}: a field added later needs "
                                "a default, for peers that do not send it")
            added[f.name] = (f.default if f.default_factory is dataclasses.MISSING
                             else f.default_factory())
    node = ("struct", cls, fields, added)
    _STRUCTS[cls] = node
    return node


@dataclass(frozen=True)
class _Registration:
    type_name: str
    cls: type
    max_bytes: int | None
    node: _Node


_BY_NAME: dict[str, _Registration] = {}
_BY_CLASS: dict[type, _Registration] = {}

_T = TypeVar("_T")


def message(
    type_name: str,
    *,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    tensors: Mapping[str, Tensor] | None = None,
) -> Callable[[_T], _T]:
    """Class decorator registering a frozen dataclass as wire message ``type_name``.

    ``max_bytes`` bounds the whole encoded message (all frames); ``None`` leaves
    only the decoder's own limit.  ``tensors`` declares dtype and rank for
    fields annotated as bare ``np.ndarray`` — for classes defined where the wire
    is not imported, e.g. ``message("secagg.masked_input",
    tensors={"masked": Tensor("uint32", 1)})(MaskedInput)``.  The schema is
    compiled here, so a bad annotation fails at import time, not on the first
    message.

    Raises:
        TypeError: the class is not a frozen dataclass or a field type is unsupported.
        ValueError: ``type_name`` is empty/too long, already taken by another
            class, the class already has another name, or ``max_bytes`` is not
            a positive int.
    """
    if not isinstance(type_name, str) or not 0 < len(type_name) <= _MAX_NAME_LEN:
        raise ValueError(f"message type name {type_name!r} must be a non-empty str "
                         f"of at most {_MAX_NAME_LEN} characters")
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"message {type_name!r}: max_bytes {max_bytes!r} must be a positive int")

    def register(cls: _T) -> _T:
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise TypeError(f"@message({type_name!r}) must decorate a frozen dataclass")
        other = _BY_CLASS.get(cls)
        if other is not None and other.type_name != type_name:
            raise ValueError(
                f"{cls.__qualname__} is already registered as message type "
                f"{other.type_name!r}; one class has one wire name"
            )
        node = _struct_node(cls, tensors)
        old = _BY_NAME.get(type_name)
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"message type {type_name!r} is already registered to "
                f"{old.cls.__module__}.{old.cls.__qualname__}"
            )
        reg = _Registration(type_name, cls, max_bytes, node)
        if old is not None:  # the same class re-imported (module reload)
            _BY_CLASS.pop(old.cls, None)
        _BY_NAME[type_name] = reg
        _BY_CLASS[cls] = reg
        cls.__wire_type__ = type_name  # type: ignore[attr-defined]
        return cls

    return register


def registered_types() -> dict[str, type]:
    """All registered message types, ``{type_name: class}``."""
    return {name: reg.cls for name, reg in _BY_NAME.items()}


def lookup(type_name: str) -> type:
    """The class registered as ``type_name``.

    Raises:
        UnknownMessageType: nothing is registered under that name.
    """
    reg = _BY_NAME.get(type_name)
    if reg is None:
        raise UnknownMessageType("header.type", type_name, "is not a registered message type")
    return reg.cls


def type_name_of(body_or_cls: Any) -> str:
    """The wire type name of a registered message instance or class.

    Raises:
        UnknownMessageType: the class is not registered with ``@message``.
    """
    cls = body_or_cls if isinstance(body_or_cls, type) else type(body_or_cls)
    reg = _BY_CLASS.get(cls)
    if reg is None:
        raise UnknownMessageType("body", cls.__qualname__, "is not a registered message class")
    return reg.type_name


def max_bytes_of(type_name: str) -> int | None:
    """The per-type size limit of ``type_name`` (``None``: only the decoder's).

    Raises:
        UnknownMessageType: nothing is registered under that name.
    """
    lookup(type_name)
    return _BY_NAME[type_name].max_bytes


# --------------------------------------------------------------------------- header/envelope


@dataclass(frozen=True)
class Header:
    """The routing and bookkeeping part of every message."""

    version: int
    type: str
    job: str
    round: int
    msg_id: str
    sender: str
    sent_at: float
    reply_to: str | None = None


@dataclass(frozen=True)
class Envelope:
    """A decoded message: its :class:`Header`, its typed ``body`` and its size in bytes."""

    header: Header
    body: Any
    nbytes: int = 0


# --------------------------------------------------------------------------- encode


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


class _TensorSink:
    """Collects tensor frames while the body is encoded; splits big tensors into chunks."""

    def __init__(self, chunk_bytes: int | None) -> None:
        self.chunk_bytes = chunk_bytes
        self.frames: list[memoryview] = []

    def add(self, arr: np.ndarray, dtype: str) -> list[Any]:
        index = len(self.frames)
        view = _tensor_frame(arr)
        step = self.chunk_bytes
        if step is None or view.nbytes <= step:
            self.frames.append(view)
            return [index, dtype, list(arr.shape)]
        # memoryview slices: the chunks are views of the array, not copies
        self.frames.extend(view[i : i + step] for i in range(0, view.nbytes, step))
        return [index, dtype, list(arr.shape), len(self.frames) - index]


def _enc(node: _Node, value: Any, path: str, tensors: _TensorSink) -> Any:
    kind = node[0]
    if kind == "int":
        if not _is_int(value):
            raise BadField(path, value, "must be an int")
        if not _INT64_MIN <= value <= _UINT64_MAX:
            raise BadField(path, value, "does not fit in 64 bits")
        return value
    if kind == "float":
        if not (_is_int(value) or isinstance(value, float)):
            raise BadField(path, value, "must be a float")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise BadField(path, value, "must be a str")
        return value
    if kind == "bytes":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise BadField(path, value, "must be bytes")
        return bytes(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise BadField(path, value, "must be a bool")
        return value
    if kind == "opt":
        return None if value is None else _enc(node[1], value, path, tensors)
    if kind in ("list", "vtuple"):
        want = list if kind == "list" else tuple
        if not isinstance(value, want):
            raise BadField(path, value, f"must be a {want.__name__}")
        return [_enc(node[1], v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if kind == "tuple":
        if not isinstance(value, tuple) or len(value) != len(node[1]):
            raise BadField(path, value, f"must be a tuple of {len(node[1])} items")
        pairs = enumerate(zip(node[1], value, strict=True))
        return [_enc(n, v, f"{path}[{i}]", tensors) for i, (n, v) in pairs]
    if kind == "dict":
        if not isinstance(value, dict):
            raise BadField(path, value, "must be a dict")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BadField(f"{path}[{k!r}]", k, "dict keys must be str")
            out[k] = _enc(node[1], v, f"{path}[{k!r}]", tensors)
        return out
    if kind == "tensor":
        spec: Tensor = node[1]
        if not isinstance(value, np.ndarray):
            raise BadField(path, type(value).__name__, "must be a numpy.ndarray")
        want_dtype = TENSOR_DTYPES[spec.dtype]
        if value.dtype != want_dtype:
            raise BadField(path, f"dtype {value.dtype}", f"must have dtype {spec.dtype}")
        _check_shape(spec, value.shape, path)
        arr = value if value.flags.c_contiguous else value.copy(order="C")
        return tensors.add(arr, spec.dtype)
    if kind == "struct":
        cls, fields = node[1], node[2]
        if type(value) is not cls:
            raise BadField(path, type(value).__name__, f"must be a {cls.__qualname__}")
        added = node[3]
        out = {}
        for name, (sub, _req) in fields.items():
            item = getattr(value, name)
            if name in added and _same_default(item, added[name]):
                continue  # a peer before the field can still read the message
            out[name] = _enc(sub, item, f"{path}.{name}", tensors)
        return out
    raise AssertionError(f"unknown schema node {kind!r}")  # pragma: no cover


def _same_default(value: Any, default: Any) -> bool:
    """``value`` is ``default`` as the wire would carry it (same type, equal): what
    the decoder puts back when the field is absent."""
    if type(value) is not type(default) or isinstance(value, np.ndarray):
        return False  # an array is always written: its absence decodes to no array
    try:
        return bool(value == default)
    except (ValueError, TypeError):  # a container holding arrays: written, not judged
        return False


def _check_shape(spec: Tensor, shape: Sequence[int], path: str) -> None:
    if len(shape) != spec.ndim:
        raise BadField(path, f"shape {tuple(shape)}", f"must have ndim {spec.ndim}")
    if spec.shape is not None:
        for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if want is not None and got != want:
                raise BadField(
                    path, f"shape {tuple(shape)}", f"must have dim {i} == {want} ({spec.shape})"
                )


def _tensor_frame(arr: np.ndarray) -> memoryview:
    flat = arr.reshape(-1)  # a view: arr is C-contiguous
    if flat.size == 0:
        return memoryview(b"")
    return memoryview(flat.view(np.uint8))


def frame_nbytes(frame: Any) -> int:
    """Size in bytes of one frame (bytes, bytearray, memoryview or ``zmq.Frame``).

    Raises:
        TypeError: ``frame`` does not expose a buffer.
    """
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    if isinstance(frame, memoryview):
        return frame.nbytes
    buf = getattr(frame, "buffer", None)  # zmq.Frame without importing zmq
    if buf is not None:
        return memoryview(buf).nbytes
    return memoryview(frame).nbytes


def encode(
    body: Any,
    *,
    sender: str,
    job: str = "",
    round: int = 0,
    msg_id: str | None = None,
    reply_to: str | None = None,
    sent_at: float | None = None,
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> list[bytes | memoryview]:
    """Encode a registered message into frames ``[header, body, *tensors]``.

    Tensor frames are memoryviews of the arrays' buffers (a C-contiguous array
    is not copied; any other is made contiguous first).  Send them with
    ``copy=False`` and do not modify the arrays until the send completes.
    A tensor larger than ``chunk_bytes`` goes as several frames (views too), so
    that libzmq's per-frame CURVE buffers stay small; ``None`` never splits.
    ``msg_id`` defaults to 16 random bytes in hex; ``sent_at`` to ``time.time()``.

    Raises:
        UnknownMessageType: ``type(body)`` is not registered.
        ValueError: ``chunk_bytes`` is not None or a positive int.
        BadField: a body or header field has the wrong type/dtype/shape, or the
            dataclass holds a value its schema does not allow.
        OversizeMessage: the encoded message exceeds the type's ``max_bytes``.
    """
    reg = _BY_CLASS.get(type(body))
    if reg is None:
        raise UnknownMessageType(
            "body", type(body).__qualname__, "is not a registered message class (use @message)"
        )
    if chunk_bytes is not None and (not _is_int(chunk_bytes) or chunk_bytes <= 0):
        raise ValueError(f"encode: chunk_bytes {chunk_bytes!r} must be a positive int or None")
    if msg_id is None:
        msg_id = os.urandom(16).hex()
    header = Header(
        version=SCHEMA_VERSION,
        type=reg.type_name,
        job=job,
        round=round,
        msg_id=msg_id,
        sender=sender,
        sent_at=time.time() if sent_at is None else float(sent_at),
        reply_to=reply_to,
    )
    _check_header(header)
    tensors = _TensorSink(chunk_bytes)
    body_obj = _enc(reg.node, body, "body", tensors)
    frames: list[bytes | memoryview] = [
        msgpack.packb(_header_map(header)),
        msgpack.packb(body_obj, use_bin_type=True),
    ]
    frames.extend(tensors.frames)
    total = sum(frame_nbytes(f) for f in frames)
    if reg.max_bytes is not None and total > reg.max_bytes:
        raise OversizeMessage(
            "message", f"{total} bytes", f"exceeds max_bytes={reg.max_bytes} of {reg.type_name!r}"
        )
    return frames


def _header_map(header: Header) -> dict[str, Any]:
    return {k: getattr(header, k) for k in HEADER_FIELDS}


# --------------------------------------------------------------------------- decode


def _buffer(frame: Any, index: int) -> memoryview:
    if isinstance(frame, bytes | bytearray | memoryview):
        mv = memoryview(frame)
    else:
        buf = getattr(frame, "buffer", None)  # zmq.Frame
        try:
            mv = memoryview(buf if buf is not None else frame)
        except TypeError:
            raise MalformedFrame(
                f"frame[{index}]", type(frame).__name__, "is not a bytes-like frame"
            ) from None
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())
    return mv


def _unpack(buf: memoryview, what: str) -> Any:
    try:
        return msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise MalformedFrame(
            what, bytes(buf[:16]), f"is not valid msgpack ({type(exc).__name__})"
        ) from None


_HEADER_TYPES: dict[str, tuple[str, int | None]] = {
    # field: (kind, max length for str)
    "version": ("int", None),
    "type": ("str", _MAX_NAME_LEN),
    "job": ("str", _MAX_NAME_LEN),
    "round": ("int", None),
    "msg_id": ("str", _MAX_ID_LEN),
    "sender": ("str", _MAX_NAME_LEN),
    "sent_at": ("float", None),
    "reply_to": ("optstr", _MAX_ID_LEN),
}


# Ids the sending side makes (job-YYYYmmddHHMMSS-hex, hex message ids) and each side
# logs as they are: a line break or an ESC in one would let the peer forge log lines
# or drive the reader's terminal. (``sender`` is only compared with the
# authenticated name, and quoted with ``short`` where it differs; ``type`` must be
# a registered name.)
_PRINTABLE_HEADER_FIELDS = frozenset({"job", "msg_id", "reply_to"})


def _check_header(h: Header) -> None:
    for name, (kind, limit) in _HEADER_TYPES.items():
        v = getattr(h, name)
        path = f"header.{name}"
        if kind == "int" and not _is_int(v):
            raise BadField(path, v, "must be an int")
        if kind == "float" and not (isinstance(v, float) and math.isfinite(v)):
            raise BadField(path, v, "must be a finite float")
        if kind == "str" and not isinstance(v, str):
            raise BadField(path, v, "must be a str")
        if kind == "optstr" and v is not None and not isinstance(v, str):
            raise BadField(path, v, "must be a str or None")
        if limit is not None and isinstance(v, str) and len(v) > limit:
            raise BadField(path, v, f"must be at most {limit} characters")
        if name in _PRINTABLE_HEADER_FIELDS and isinstance(v, str) and not v.isprintable():
            raise BadField(path, v, "must be printable (no line breaks or control "
                           "characters)")
    if not 0 <= h.round < (1 << 63):
        raise BadField("header.round", h.round, "must be in 0..2**63-1")
    if not h.msg_id:
        raise BadField("header.msg_id", h.msg_id, "must not be empty")


def _key(name: str) -> str:
    """A peer's map key as a path component: as is when it reads like a field name."""
    return name if len(name) <= 64 and name.isidentifier() and name.isascii() \
        else short(name, 40)


def _dec(node: _Node, value: Any, path: str, ctx: _DecodeContext) -> Any:
    kind = node[0]
    if kind == "int":
        if not _is_int(value):
            raise BadField(path, value, "must be an int")
        return value
    if kind == "float":
        if not isinstance(value, float):
            raise BadField(path, value, "must be a float")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise BadField(path, value, "must be a str")
        return value
    if kind == "bytes":
        if not isinstance(value, bytes):
            raise BadField(path, value, "must be bytes")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise BadField(path, value, "must be a bool")
        return value
    if kind == "opt":
        return None if value is None else _dec(node[1], value, path, ctx)
    if kind in ("list", "vtuple"):
        if not isinstance(value, list):
            raise BadField(path, value, "must be a list")
        items = [_dec(node[1], v, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
        return items if kind == "list" else tuple(items)
    if kind == "tuple":
        if not isinstance(value, list) or len(value) != len(node[1]):
            raise BadField(path, value, f"must be a list of {len(node[1])} items")
        pairs = enumerate(zip(node[1], value, strict=True))
        return tuple(_dec(n, v, f"{path}[{i}]", ctx) for i, (n, v) in pairs)
    if kind == "dict":
        if not isinstance(value, dict):
            raise BadField(path, value, "must be a map")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise BadField(f"{path}[{short(k, 40)}]", k, "map keys must be str")
            out[k] = _dec(node[1], v, f"{path}[{short(k, 40)}]", ctx)
        return out
    if kind == "tensor":
        return ctx.tensor(node[1], value, path)
    if kind == "struct":
        cls, fields = node[1], node[2]
        if not isinstance(value, dict):
            raise BadField(path, value, f"must be a map ({cls.__qualname__})")
        for k in value:
            if k not in fields:
                raise UnexpectedField(
                    f"{path}.{_key(k)}" if isinstance(k, str) else path, k,
                    f"is not a field of {cls.__qualname__}",
                )
        kwargs = {}
        for name, (sub, required) in fields.items():
            if name in value:
                kwargs[name] = _dec(sub, value[name], f"{path}.{name}", ctx)
            elif required:
                raise MissingField(
                    f"{path}.{name}", None, f"is required by {cls.__qualname__}"
                )
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise BadField(path, cls.__qualname__, f"violates its own rule: {exc}") from None
    raise AssertionError(f"unknown schema node {kind!r}")  # pragma: no cover


#: The largest byte extent numpy can index (np.intp); shapes beyond it are refused.
_MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)


#: With ``release_frames``, freed chunks are handed back to the OS after every
#: this many bytes (see :func:`_return_freed_memory`): the receiver's peak stays
#: within the model plus this much, at one ``malloc_trim`` per 32 MiB.
_TRIM_EVERY_BYTES = 32 << 20


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return typing.cast(Callable[[int], int], trim)


_MALLOC_TRIM = _load_malloc_trim()


def _return_freed_memory() -> None:
    """Give the pages of freed chunks back to the OS (glibc's ``malloc_trim(0)``).

    A chunk (:data:`DEFAULT_CHUNK_BYTES`) is below glibc's dynamic mmap
    threshold once the process has freed any larger block (it rises to 32 MiB),
    so libzmq receives it into a malloc arena, and ``free`` keeps a block in
    the middle of an arena resident: without this, a chunked model would
    briefly take twice its size while it is copied out.  No-op elsewhere.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _DecodeContext:
    """Hands out tensor frames in order as their descriptors are met."""

    def __init__(self, frames: list[memoryview | None], owner: list[Any] | None) -> None:
        self.frames = frames
        self.owner = owner  # the caller's list, emptied chunk by chunk (release_frames)
        self.used = 0
        self.released = 0  # chunk bytes let go since the last _return_freed_memory

    def tensor(self, spec: Tensor, desc: Any, path: str) -> np.ndarray:
        if not (isinstance(desc, list) and len(desc) in (3, 4)):
            raise BadField(
                path, desc, "must be a tensor descriptor [frame_index, dtype, shape(, n_frames)]"
            )
        index, dtype, shape = desc[:3]
        n_frames = desc[3] if len(desc) == 4 else 1
        if not _is_int(index) or index != self.used:
            raise BadField(
                path, index, f"tensor frame index must be {self.used} (tensors in order, each once)"
            )
        if not _is_int(n_frames) or n_frames < 1 or (len(desc) == 4 and n_frames < 2):
            raise BadField(path, f"n_frames {n_frames!r}", "must be an int >= 2 when given")
        if dtype != spec.dtype:
            raise BadField(path, f"dtype {dtype!r}", f"must have dtype {spec.dtype}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise BadField(path, f"shape {shape!r}", "must be a list of ints >= 0")
        _check_shape(spec, shape, path)
        if index + n_frames > len(self.frames):
            raise FrameCountMismatch(
                "frames", f"{len(self.frames)} tensor frames",
                f"but {path} references tensor frames up to {index + n_frames - 1}",
            )
        dt = TENSOR_DTYPES[spec.dtype]
        # numpy refuses a shape whose non-zero dimensions multiply past its
        # index type, even when another dimension is 0 (an empty tensor).
        extent = math.prod(d for d in shape if d) * dt.itemsize
        if extent > _MAX_ARRAY_BYTES:
            raise BadField(
                path, f"shape {tuple(shape)}",
                f"must have its non-zero dimensions x itemsize {dt.itemsize} <= "
                f"{_MAX_ARRAY_BYTES} (numpy's largest array)",
            )
        count = math.prod(shape)
        want = count * dt.itemsize
        parts = self.frames[index : index + n_frames]
        got = sum(b.nbytes for b in parts if b is not None)
        if got != want:
            raise BadField(
                path, f"{n_frames} frame(s) of {got} bytes",
                f"must hold {count} x {spec.dtype} = {want} bytes for shape {tuple(shape)}",
            )
        self.used += n_frames
        if n_frames == 1:
            buf = parts[0]
            assert buf is not None
            return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
        # Chunked: one copy into a fresh array; with release_frames each chunk
        # is let go as soon as it is copied, so the peak stays ~ one payload.
        out = np.empty(count, dtype=dt)
        flat = out.view(np.uint8)
        offset = 0
        for i in range(index, index + n_frames):
            chunk = self.frames[i]
            assert chunk is not None
            size = chunk.nbytes
            flat[offset : offset + size] = np.frombuffer(chunk, dtype=np.uint8)
            offset += size
            if self.owner is not None:
                self.frames[i] = None
                with contextlib.suppress(BufferError):  # still exported elsewhere
                    chunk.release()
                self.owner[2 + i] = None
                self.released += size
                if self.released >= _TRIM_EVERY_BYTES:
                    _return_freed_memory()
                    self.released = 0
        return out.reshape(shape)


def decode(frames: Sequence[Any], *, max_bytes: int, release_frames: bool = False) -> Envelope:
    """Decode and validate frames ``[header, body, *tensors]`` into an :class:`Envelope`.

    ``frames`` may hold bytes, memoryviews or ``zmq.Frame`` s (``recv_multipart(
    copy=False)``); tensors are ``np.frombuffer`` views of the tensor frames,
    read-only when the frames are.  ``max_bytes`` bounds the whole message;
    the type's own ``max_bytes`` applies as well.  A tensor sent in chunks is
    copied once into a fresh (writable) array; with ``release_frames=True`` and
    ``frames`` a list, each chunk's entry is set to ``None`` once copied so its
    memory is freed during decoding (the list is the caller's to give up).

    Raises:
        FrameCountMismatch: fewer than 2 frames, or tensor frames that do not
            match the body's descriptors.
        OversizeMessage: the message exceeds ``max_bytes`` or the type's limit,
            or the header exceeds :data:`MAX_HEADER_BYTES`.
        MalformedFrame: a header/body frame that is not a msgpack map.
        UnsupportedVersion: the header's version is not :data:`SCHEMA_VERSION`.
        UnknownMessageType: the header's type is not registered.
        MissingField, UnexpectedField, BadField: header or body fields that do
            not match the schema.

    Nothing else: whatever else a peer's bytes make the decoder raise (a
    ``RecursionError``, an error in a message type's own rule...) is reported as
    :class:`MalformedFrame` naming the exception's type, so a caller that catches
    :class:`WireError` drops the message and goes on.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"decode: max_bytes {max_bytes!r} must be a positive int")
    try:
        return _decode(frames, max_bytes, release_frames)
    except WireError:
        raise
    except Exception as exc:
        raise MalformedFrame(
            "message", type(exc).__name__, f"could not be decoded: {short(str(exc))}"
        ) from None


def _decode(frames: Sequence[Any], max_bytes: int, release_frames: bool) -> Envelope:
    if len(frames) < 2:
        raise FrameCountMismatch(
            "frames", f"{len(frames)} frames", "must be at least 2 (header, body)"
        )
    bufs = [_buffer(f, i) for i, f in enumerate(frames)]
    total = sum(b.nbytes for b in bufs)
    if total > max_bytes:
        raise OversizeMessage("message", f"{total} bytes", f"exceeds max_bytes={max_bytes}")
    if bufs[0].nbytes > MAX_HEADER_BYTES:
        raise OversizeMessage(
            "header", f"{bufs[0].nbytes} bytes", f"exceeds MAX_HEADER_BYTES={MAX_HEADER_BYTES}"
        )
    raw = _unpack(bufs[0], "header")
    if not isinstance(raw, dict):
        raise MalformedFrame("header", raw, "must be a msgpack map")
    if "version" not in raw:
        raise MissingField("header.version", None, "is required")
    version = raw["version"]
    if version != SCHEMA_VERSION or not _is_int(version):
        raise UnsupportedVersion(
            "header.version", version, f"is not supported (this peer speaks {SCHEMA_VERSION})"
        )
    if "type" not in raw:
        raise MissingField("header.type", None, "is required")
    type_name = raw["type"]
    reg = _BY_NAME.get(type_name) if isinstance(type_name, str) else None
    if reg is None:
        raise UnknownMessageType("header.type", type_name, "is not a registered message type")
    if reg.max_bytes is not None and total > reg.max_bytes:
        raise OversizeMessage(
            "message", f"{total} bytes", f"exceeds max_bytes={reg.max_bytes} of {type_name!r}"
        )
    for k in raw:
        if k not in _HEADER_TYPES:
            raise UnexpectedField(
                f"header.{_key(k)}" if isinstance(k, str) else "header", k,
                "is not a header field",
            )
    for k in HEADER_FIELDS:
        if k not in raw and k != "reply_to":
            raise MissingField(f"header.{k}", None, "is required")
    header = Header(**{k: raw.get(k) for k in HEADER_FIELDS})
    _check_header(header)

    body_raw = _unpack(bufs[1], "body")
    owner = frames if release_frames and isinstance(frames, list) else None
    tensor_bufs: list[memoryview | None] = list(bufs[2:])
    del bufs[2:]
    ctx = _DecodeContext(tensor_bufs, owner)
    body = _dec(reg.node, body_raw, "body", ctx)
    if ctx.used != len(tensor_bufs):
        raise FrameCountMismatch(
            "frames", f"{len(tensor_bufs)} tensor frames",
            f"but the body of {type_name!r} references {ctx.used}",
        )
    return Envelope(header=header, body=body, nbytes=total)
