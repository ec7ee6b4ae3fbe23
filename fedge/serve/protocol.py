"""Open Inference Protocol (KServe v2) over REST: parsing and encoding, no I/O.

Theory of operation: the HTTP layer hands `parse_infer_request` the request
body (and the `Inference-Header-Content-Length` header, if any) together with
the signature of the model version the URL names; it gets back validated numpy
arrays or a `ProtocolError` that carries the HTTP status and the message for
the protocol's error object `{"error": "..."}`. `encode_infer_response` turns
the model's outputs into the response body and its headers. Everything here
is a pure function of its arguments, so every malformed request is a plain
unit test.

Binary tensor extension (Triton `binary_tensor_data`): an input whose
`parameters.binary_data_size` is set has no `data`; its bytes (little-endian,
row-major) follow the JSON header in the body, in the order of the inputs. An
output is returned as binary when its request entry says
`parameters.binary_data: true`, or, for outputs without that setting, when the
request's `parameters.binary_data_output` is true (what tritonclient sends by
default). The response then carries `Inference-Header-Content-Length`.

Non-finite numbers: the v2 protocol says nothing about them and strict JSON
(RFC 8259) has no spelling for them. A JSON output holding NaN or an infinity
is written `NaN`, `Infinity`, `-Infinity`, as Python's json does and as Triton
does since it turned on rapidjson's kWriteNanAndInfFlag
(triton-inference-server/server#3870), so tritonclient and Python's json read
them back; a client whose parser is strict should ask for binary outputs.
Requests may use the same tokens.
"""

from __future__ import annotations

import functools
import json
import math
import sys
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


def _load_json(header: bytes) -> dict[str, Any]:
    try:
        # UTF-8 as the protocol says; anything else (a BOM, UTF-16) goes through
        # json's own encoding detection.
        doc = json.loads(header.decode()) if header[:1] == b"{" else json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"malformed JSON in inference request: {exc}") from None
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


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request(f"{where} 'parameters' must be an object")
    return params


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    if type(raw) is list:
        for d in raw:
            if type(d) is not int or d < 0:
                break
        else:
            return tuple(raw)
    raise bad_request(f"{where} 'shape' must be a list of non-negative integers, got {raw!r}")


class ParsedHeader(NamedTuple):
    """What a valid all-binary request header says, checked against one signature:
    enough to rebuild the request from the binary bytes alone."""

    id: str | None
    inputs: tuple[tuple[str, np.dtype, tuple[int, ...], int, int], ...]  # name, dtype, shape, slice
    outputs: tuple[RequestedOutput, ...]
    binary_bytes: int


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
            unsupported datatype, trailing binary bytes, an unknown requested output.
    """
    header, binary = _split_body(body, header_length)
    if parsed is not None:
        known = parsed.get(header)
        if known is not None and known.binary_bytes == len(binary):
            return InferRequest(known.id, {
                name: np.frombuffer(binary[start:stop], dtype=dtype).reshape(shape)
                for name, dtype, shape, start, stop in known.inputs
            }, known.outputs)
    doc = _load_json(header)
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
            layout.append((name, dtype, shape, offset, offset + size))
            offset += size
        else:
            if "data" not in item:
                raise bad_request(f"{where} has neither 'data' nor 'binary_data_size'")
            try:
                arr = np.asarray(item["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise bad_request(f"{where} 'data' is not a {datatype} tensor: {exc}") from None
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
        parsed[bytes(header)] = ParsedHeader(request_id, tuple(layout), requested, len(binary))
    return InferRequest(id=request_id, inputs=arrays, outputs=requested)


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
