"""Open Inference Protocol (KServe v2) over REST: parsing and encoding, no I/O.

Theory of operation: the HTTP layer hands `parse_infer_request` the request
body (and the `Inference-Header-Content-Length` header, if any) together with
the signature of the model version the URL names; it gets back validated numpy
arrays or a `ProtocolError` that carries the HTTP status and the message for
the protocol's error object `{"error": "..."}`. `encode_infer_response` turns
the model's outputs into the response body and its headers. Everything here
but the two functions the server's JSON process runs (at the end) is a pure
function of its arguments, so every malformed request is a plain unit test.

Binary tensor extension (Triton `binary_tensor_data`): an input whose
`parameters.binary_data_size` is set has no `data`; its bytes (little-endian,
row-major; a BOOL is one byte, 0 or 1) follow the JSON header in the body, in
the order of the inputs. An
output is returned as binary when its request entry says
`parameters.binary_data: true`, or, for outputs without that setting, when the
request's `parameters.binary_data_output` is true (what tritonclient sends by
default). The response then carries `Inference-Header-Content-Length`.

Parameters: `binary_data_size` (inputs), `binary_data` (outputs) and
`binary_data_output` (the request) are read; other parameters are ignored,
except those of the Triton features this server does not implement
(`UNSUPPORTED_PARAMETERS`: classification, sequences, priority, timeout,
shared memory), which are a 400 rather than a request served as if they were
not there, and so is a value that is not a string, number or boolean.

Non-finite numbers: the v2 protocol says nothing about them and strict JSON
(RFC 8259) has no spelling for them. A JSON output holding NaN or an infinity
is written `NaN`, `Infinity`, `-Infinity`, as Python's json does and as Triton
does since it turned on rapidjson's kWriteNanAndInfFlag
(triton-inference-server/server#3870), so tritonclient and Python's json read
them back; a client whose parser is strict should ask for binary outputs.
Requests may use the same tokens.

JSON tensor data: the protocol lets a server coerce elements or refuse them
("The server can decide to coerce each element to the required type or return
an error"). This one refuses: BOOL takes only `true`/`false`, the integer types
only JSON integers within their range, the float types only JSON numbers (and
the tokens above) that fit the type. Anything else (null, a string, a bool
where a number belongs, 1.7 for an INT64, 1e300 for an FP32) is a 400 naming
the input and the element: a missing lab value sent as null must not become a
NaN risk score. `data` is flat (any shape of as many elements) or nested exactly
as the shape: the protocol allows both, and a nesting that contradicts the shape
(a feature-major list) would otherwise be read as other patients' rows.

A tensor with no elements (a batch of 0) is a 400: the protocol does not say,
onnxruntime fails on it in some graphs (a 500), and Triton refused a batch size
below 1.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

HEADER_LENGTH = "inference-header-content-length"

# v2 datatype -> numpy dtype (little-endian, as the binary extension defines).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_DTYPE: dict[np.dtype, str] = {v.newbyteorder("="): k for k, v in DATATYPES.items()}

# onnxruntime's type strings -> v2 datatypes.
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class ProtocolError(Exception):
    """A request the protocol rejects; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> bytes:
        return error_body(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # raised in the JSON parser process too (see fedge.serve.server), so it
        # must survive pickling with both of its arguments
        return (type(self), (self.status, self.message))


def error_body(message: str) -> bytes:
    """The protocol's error object: `{"error": "<message>"}`."""
    return json.dumps({"error": message}).encode()


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, v2 datatype, shape (-1 for a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# Named tuples, not frozen dataclasses: built on every request, and a frozen
# dataclass pays an object.__setattr__ per field.
class RequestedOutput(NamedTuple):
    name: str
    binary: bool


class InferRequest(NamedTuple):
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise bad_request(
            f"Inference-Header-Content-Length {header_length!r} is not an integer"
        ) from None
    if not 0 < n <= len(body):
        raise bad_request(
            f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes"
        )
    return body[:n], memoryview(body)[n:]


class _BeyondFloat64(str):
    """A JSON number literal too large for a 64-bit float (Python's json reads it as
    infinity, as if it were the Infinity token); see `_load_json(strict_numbers=True)`."""


def _strict_float(text: str) -> float | _BeyondFloat64:
    value = float(text)
    return _BeyondFloat64(text) if math.isinf(value) else value


class _InfiniteNumber(Exception):
    """A float tensor element read as infinity: the Infinity token, or a literal such
    as 1e400 that overflowed. Only a second, slower read of the document tells."""


def _load_json(header: bytes, *, strict_numbers: bool = False) -> dict[str, Any]:
    parse_float = _strict_float if strict_numbers else None
    try:
        # UTF-8 as the protocol says; anything else (a BOM, UTF-16) goes through
        # json's own encoding detection.
        text = header.decode() if header[:1] == b"{" else header
        doc = json.loads(text, parse_float=parse_float)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, or an integer
        # literal beyond Python's conversion limit, whose message tells the caller to
        # call sys.set_int_max_str_digits(): a hint for programmers, not for clients
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            raise bad_request(f"malformed JSON in inference request: {exc}") from None
        raise bad_request(
            "malformed JSON in inference request: a number too long (integers may have "
            f"at most {sys.get_int_max_str_digits()} digits)"
        ) from None
    except RecursionError:
        # json's decoder recurses once per nested array or object: a client can
        # exhaust the interpreter's stack with a few kilobytes of brackets.
        raise bad_request(
            "malformed JSON in inference request: arrays or objects nested too deeply "
            f"(the parser's limit is about {sys.getrecursionlimit()} levels)"
        ) from None
    if not isinstance(doc, dict):
        raise bad_request(
            f"inference request must be a JSON object, got {type(doc).__name__}"
        )
    return doc


# Triton request features this server does not implement, by their parameter
# names (as tritonclient sends them), wherever they appear: refused, not ignored.
# Ignored, a `classification` output would come back as raw scores, a sequence
# request would run as a stateless one, a shared-memory output never be written.
UNSUPPORTED_PARAMETERS: dict[str, str] = {
    "classification": "Triton's classification extension",
    "sequence_id": "Triton's sequence batching",
    "sequence_start": "Triton's sequence batching",
    "sequence_end": "Triton's sequence batching",
    "priority": "Triton's request priorities",
    "timeout": "Triton's request timeouts",
    "shared_memory_region": "Triton's shared-memory extensions",
    "shared_memory_byte_size": "Triton's shared-memory extensions",
    "shared_memory_offset": "Triton's shared-memory extensions",
}
# "$parameter = $string : $string | $number | $boolean" (the v2 protocol)
_PARAMETER_VALUE_TYPES = (str, int, float)  # bool is an int


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The `parameters` object of a request, input or output (`where` names it).

    Raises:
        ProtocolError(400): not an object; a parameter of a feature this server does
            not implement (UNSUPPORTED_PARAMETERS); a value that is not a string,
            number or boolean.
    """
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request(f"{where} 'parameters' must be an object")
    for key, value in params.items():
        feature = UNSUPPORTED_PARAMETERS.get(key)
        if feature is not None:
            raise bad_request(
                f"{where} parameter '{key}' ({feature}) is not supported by fedge serve"
            )
        if not isinstance(value, _PARAMETER_VALUE_TYPES):
            raise bad_request(
                f"{where} parameter '{key}' is {_describe(value)}, which fedge serve does "
                "not support: a parameter value is a string, number or boolean (v2 protocol)"
            )
    return params


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    if type(raw) is list:
        for d in raw:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(raw)
    raise bad_request(f"{where} 'shape' must be a list of non-negative integers, got {raw!r}")


_JSON_TYPES: dict[str, tuple[frozenset[type], str]] = {
    # numpy dtype kind -> (the Python types json gives for valid elements, the rule)
    "b": (frozenset({bool}), "JSON true or false"),
    "i": (frozenset({int}), "JSON integers"),
    "u": (frozenset({int}), "JSON integers"),
    "f": (frozenset({int, float}), "JSON numbers (or the tokens NaN, Infinity, -Infinity)"),
}


def _describe(value: Any) -> str:
    """A JSON value as a client would recognise it in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _BeyondFloat64):
        return f"the number {value}, beyond the range of a 64-bit float"
    if isinstance(value, str):
        return f"the string {json.dumps(value[:30])[:-1]}{'...' if len(value) > 30 else ''}\""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if type(value) is int:
        return _int_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("-Infinity" if value < 0 else "Infinity")
    return f"the number {value!r}"


def _int_text(value: int) -> str:
    text = str(value)  # at most 4300 digits: json refuses longer literals
    return f"the integer {text}" if len(text) <= 24 else \
        f"an integer of {len(text.lstrip('-'))} digits"


def _flatten(data: Any, shape: tuple[int, ...], where: str) -> tuple[list[Any], set[type]]:
    """The elements of nested or flat `data` in row-major order, and their types.

    Flat data (one list, or a bare value) stands for any shape of as many
    elements; nested lists are the tensor itself, so their lengths at each level
    must be `shape`: a feature-major [39][2] list sent with shape [2, 39] holds
    the right number of elements in the wrong order, and flattening it anyway
    would score each patient on other patients' values.

    Raises:
        ProtocolError(400): lists and values mixed at one level, nested lists of
            different lengths, or a nesting that is not `shape`.
    """
    if type(data) is not list:
        data = [data]  # a bare value: the one element of a rank-0 tensor
    flat = data
    nesting = [len(data)]
    while True:
        kinds = set(map(type, flat))
        if list not in kinds:
            break
        if len(kinds) > 1:
            raise bad_request(f"{where} 'data' mixes lists and values at one nesting level")
        lengths = set(map(len, flat))
        if len(lengths) > 1:
            raise bad_request(f"{where} 'data' has nested lists of different lengths")
        nesting.append(lengths.pop())
        flat = list(itertools.chain.from_iterable(flat))
    if len(nesting) > 1 and tuple(nesting) != shape:
        raise bad_request(
            f"{where} data is nested as {nesting} but shape is {list(shape)} (send the "
            "elements flat, or nested exactly as the shape, row-major)"
        )
    return flat, kinds


def _json_tensor(
    data: Any, shape: tuple[int, ...], datatype: str, dtype: np.dtype, where: str, *,
    strict_numbers: bool,
) -> np.ndarray:
    """JSON `data` of a tensor of `shape` as a flat array of `dtype`, every element
    checked, none coerced.

    Raises:
        ProtocolError(400): nested lists that are not `shape` (see `_flatten`); the
            first element that is not a JSON value of `datatype`, or one outside its
            range, by its row-major index.
        _InfiniteNumber: a float element is infinite and the document was not
            read with `strict_numbers` (the caller reads it again that way).
    """
    flat, kinds = _flatten(data, shape, where)
    allowed, rule = _JSON_TYPES[dtype.kind]
    if not kinds <= allowed:
        i = next(i for i, v in enumerate(flat) if type(v) not in allowed)
        if type(flat[i]) is float and math.isinf(flat[i]) and not strict_numbers:
            raise _InfiniteNumber  # Infinity, or a literal such as 1e400: say which
        raise bad_request(
            f"{where} 'data' element {i} is {_describe(flat[i])}; {datatype} data must be {rule}"
        )
    if dtype.kind in "iu":
        try:
            return np.array(flat, dtype=dtype)
        except OverflowError:
            info = np.iinfo(dtype)
            i = next(i for i, v in enumerate(flat) if not info.min <= v <= info.max)
            raise bad_request(
                f"{where} 'data' element {i} is {_int_text(flat[i])}, outside the range of "
                f"{datatype} "
                f"({info.min}..{info.max})"
            ) from None
    if dtype.kind == "b":
        return np.array(flat, dtype=dtype)
    try:
        with np.errstate(over="ignore"):  # overflow to infinity is looked for below
            arr = np.array(flat, dtype=dtype)
    except OverflowError:  # an integer too large even for a 64-bit float
        i = next(i for i, v in enumerate(flat) if type(v) is int and _beyond_float64(v))
        raise _out_of_range(where, i, _int_text(flat[i]), datatype) from None
    if not np.isfinite(arr).all():  # NaN or an infinity: from the tokens, or an overflow
        for i in np.flatnonzero(np.isinf(arr)).tolist():
            value = flat[i]
            if type(value) is float and math.isinf(value):
                if not strict_numbers:
                    raise _InfiniteNumber
                continue  # the Infinity token (a literal 1e400 is a _BeyondFloat64 here)
            shown = _int_text(value) if type(value) is int else f"the number {value!r}"
            raise _out_of_range(where, i, shown, datatype)  # finite, but not in dtype
    return arr


def _beyond_float64(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _out_of_range(where: str, index: int, shown: str, datatype: str) -> ProtocolError:
    largest = float(np.finfo(DATATYPES[datatype]).max)
    return bad_request(
        f"{where} 'data' element {index} is {shown}, beyond the range of {datatype} "
        f"(largest magnitude {largest:.8g})"
    )


class ParsedHeader(NamedTuple):
    """What a valid all-binary request header says, checked against one signature:
    enough to rebuild the request from the binary bytes alone."""

    id: str | None
    inputs: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, slice
    outputs: tuple[RequestedOutput, ...]
    binary_bytes: int
    has_bool: bool  # a BOOL input, whose bytes must be checked every time


def _check_bool_bytes(arr: np.ndarray, where: str) -> None:
    """Raises ProtocolError(400) if a BOOL tensor read from binary data holds a byte
    other than 0 or 1 (numpy would take any byte as a bool; the JSON path takes
    only true and false)."""
    raw = arr.reshape(-1).view(np.uint8)
    if raw.size and int(raw.max()) > 1:
        i = int(np.flatnonzero(raw > 1)[0])
        raise bad_request(
            f"{where} binary data byte {i} is {int(raw[i])}; BOOL bytes must be 0 or 1"
        )


PARSED_HEADERS_KEPT = 64  # distinct headers remembered per model version


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    parsed: dict[bytes, ParsedHeader] | None = None,
) -> InferRequest:
    """Validate an inference request against the model's signature.

    `parsed`, when given, remembers the headers of valid requests whose tensors
    are all binary, for this one signature (the caller keeps one per model
    version). A client with fixed shapes sends the same JSON header every time
    (tritonclient does): an identical header with as many binary bytes is then
    the identical request but for its tensor values, and skips the JSON parse
    and the checks. Anything else is parsed and checked in full.

    Raises:
        ProtocolError(400): malformed JSON, a bad header length, an unknown,
            missing or duplicated input, a datatype, shape or data-size mismatch,
            a JSON data element that is not of the input's datatype or not in its
            range, unsupported datatype, trailing binary bytes, an unknown
            requested output.
    """
    header, binary = _split_body(body, header_length)
    if parsed is not None:
        known = parsed.get(header)
        if known is not None and known.binary_bytes == len(binary):
            arrays = {
                name: np.frombuffer(binary[start:stop], dtype=dtype).reshape(shape)
                for name, dtype, shape, start, stop in known.inputs
            }
            if known.has_bool:
                for name, arr in arrays.items():
                    if arr.dtype.kind == "b":
                        _check_bool_bytes(arr, f"input '{name}'")
            return InferRequest(known.id, arrays, known.outputs)
    try:
        return _check_request(_load_json(header), header, binary, model, inputs, outputs,
                              parsed, strict_numbers=False)
    except _InfiniteNumber:
        # Rare (an infinite float element): read the document again, slower, with
        # number literals beyond a 64-bit float told apart from the Infinity token.
        return _check_request(_load_json(header, strict_numbers=True), header, binary, model,
                              inputs, outputs, parsed, strict_numbers=True)


def _check_request(
    doc: dict[str, Any],
    header: bytes | memoryview,
    binary: memoryview,
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    parsed: dict[bytes, ParsedHeader] | None,
    *,
    strict_numbers: bool,
) -> InferRequest:
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("inference request 'id' must be a string")
    req_params = _parameters(doc, "inference request")
    binary_default = req_params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_request("parameter 'binary_data_output' must be a boolean")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request("inference request needs a non-empty 'inputs' list")
    specs = {s.name: s for s in inputs}
    arrays: dict[str, np.ndarray] = {}
    layout: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict):
            raise bad_request(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise bad_request(f"inputs[{i}] needs a string 'name'")
        spec = specs.get(name)
        if spec is None:
            raise bad_request(
                f"unexpected inference input '{name}' for model '{model}'; "
                f"expected: {', '.join(sorted(specs))}"
            )
        where = f"input '{name}'"
        if name in arrays:
            raise bad_request(f"{where} appears more than once")
        datatype = item.get("datatype")
        if datatype != spec.datatype:
            raise bad_request(
                f"{where} has datatype {datatype!r} but model '{model}' expects {spec.datatype}"
            )
        dtype = DATATYPES.get(datatype)
        if dtype is None:
            raise bad_request(f"{where}: datatype {datatype} is not supported by this server")
        shape = _check_shape(item.get("shape"), where)
        if len(shape) != len(spec.shape) or any(
            want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
        ):
            raise bad_request(
                f"{where} has shape {list(shape)} but model '{model}' expects "
                f"{list(spec.shape)} (-1: any size)"
            )
        count = math.prod(shape)
        if count == 0:
            # Nothing to infer on. onnxruntime runs some graphs on an empty batch
            # and fails in others (the CNN's GroupNorm Reshape): a 500 for a
            # client's input. The protocol does not say; Triton refused a batch
            # size below 1 ("inference request batch-size must be >= 1").
            raise bad_request(
                f"{where} has shape {list(shape)}, which holds no elements; "
                "send at least one"
            )
        params = _parameters(item, where)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad_request(f"{where} 'binary_data_size' must be a non-negative integer")
            if "data" in item:
                raise bad_request(f"{where} has both 'data' and 'binary_data_size'")
            if size != count * dtype.itemsize:
                raise bad_request(
                    f"{where} binary_data_size {size} does not match shape {list(shape)} of "
                    f"{datatype} ({count * dtype.itemsize} bytes)"
                )
            if offset + size > len(binary):
                raise bad_request(
                    f"{where} needs {size} bytes of binary data but only "
                    f"{len(binary) - offset} remain in the body"
                )
            arr = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(shape)
            if dtype.kind == "b":
                _check_bool_bytes(arr, where)
            layout.append((name, dtype, shape, offset, offset + size))
            offset += size
        else:
            if "data" not in item:
                raise bad_request(f"{where} has neither 'data' nor 'binary_data_size'")
            arr = _json_tensor(item["data"], shape, datatype, dtype, where,
                               strict_numbers=strict_numbers)
            if arr.size != count:
                raise bad_request(
                    f"{where} has {arr.size} data elements but shape {list(shape)} "
                    f"holds {count}"
                )
            arr = arr.reshape(shape)
        arrays[name] = arr
    if offset != len(binary):
        raise bad_request(
            f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed"
        )
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise bad_request(f"model '{model}' needs input(s) {', '.join(missing)}")

    out_names = [s.name for s in outputs]
    raw_outputs = doc.get("outputs")
    if raw_outputs is None:
        requested = tuple(RequestedOutput(n, binary_default) for n in out_names)
    else:
        if not isinstance(raw_outputs, list):
            raise bad_request("'outputs' must be a list")
        chosen: list[RequestedOutput] = []
        for i, item in enumerate(raw_outputs):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise bad_request(f"outputs[{i}] must be an object with a string 'name'")
            name = item["name"]
            if name not in out_names:
                raise bad_request(
                    f"unexpected inference output '{name}' for model '{model}'; "
                    f"expected: {', '.join(out_names)}"
                )
            flag = _parameters(item, f"output '{name}'").get("binary_data", binary_default)
            if not isinstance(flag, bool):
                raise bad_request(f"output '{name}' parameter 'binary_data' must be a boolean")
            chosen.append(RequestedOutput(name, flag))
        requested = tuple(chosen) if chosen else tuple(
            RequestedOutput(n, binary_default) for n in out_names
        )
    if parsed is not None and len(layout) == len(arrays):  # every tensor was binary
        if len(parsed) >= PARSED_HEADERS_KEPT:
            parsed.clear()  # a client that varies its header: start over, stay bounded
        parsed[bytes(header)] = ParsedHeader(
            request_id, tuple(layout), requested, len(binary),
            any(dtype.kind == "b" for _, dtype, _, _, _ in layout),
        )
    return InferRequest(id=request_id, inputs=arrays, outputs=requested)


# -- what the server's JSON process runs (fedge.serve.server) -----------------


def json_process_init(server_pid: int) -> None:
    """Start-up of the server's JSON process: Ctrl-C is for the server (which stops
    this process itself), and the process exits once the server is gone. A server
    killed outright would otherwise leave it behind for good: it holds both ends of
    its own task queue, so it never reads end-of-file."""

    def watch() -> None:
        while os.getppid() == server_pid:
            time.sleep(1.0)
        os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=watch, name="fedge-json-watch", daemon=True).start()


