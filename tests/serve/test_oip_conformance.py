"""`fedge serve` against the KServe Open Inference Protocol v2 REST text, where an
earlier version deviated from it: readiness "false" as a 4xx, the `Allow` header
of a 405, an encoded slash that must not pick another route or version, and the
Triton request features this server does not implement, refused rather than
ignored.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.serve.conftest import N_FEATURES, RunningServer, serving


@pytest.fixture(scope="module")
def two_versions(
    tmp_path_factory: pytest.TempPathFactory,
    cox_v1: tuple[Path, torch.nn.Module],
    cox_v2: tuple[Path, torch.nn.Module],
) -> Iterator[RunningServer]:
    """A server with cox versions 1 and 2 loaded; 2 is the live one."""
    root = tmp_path_factory.mktemp("repo")
    with serving(root, cox=cox_v1[0]) as running:
        assert running.repo.install("cox", cox_v2[0]) == 2
        for _ in range(400):  # bounded: 20 s
            r = httpx.get(f"{running.url}/v2/models/cox", timeout=5)
            if r.status_code == 200 and r.json()["versions"] == ["1", "2"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"version 2 not loaded: {running.log()}")
        yield running


def _rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, N_FEATURES)).astype(np.float32)


def _request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], **extra}


def _raw(server: RunningServer, method: str, path: str, body: bytes | None = None,
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with `path` sent byte for byte (no client-side normalisation of
    percent-escapes): status, headers (lower-case names), body."""
    host, port = server.host_port.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        headers = {"content-type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def _error(status: int, headers: dict[str, str], body: bytes) -> str:
    assert headers["content-type"].startswith("application/json"), (status, headers)
    message = json.loads(body)["error"]
    assert isinstance(message, str)
    return message


# -- health: "a 4xx status code indicates false" -------------------------------------


def test_server_not_ready_is_a_4xx_with_the_error_json(tmp_path: Path) -> None:
    # was 503; the v2 health API says 200 is true and a 4xx false (Triton: 400)
    with serving(tmp_path) as empty:
        r = httpx.get(f"{empty.url}/v2/health/ready", timeout=5)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "no model is loaded yet"}
        assert httpx.get(f"{empty.url}/v2/health/live", timeout=5).status_code == 200
        # a model that is not ready: 4xx as well (404: no such model loaded)
        for path in ("/v2/models/cox/ready", "/v2/models/cox/versions/1/ready"):
            r = httpx.get(f"{empty.url}{path}", timeout=5)
            assert r.status_code == 404 and "unknown model 'cox'" in r.json()["error"]
        assert triton.InferenceServerClient(empty.host_port).is_server_ready() is False


# -- 405 names the methods the route takes (RFC 9110 15.5.6: MUST send Allow) --------


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", "/v2/models/cox/infer", {"POST"}),
    ("PUT", "/v2/models/cox/versions/1/infer", {"POST"}),
    ("OPTIONS", "/v2/models/cox/infer", {"POST"}),
    ("GET", "/v2/repository/index", {"POST"}),
    ("POST", "/v2/health/ready", {"GET", "HEAD"}),
    ("DELETE", "/v2/models/cox", {"GET", "HEAD"}),
])
def test_a_405_carries_allow_and_the_error_json(
    two_versions: RunningServer, method: str, path: str, allowed: set[str]
) -> None:
    status, headers, body = _raw(two_versions, method, path,
                                 b"{}" if method in ("POST", "PUT") else None)
    assert status == 405
    assert _error(status, headers, body) == "Method Not Allowed"
    assert {m.strip() for m in headers["allow"].split(",")} == allowed


def test_a_405_carries_allow_from_starlette_alone(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    # the Starlette app mounted without the inference fast path in front
    from fedge.serve.repository import ModelRepository
    from fedge.serve.server import InferenceServer

    ModelRepository(tmp_path).install("cox", cox_v1[0])
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)

    async def calls() -> list[httpx.Response]:
        out = []
        for app in (server, server.app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                out.append(await client.get("/v2/models/cox/infer"))
        return out

    for r in asyncio.run(calls()):
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json() == {"error": "Method Not Allowed"}


# -- an encoded slash cannot pick another route or version ---------------------------


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/models/cox%2Fversions%2F1/infer"),  # was answered by version 1
    ("POST", "/v2/models/cox%2fversions%2f1/infer"),
    ("POST", "/v2/models/cox/versions/1%2Finfer"),
    ("POST", "/v2/models/cox%2Finfer"),
    ("GET", "/v2/models/cox%2Fversions%2F1"),  # was cox's metadata
    ("GET", "/v2/models/cox%2Fversions%2F1/ready"),
    ("GET", "/v2/models/cox/versions/1%2Fconfig"),
    ("HEAD", "/v2/models/cox%2Fready"),
    ("GET", "/v2%2Fhealth%2Fready"),
])
def test_an_encoded_slash_in_a_segment_is_a_404_naming_it(
    two_versions: RunningServer, method: str, path: str
) -> None:
    body = json.dumps(_request(_rows(1))).encode() if method == "POST" else None
    status, headers, text = _raw(two_versions, method, path, body)
    assert status == 404, text
    assert headers["content-type"] == "application/json"
    if method != "HEAD":
        message = _error(status, headers, text)
        assert "encoded slash (%2F)" in message and path.split("?")[0] in message


