"""The v2 protocol as pure functions: request parsing, binary tensors, response encoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedge.serve.protocol import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    TensorSpec,
    encode_infer_response,
    parse_infer_request,
)

INPUTS = (TensorSpec("x", "FP32", (-1, 3)), TensorSpec("mask", "BOOL", (-1, 3)))
OUTPUTS = (TensorSpec("risk", "FP32", (-1, 1)), TensorSpec("rank", "INT64", (-1,)))


def _binary_body(doc: dict, *arrays: np.ndarray) -> tuple[bytes, str]:
    header = json.dumps(doc).encode()
    return header + b"".join(a.tobytes() for a in arrays), str(len(header))


def _parse(doc: dict | bytes, header_length: str | None = None) -> InferRequest:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_infer_request(body, header_length, "m", INPUTS, OUTPUTS)


def _json_inputs(x: list, mask: list, rows: int = 2) -> dict:
    return {"inputs": [
        {"name": "x", "shape": [rows, 3], "datatype": "FP32", "data": x},
        {"name": "mask", "shape": [rows, 3], "datatype": "BOOL", "data": mask},
    ]}


def test_json_tensors_flat_or_nested_become_arrays_of_the_model_dtype() -> None:
    flat = _parse(_json_inputs([1, 2, 3, 4, 5, 6], [True] * 6))
    nested = _parse(_json_inputs([[1, 2, 3], [4, 5, 6]], [[True] * 3] * 2))
    for req in (flat, nested):
        assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].shape == (2, 3)
        assert req.inputs["mask"].dtype == np.bool_
    np.testing.assert_array_equal(flat.inputs["x"], nested.inputs["x"])
    # no outputs named: all of them, JSON unless binary_data_output is set
    assert flat.outputs == (RequestedOutput("risk", False), RequestedOutput("rank", False))


def test_binary_tensors_are_read_in_input_order_after_the_json_header() -> None:
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    mask = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    doc = {"inputs": [
        {"name": "mask", "shape": [2, 3], "datatype": "BOOL",
         "parameters": {"binary_data_size": 6}},
        {"name": "x", "shape": [2, 3], "datatype": "FP32",
         "parameters": {"binary_data_size": 24}},
    ], "parameters": {"binary_data_output": True},
       "outputs": [{"name": "rank", "parameters": {"binary_data": False}}, {"name": "risk"}]}
    body, length = _binary_body(doc, mask, x)
    req = _parse(body, length)
    np.testing.assert_array_equal(req.inputs["x"], x)
    np.testing.assert_array_equal(req.inputs["mask"], mask)
    assert req.outputs == (RequestedOutput("rank", False), RequestedOutput("risk", True))


@pytest.mark.parametrize(
    ("doc", "length", "needle"),
    [
        (b"\xff\xfe", None, "malformed JSON"),
        (b"[1, 2]", None, "must be a JSON object, got list"),
        ({"inputs": []}, None, "non-empty 'inputs'"),
        ({"inputs": [{"name": "y", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}]},
         None, "unexpected inference input 'y'"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}]},
         None, "needs input(s) mask"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0] * 3}] * 2},
         None, "appears more than once"),
        ({"inputs": [{"name": "x", "shape": [1, -3], "datatype": "FP32", "data": [0] * 3}]},
         None, "non-negative integers"),
        ({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [0] * 3}]},
         None, "shape [3] but model 'm' expects [-1, 3]"),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a"] * 3}]},
         None, "input 'x' 'data' element 0 is the string \"a\""),
        ({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]},
         None, "neither 'data' nor 'binary_data_size'"),
        ({**_json_inputs([0] * 3, [True] * 3, rows=1), "outputs": [{"name": "nope"}]},
         None, "unexpected inference output 'nope'"),
        ({**_json_inputs([0] * 3, [True] * 3, rows=1),
          "parameters": {"binary_data_output": 1}},
         None, "must be a boolean"),
        (b'{"inputs": []}', "999", "outside the body of 14 bytes"),
        (b'{"inputs": []}', "ten", "is not an integer"),
        # json's decoder recurses per level: this exhausted the stack (a 500)
        (b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested too deeply"),
        (b'{"inputs": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, None, "nested too deeply"),
    ],
)
def test_invalid_requests_are_400_naming_the_problem(
    doc: dict | bytes, length: str | None, needle: str
) -> None:
    with pytest.raises(ProtocolError) as err:
        _parse(doc, length)
    assert err.value.status == 400
    assert needle in err.value.message
    assert json.loads(err.value.body()) == {"error": err.value.message}


def _one_input(datatype: str, data: list | str) -> InferRequest:
    """A request for a model with one input "v" of `datatype` and shape [-1];
    `data` is a list, or the JSON text of one (for what json.dumps cannot write)."""
    text = data if isinstance(data, str) else json.dumps(data)
    body = (f'{{"inputs": [{{"name": "v", "shape": [{text.count(",") + 1}], '
            f'"datatype": "{datatype}", "data": {text}}}]}}').encode()
    return parse_infer_request(body, None, "m", (TensorSpec("v", datatype, (-1,)),), OUTPUTS)


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        # a missing lab value: read as NaN, answered with a NaN risk score and 200
        ("FP32", "[1.5, null]", "element 1 is null; FP32 data must be JSON numbers"),
        ("FP32", '[1.5, "1.5"]', 'element 1 is the string "1.5"; FP32 data must be JSON numbers'),
        ("FP64", "[true, 2.0]", "element 0 is true; FP64 data must be JSON numbers"),
        ("FP32", "[1, {}]", "element 1 is an object"),
        # bool("false") is True: the string read as its opposite
        ("BOOL", '["false", true]', 'element 0 is the string "false"; BOOL data must be JSON '
                                    "true or false"),
        ("BOOL", "[true, 2]", "element 1 is the integer 2; BOOL data must be JSON true or false"),
        ("BOOL", "[0.5, true]", "element 0 is the number 0.5"),
        ("BOOL", "[null, true]", "element 0 is null"),
        # truncated to 1 and 2
        ("INT64", "[1.7, 2.9]", "element 0 is the number 1.7; INT64 data must be JSON integers"),
        ("INT64", "[3, false]", "element 1 is false; INT64 data must be JSON integers"),
        ("INT32", "[1, 2.0]", "element 1 is the number 2.0; INT32 data must be JSON integers"),
        ("INT8", "[127, 128]", "element 1 is the integer 128, outside the range of INT8 "
                               "(-128..127)"),
        ("UINT8", "[0, -1]", "element 1 is the integer -1, outside the range of UINT8 (0..255)"),
        ("UINT64", "[18446744073709551616]", "element 0 is the integer 18446744073709551616, "
                                             "outside the range of UINT64"),
        ("INT64", "[1" + "0" * 30 + "]", "element 0 is an integer of 31 digits, outside the "
                                         "range of INT64"),
        ("INT64", "[1, Infinity]", "element 1 is Infinity; INT64 data must be JSON integers"),
        # finite in the request, infinite once read as FP32: silently inf
        ("FP32", "[1.0, 1e300]", "element 1 is the number 1e+300, beyond the range of FP32 "
                                 "(largest magnitude 3.4028235e+38)"),
        ("FP32", "[-1" + "0" * 39 + "]", "element 0 is an integer of 40 digits, beyond the "
                                         "range of FP32"),
        ("FP16", "[65504, 70000]", "element 1 is the integer 70000, beyond the range of FP16 "
                                   "(largest magnitude 65504)"),
        # beyond a 64-bit float already: json reads it as infinity, as if it were the token
        ("FP64", "[Infinity, 1e400]", "element 1 is the number 1e400, beyond the range of a "
                                      "64-bit float"),
        ("INT64", "[1e400]", "element 0 is the number 1e400, beyond the range of a 64-bit float"),
        # nested data must be a regular array
        ("FP32", "[[1, 2], [3]]", "'data' has nested lists of different lengths"),
        ("FP32", "[[1, 2], 3]", "'data' mixes lists and values at one nesting level"),
    ],
)
def test_json_data_elements_are_checked_against_the_datatype_not_coerced(
    datatype: str, data: str, needle: str
) -> None:
    with pytest.raises(ProtocolError) as err:
        _one_input(datatype, data)
    assert err.value.status == 400
    assert err.value.message.startswith("input 'v' ")
    assert needle in err.value.message


def test_json_data_that_fits_the_datatype_is_read_exactly() -> None:
    assert _one_input("BOOL", [True, False]).inputs["v"].tolist() == [True, False]
    assert _one_input("UINT64", [2**64 - 1]).inputs["v"].tolist() == [2**64 - 1]
    assert _one_input("INT64", [-(2**63), 2**53 + 1]).inputs["v"].tolist() == [-(2**63),
                                                                             2**53 + 1]
    assert _one_input("INT8", [-128, 127]).inputs["v"].dtype == np.int8
    # integers are numbers too; the tokens Python's json and Triton write stay allowed
    fp = _one_input("FP32", "[1, 2.5, -3e38, NaN, Infinity, -Infinity, 1e-50]").inputs["v"]
    assert fp.dtype == np.float32
    np.testing.assert_array_equal(fp[:3], np.array([1, 2.5, -3e38], np.float32))
    assert np.isnan(fp[3]) and fp[4] == np.inf and fp[5] == -np.inf
    assert fp[6] == 0.0  # below FP32's resolution: rounded, as any float conversion does
    assert _one_input("FP16", [65504, 0.5]).inputs["v"].tolist() == [65504.0, 0.5]


def test_protocol_errors_survive_the_trip_from_the_parser_process() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ProtocolError(400, "input 'v' 'data' element 0 is null")))
    assert (err.status, err.message) == (400, "input 'v' 'data' element 0 is null")


def test_binary_size_must_match_the_shape_and_leave_no_trailing_bytes() -> None:
    doc = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32",
                       "parameters": {"binary_data_size": 8}}]}
    body, length = _binary_body(doc, np.zeros(2, "<f4"))
    with pytest.raises(ProtocolError, match="binary_data_size 8 does not match"):
        _parse(body, length)
    doc = {"inputs": [
        {"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}},
        {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]}]}
    body, length = _binary_body(doc, np.zeros(3, "<f4"), np.zeros(5, "u1"))
    with pytest.raises(ProtocolError, match="5 bytes of binary data follow the inputs unclaimed"):
        _parse(body, length)


def _all_binary(rows: int, request_id: str | None = None) -> dict:
    doc: dict = {"inputs": [
        {"name": "x", "shape": [rows, 3], "datatype": "FP32",
         "parameters": {"binary_data_size": 12 * rows}},
        {"name": "mask", "shape": [rows, 3], "datatype": "BOOL",
         "parameters": {"binary_data_size": 3 * rows}},
    ], "outputs": [{"name": "risk", "parameters": {"binary_data": True}}]}
    if request_id is not None:
        doc["id"] = request_id
    return doc


def test_a_remembered_header_reads_each_request_s_own_tensor_values() -> None:
    parsed: dict = {}
    rng = np.random.default_rng(5)
    for _ in range(3):  # the first parses in full, the others reuse the checked header
        x = rng.standard_normal((2, 3)).astype("<f4")
        mask = rng.integers(0, 2, (2, 3)).astype(bool)
        body, length = _binary_body(_all_binary(2, "q7"), x, mask)
        req = parse_infer_request(body, length, "m", INPUTS, OUTPUTS, parsed)
        np.testing.assert_array_equal(req.inputs["x"], x)
        np.testing.assert_array_equal(req.inputs["mask"], mask)
        assert req.id == "q7"
        assert req.outputs == (RequestedOutput("risk", True),)
    assert len(parsed) == 1


def test_a_remembered_header_with_other_binary_bytes_is_checked_in_full() -> None:
    parsed: dict = {}
    x, mask = np.zeros((1, 3), "<f4"), np.zeros((1, 3), bool)
    body, length = _binary_body(_all_binary(1), x, mask)
    parse_infer_request(body, length, "m", INPUTS, OUTPUTS, parsed)
    with pytest.raises(ProtocolError, match="2 bytes of binary data follow the inputs unclaimed"):
        parse_infer_request(body + b"!!", length, "m", INPUTS, OUTPUTS, parsed)
    with pytest.raises(ProtocolError, match="needs 3 bytes of binary data but only 2 remain"):
        parse_infer_request(body[:-1], length, "m", INPUTS, OUTPUTS, parsed)


def test_only_all_binary_headers_are_remembered_and_no_more_than_the_limit() -> None:
    from fedge.serve.protocol import PARSED_HEADERS_KEPT

    parsed: dict = {}
    parse_infer_request(json.dumps(_json_inputs([0] * 6, [True] * 6)).encode(), None, "m",
                        INPUTS, OUTPUTS, parsed)
    assert parsed == {}  # tensor values inside the JSON: nothing to reuse
    x, mask = np.zeros((1, 3), "<f4"), np.zeros((1, 3), bool)
    for i in range(PARSED_HEADERS_KEPT + 5):  # a client giving every request its own id
        body, length = _binary_body(_all_binary(1, f"r{i}"), x, mask)
        assert parse_infer_request(body, length, "m", INPUTS, OUTPUTS, parsed).id == f"r{i}"
        assert 1 <= len(parsed) <= PARSED_HEADERS_KEPT


def test_response_mixes_json_and_binary_outputs_with_the_header_length() -> None:
    req = InferRequest(id="q1", inputs={}, outputs=(RequestedOutput("risk", True),
                                                    RequestedOutput("rank", False)))
    risk = np.array([[0.5], [-1.25]], dtype=np.float32)
    rank = np.array([2, 1], dtype=np.int64)
    body, headers = encode_infer_response("m", "3", req, [risk, rank])
    n = int(headers["inference-header-content-length"])
    assert headers["content-type"] == "application/octet-stream"
    doc = json.loads(body[:n])
    assert doc["id"] == "q1" and doc["model_version"] == "3"
    assert doc["outputs"][0] == {"name": "risk", "datatype": "FP32", "shape": [2, 1],
                                 "parameters": {"binary_data_size": 8}}
    assert doc["outputs"][1] == {"name": "rank", "datatype": "INT64", "shape": [2],
                                 "data": [2, 1]}
    np.testing.assert_array_equal(np.frombuffer(body[n:], "<f4").reshape(2, 1), risk)


def test_all_json_response_is_plain_json() -> None:
    req = InferRequest(id=None, inputs={}, outputs=(RequestedOutput("rank", False),))
    body, headers = encode_infer_response("m", "1", req, [np.array([7], dtype=np.int64)])
    assert headers == {"content-type": "application/json"}
    assert json.loads(body) == {"model_name": "m", "model_version": "1", "outputs": [
        {"name": "rank", "datatype": "INT64", "shape": [1], "data": [7]}]}


def test_non_finite_json_outputs_use_the_tokens_triton_writes() -> None:
    req = InferRequest(None, {}, (RequestedOutput("risk", False),))
    out = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    body, _ = encode_infer_response("m", "1", req, [out])
    assert b'"data":[NaN,Infinity,-Infinity,1.5]' in body
    back = json.loads(body)["outputs"][0]["data"]
    assert np.isnan(back[0]) and back[1:] == [np.inf, -np.inf, 1.5]


def test_nested_data_must_be_nested_as_the_shape_says() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    # feature-major: as many elements, each patient's row scored on other patients' values
    with pytest.raises(ProtocolError) as err:
        _parse(_json_inputs(x.T.tolist(), [True] * 6))
    assert err.value.status == 400
    assert err.value.message == (
        "input 'x' data is nested as [3, 2] but shape is [2, 3] (send the elements flat, "
        "or nested exactly as the shape, row-major)"
    )
    for wrong, nesting in [(x[..., None].tolist(), [2, 3, 1]), (x[None].tolist(), [1, 2, 3]),
                           (x.reshape(3, 2).tolist(), [3, 2])]:
        with pytest.raises(ProtocolError, match=rf"nested as \{nesting}"):
            _parse(_json_inputs(wrong, [True] * 6))
    # flat stays allowed (the protocol's "flattened one-dimensional representation"),
    # and nested exactly as the shape is read row-major
    for data in (x.ravel().tolist(), x.tolist()):
        np.testing.assert_array_equal(_parse(_json_inputs(data, [True] * 6)).inputs["x"], x)


@pytest.mark.parametrize("shape", [[0, 3], [2, 0]])
def test_a_tensor_with_no_elements_is_400_naming_it(shape: list[int]) -> None:
    # the CNN failed in onnxruntime on an empty batch: a 500 and a traceback
    inputs = (TensorSpec("x", "FP32", (-1, -1)),)
    doc = {"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}
    with pytest.raises(ProtocolError) as err:
        parse_infer_request(json.dumps(doc).encode(), None, "m", inputs, OUTPUTS)
    assert err.value.status == 400
    assert err.value.message == (
        f"input 'x' has shape {shape}, which holds no elements; send at least one"
    )
    doc["inputs"][0] = {"name": "x", "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": 0}}
    with pytest.raises(ProtocolError, match="holds no elements"):
        parse_infer_request(json.dumps(doc).encode(), str(len(json.dumps(doc))), "m", inputs,
                            OUTPUTS)


def test_binary_bool_bytes_other_than_0_and_1_are_400_on_either_path() -> None:
    x = np.zeros((2, 3), "<f4")
    good = np.array([[1, 0, 1], [0, 1, 0]], dtype=np.uint8)
    bad = good.copy()
    bad[1, 1] = 2  # numpy reads any byte as a bool: True
    parsed: dict = {}
    body, length = _binary_body(_all_binary(2), x, good)
    req = parse_infer_request(body, length, "m", INPUTS, OUTPUTS, parsed)
    np.testing.assert_array_equal(req.inputs["mask"], good.astype(bool))
    assert len(parsed) == 1  # the header is remembered: the next request takes the fast path
    body, length = _binary_body(_all_binary(2), x, bad)
    for remembered in (parsed, None):  # the remembered header, and a full parse
        with pytest.raises(ProtocolError) as err:
            parse_infer_request(body, length, "m", INPUTS, OUTPUTS, remembered)
        assert err.value.status == 400
        assert err.value.message == (
            "input 'mask' binary data byte 4 is 2; BOOL bytes must be 0 or 1"
        )