def parse_infer_request_file(
    path: str,
    header_length: str | None,
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> InferRequest:
    """`parse_infer_request` of the body in the file at `path`: what the server's JSON
    process runs (fedge.serve.server), a large body being handed over as a file.

    Raises:
        ProtocolError(400): as parse_infer_request.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as f:
        body = f.read()
    return parse_infer_request(body, header_length, model, inputs, outputs)


def datatype_of(arr: np.ndarray) -> str:
    """The v2 datatype of a numpy array.

    Raises:
        ValueError: the dtype has no v2 equivalent in this server.
    """
    found = _BY_DTYPE.get(arr.dtype)  # native byte order: no new dtype to build
    if found is not None:
        return found
    try:
        return _BY_DTYPE[arr.dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"dtype {arr.dtype} has no v2 datatype here") from None


def encode_infer_response(
    model: str,
    version: str,
    request: InferRequest,
    results: Sequence[np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers for `results` (in `request.outputs` order).

    Raises:
        ValueError: an output whose dtype has no v2 datatype.
    """
    # The header is written by hand: json.dumps of this small, fixed-shape
    # document was a fifth of the server's CPU per Cox request.
    entries: list[str] = []
    chunks: list[bytes] = []
    for want, arr in zip(request.outputs, results, strict=True):
        head = (f'{{"name":{_json_str(want.name)},"datatype":"{datatype_of(arr)}",'
                f'"shape":[{",".join(map(str, arr.shape))}]')
        if want.binary:
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            raw = arr.tobytes()  # row-major whatever the strides
            entries.append(f'{head},"parameters":{{"binary_data_size":{len(raw)}}}}}')
            chunks.append(raw)
        else:
            data = json.dumps(arr.ravel().tolist(), separators=(",", ":"))
            entries.append(f'{head},"data":{data}}}')
    rid = "" if request.id is None else f',"id":{json.dumps(request.id)}'
    header = (f'{{"model_name":{_json_str(model)},"model_version":{_json_str(version)}{rid},'
              f'"outputs":[{",".join(entries)}]}}').encode()
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {
        "content-type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


@functools.lru_cache(maxsize=1024)
def _json_str(text: str) -> str:
    """`text` as a JSON string literal (model, version and tensor names repeat)."""
    return json.dumps(text)