def test_routes_without_an_encoded_slash_still_answer(two_versions: RunningServer) -> None:
    body = json.dumps(_request(_rows(1))).encode()
    for path, version in [("/v2/models/cox/infer", "2"), ("/v2/models/cox/versions/1/infer", "1"),
                          ("/v2/models/co%78/infer", "2"),  # other escapes decode as before
                          ("/v2/models/cox/infer?next=a%2Fb", "2")]:  # in the query: no matter
        status, _, text = _raw(two_versions, "POST", path, body)
        assert status == 200, (path, text)
        assert json.loads(text)["model_version"] == version, path
    status, _, text = _raw(two_versions, "GET", "/v2/models/cox/versions/1")
    assert status == 200 and json.loads(text)["name"] == "cox"


def test_an_encoded_slash_is_refused_by_starlette_alone_too(
    tmp_path: Path, cox_v1: tuple[Path, torch.nn.Module]
) -> None:
    from fedge.serve.repository import ModelRepository
    from fedge.serve.server import InferenceServer

    ModelRepository(tmp_path).install("cox", cox_v1[0])
    server = InferenceServer(tmp_path)
    server.store.sync(server.repo)
    body = _request(_rows(1))

    async def calls() -> list[httpx.Response]:
        out = []
        for app in (server, server.app):  # the fast path in front, and Starlette alone
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                out.append(await client.post("/v2/models/cox%2Fversions%2F1/infer", json=body))
                out.append(await client.get("/v2/models/cox%2Fversions%2F1"))
        return out

    for r in asyncio.run(calls()):
        assert r.status_code == 404 and "encoded slash" in r.json()["error"], r.text


# -- Triton features fedge serve does not implement: refused, not ignored -------------


def _with(where: str, **params: Any) -> dict[str, Any]:
    """A valid one-row request with `params` added to the request's, the input's or
    the (one requested) output's parameters."""
    request = _request(_rows(1), outputs=[{"name": "output"}])
    target = {"request": request, "input": request["inputs"][0],
              "output": request["outputs"][0]}[where]
    target["parameters"] = params
    return request


@pytest.mark.parametrize(("where", "params", "named"), [
    ("output", {"classification": 1}, "output 'output' parameter 'classification'"),
    ("output", {"binary_data": False, "classification": 3},
     "output 'output' parameter 'classification'"),
    ("request", {"sequence_id": 7, "sequence_start": True, "sequence_end": False},
     "inference request parameter 'sequence_id'"),
    ("request", {"sequence_start": True}, "inference request parameter 'sequence_start'"),
    ("request", {"sequence_end": True}, "inference request parameter 'sequence_end'"),
    ("request", {"priority": 1}, "inference request parameter 'priority'"),
    ("request", {"timeout": 1000}, "inference request parameter 'timeout'"),
    ("input", {"shared_memory_region": "r", "shared_memory_byte_size": 156},
     "input 'input' parameter 'shared_memory_region'"),
    ("input", {"shared_memory_offset": 0}, "input 'input' parameter 'shared_memory_offset'"),
    ("output", {"shared_memory_region": "r", "shared_memory_byte_size": 4},
     "output 'output' parameter 'shared_memory_region'"),
])
def test_an_unsupported_triton_parameter_is_a_400_naming_it(
    two_versions: RunningServer, where: str, params: dict[str, Any], named: str
) -> None:
    r = httpx.post(f"{two_versions.url}/v2/models/cox/infer", json=_with(where, **params),
                   timeout=5)
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert named in message and "is not supported by fedge serve" in message, message


@pytest.mark.parametrize("where", ["request", "input", "output"])
@pytest.mark.parametrize(("value", "shown"), [({"nested": 1}, "an object"), ([1, 2], "a list"),
                                              (None, "null")])
def test_a_parameter_value_that_is_not_a_string_number_or_boolean_is_a_400(
    two_versions: RunningServer, where: str, value: Any, shown: str
) -> None:
    r = httpx.post(f"{two_versions.url}/v2/models/cox/infer", json=_with(where, x=value),
                   timeout=5)
    assert r.status_code == 400, r.text
    message = r.json()["error"]
    assert f"parameter 'x' is {shown}" in message, message
    assert "not support" in message and "string, number or boolean" in message


def test_supported_and_custom_parameters_still_work(
    two_versions: RunningServer, cox_v2: tuple[Path, torch.nn.Module]
) -> None:
    x = _rows(3)
    with torch.no_grad():
        want = cox_v2[1](torch.from_numpy(x)).numpy()
    client = triton.InferenceServerClient(two_versions.host_port)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # binary_data_size
    # what tritonclient sends by default (binary_data_output), per-output binary_data,
    # and a parameter of the client's own: served
    for outputs in (None, [triton.InferRequestedOutput("output", binary_data=True)],
                    [triton.InferRequestedOutput("output", binary_data=False)]):
        result = client.infer("cox", [inp], outputs=outputs, request_id="r-1",
                              parameters={"site_note": "ward 4", "retry": 0, "urgent": False})
        np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-5)
        assert result.get_response()["id"] == "r-1"
    # the same features asked through tritonclient: refused, not served as if absent
    refused = [
        dict(outputs=[triton.InferRequestedOutput("output", class_count=1)]),
        dict(sequence_id=5, sequence_start=True),
        dict(priority=2),
        dict(timeout=1000),
    ]
    for extra in refused:
        with pytest.raises(InferenceServerException, match="not supported by fedge serve"):
            client.infer("cox", [inp], **extra)  # type: ignore[arg-type]
    # and after a refusal, the same binary request (its header remembered) still works
    np.testing.assert_allclose(client.infer("cox", [inp]).as_numpy("output"), want, atol=1e-5)
