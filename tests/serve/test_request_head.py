"""A request's head (request line and headers): bounded in size, and answered with
the protocol's error JSON when it is not valid HTTP.

httptools and uvicorn append to a header value or URL for as long as it lasts,
each append copying all of it so far: one client sending an endless header held
the event loop, health checks and the watchdog's pings included, for seconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import RunningServer, serving

FLOOD_S = 2.0


async def _health_latencies(port: int, until: float) -> list[float]:
    """GET /v2/health/ready on one keep-alive connection every 50 ms until `until`
    (loop time); the latency of each."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies = []
    try:
        while loop.time() < until:
            start = loop.time()
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            latencies.append(loop.time() - start)
            await asyncio.sleep(0.05)
    finally:
        writer.close()
    return latencies


async def _flood(port: int, opening: bytes, until: float) -> tuple[bytes, bool]:
    """Send `opening`, then 64 KiB chunks of "a" until `until` (loop time) or the
    server stops taking them, reading meanwhile; returns what the server sent, and
    whether it closed the connection (end of file, or a reset) by 5 s after that."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    received = bytearray()

    async def send() -> None:
        await loop.sock_sendall(sock, opening)
        chunk = b"a" * 65536
        sent = 0
        # past `until` too, until the head is over any limit: an attempt begun just
        # before `until` must still be one the server refuses
        while loop.time() < until or sent <= 2 * len(chunk):
            try:
                sent += sock.send(chunk)
            except BlockingIOError:  # the server stopped reading
                await asyncio.sleep(0.01)
            except OSError:  # closed by the server
                return
            await asyncio.sleep(0)  # the health checks' turn on this loop too

    async def read() -> bool:
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return True
            if not data:
                return True
            received.extend(data)

    sender = asyncio.create_task(send())
    try:
        closed = await asyncio.wait_for(read(), until + 5 - loop.time())
    except TimeoutError:
        closed = False
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        sock.close()
    return bytes(received), closed


@pytest.mark.parametrize(
    ("opening", "status", "message"),
    [
        (b"GET /v2 HTTP/1.1\r\nHost: t\r\nX-Flood: ", 431, "request headers exceed 65536 bytes"),
        (b"GET /v2/", 414,
         "request URL too long: the request line and headers exceed 65536 bytes"),
    ],
    ids=["header", "url"],
)
def test_an_endless_header_or_url_is_refused_and_health_checks_stay_fast(
    server: RunningServer, opening: bytes, status: int, message: str
) -> None:
    port = int(server.host_port.rsplit(":", 1)[1])

    async def flood_again(until: float) -> list[tuple[bytes, bool]]:
        """A flooder that connects again each time it is refused, until `until`."""
        loop = asyncio.get_running_loop()
        attempts = [await _flood(port, opening, until)]
        while loop.time() < until and attempts[-1][1]:
            attempts.append(await _flood(port, opening, until))
        return attempts

    async def scenario() -> tuple[list[float], list[tuple[bytes, bool]]]:
        until = asyncio.get_running_loop().time() + FLOOD_S
        return await asyncio.gather(_health_latencies(port, until), flood_again(until))

    latencies, attempts = asyncio.run(scenario())
    for received, closed in attempts:
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), received[:200]
        assert b"\r\nconnection: close" in head and b"content-type: application/json" in head
        assert json.loads(body) == {"error": message}
        assert closed, "the flooding connection stayed open"
    assert len(latencies) >= 10
    assert max(latencies) < 0.5, latencies
    # a header just under the limit is fine
    r = httpx.get(f"{server.url}/v2/health/ready", headers={"X-Big": "b" * 60_000}, timeout=5)
    assert r.status_code == 200


def _exchange(server: RunningServer, data: bytes) -> bytes:
    """Send `data` in one write; everything the server sends until it closes."""
    host, port = server.host_port.split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _responses(raw: bytes) -> list[tuple[int, bytes, bytes]]:
    """(status, head, body) of each response in `raw` (each with a Content-Length)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        out.append((int(head.split()[1]), head, rest[:length]))
        raw = rest[length:]
    return out


INFER = (b'{"inputs": [{"name": "input", "shape": [1, 39], "datatype": "FP32", "data": ['
         + b", ".join([b"0.5"] * 39) + b"]}]}")


def _post(body: bytes) -> bytes:
    return (b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize(
    ("data", "statuses", "error"),
    [
        (b"GARBAGE\r\n\r\n", [400], "malformed HTTP request: Invalid method encountered"),
        (b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
         [400], "malformed HTTP request: Invalid character in Content-Length"),
        # pipelined after valid requests: their answers first, in order (the direct
        # lane's, then an ASGI one), then the error; a Content-Length shorter than the
        # body leaves the rest to be read as the next request
        (_post(INFER) + b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\nGARBAGE\r\n\r\n",
         [200, 200, 400], "malformed HTTP request: Invalid method encountered"),
        (_post(INFER) + b"}}\r\n\r\n", [200, 400],
         "malformed HTTP request: Invalid method encountered"),
        # at fault in its body (ASGI, chunked): answered at once
        (b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"5\r\n{\"inp\r\nzz\r\n", [400],
         "malformed HTTP request: Invalid character in chunk size"),
    ],
    ids=["request-line", "content-length", "after-both-lanes", "body-overrun", "chunk-size"],
)
def test_a_request_that_is_not_http_gets_the_error_json_after_the_earlier_answers(
    server: RunningServer, data: bytes, statuses: list[int], error: str
) -> None:
    responses = _responses(_exchange(server, data))
    assert [status for status, _, _ in responses] == statuses
    _, head, body = responses[-1]
    assert b"content-type: application/json" in head and b"connection: close" in head
    assert json.loads(body) == {"error": error}
    for _, _, answer in responses[:-1]:  # an inference's outputs, or {"ready": true}
        assert "outputs" in json.loads(answer) or json.loads(answer) == {"ready": True}


def test_a_large_body_in_one_write_is_not_taken_for_headers(server: RunningServer) -> None:
    # the head is counted until its end only: a 900 KB body read with it is no flood
    body = (b'{"inputs": [{"name": "input", "shape": [1, 39], "datatype": "FP32", "data": ['
            + b", ".join([b"0.5"] * 39) + b"]}]" + b" " * 900_000 + b"}")
    request = _post(body).replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    start = time.monotonic()
    responses = _responses(_exchange(server, request))
    assert [status for status, _, _ in responses] == [200]
    assert time.monotonic() - start < 5


def test_the_head_limit_is_set_from_the_command_line(tmp_path: Path) -> None:
    """`fedge serve --max-header-bytes N`: a head over N gets 431; one under it is served."""
    with serving(tmp_path, "--max-header-bytes", "2048") as s:
        ok = httpx.get(f"{s.url}/v2/health/live", headers={"x-pad": "a" * 1000}, timeout=10)
        assert ok.status_code == 200, ok.text
        big = httpx.get(f"{s.url}/v2/health/live", headers={"x-pad": "a" * 4000}, timeout=10)
        assert big.status_code == 431, big.text
        assert big.json() == {"error": "request headers exceed 2048 bytes"}


READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n"
BIG_HEAD = b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"a" * 4000 + b"\r\n\r\n"
BAD_CHUNK = (b"POST /v2/models/cox/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
             b"\r\n5\r\n{\"inp\r\nzz\r\n")


def _exchange_in_writes(server: RunningServer, writes: list[bytes]) -> bytes:
    """Send each of `writes` 0.2 s apart on one connection (each its own read on the
    server); everything the server sends until it closes."""
    host, port = server.host_port.split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for data in writes:
            sock.sendall(data)
            time.sleep(0.2)
        while chunk := sock.recv(65536):
            received += chunk
    return received


def _errors_logged(server: RunningServer, since: int) -> list[str]:
    time.sleep(0.3)  # a request task still running after the refusal logs by then
    return [line for line in server.output[since:] if "ERROR" in line or "Traceback" in line]


@pytest.fixture(scope="module")
def small_head_server(
    tmp_path_factory: pytest.TempPathFactory, cox_v1: tuple[Path, object]
) -> Iterator[RunningServer]:

    with serving(tmp_path_factory.mktemp("repo"), "--max-header-bytes", "2048",
                 cox=cox_v1[0]) as s:
        yield s


@pytest.mark.parametrize(
    "writes",
    [
        [READY, BIG_HEAD],
        [READY + BIG_HEAD],
        [READY, BIG_HEAD[:1000], BIG_HEAD[1000:]],
        [_post(INFER), BIG_HEAD],
        [_post(INFER) + BIG_HEAD],
    ],
    ids=["after-asgi", "pipelined-after-asgi", "after-asgi-in-two-reads", "after-direct",
         "pipelined-after-direct"],
)
def test_a_head_over_the_limit_is_refused_after_the_earlier_answers(
    small_head_server: RunningServer, writes: list[bytes]
) -> None:
    since = len(small_head_server.output)
    responses = _responses(_exchange_in_writes(small_head_server, writes))
    assert [status for status, _, _ in responses] == [200, 431]
    assert json.loads(responses[-1][2]) == {"error": "request headers exceed 2048 bytes"}
    assert _errors_logged(small_head_server, since) == []


@pytest.mark.parametrize(
    "writes",
    [
        [READY + BAD_CHUNK],
        [_post(INFER) + BAD_CHUNK],
        [READY, BAD_CHUNK],
    ],
    ids=["pipelined-after-asgi", "pipelined-after-direct", "after-asgi"],
)
def test_a_body_at_fault_is_refused_after_the_earlier_answers(
    server: RunningServer, writes: list[bytes]
) -> None:
    since = len(server.output)
    responses = _responses(_exchange_in_writes(server, writes))
    assert [status for status, _, _ in responses] == [200, 400]
    assert json.loads(responses[-1][2]) == {
        "error": "malformed HTTP request: Invalid character in chunk size"}
    assert _errors_logged(server, since) == []


@pytest.mark.parametrize("path", [b"/v2/health/ready", b"/nope", b"/v2/models/unknown/infer",
                                  b"/v2/models/cox/infer"])
def test_a_body_at_fault_to_a_route_that_does_not_read_it_logs_nothing(
    server: RunningServer, path: bytes
) -> None:
    # the route's own answer, written after the 400 and the end of the stream, is dropped
    since = len(server.output)
    responses = _responses(_exchange(server, BAD_CHUNK.replace(b"/v2/models/cox/infer", path)))
    assert [status for status, _, _ in responses] == [400]
    assert _errors_logged(server, since) == []


BAD_URL = b"GET http://a:99999/ HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(
    ("writes", "statuses", "error"),
    [
        ([BAD_URL], [400], "invalid URL"),
        ([READY, BAD_URL], [200, 400], "invalid URL"),
        ([_post(INFER) + BAD_URL], [200, 400], "invalid URL"),
    ],
    ids=["alone", "after-asgi", "pipelined-after-direct"],
)
def test_a_url_that_does_not_parse_is_a_client_fault_named_as_such(
    server: RunningServer, writes: list[bytes], statuses: list[int], error: str
) -> None:
    # raised in uvicorn's on_headers_complete, a parser callback, as a bug would be
    since = len(server.output)
    responses = _responses(_exchange_in_writes(server, writes))
    assert [status for status, _, _ in responses] == statuses
    assert json.loads(responses[-1][2]) == {"error": f"malformed HTTP request: {error}"}
    assert _errors_logged(server, since) == []


SHORT_HEADERS = (b"GET /v2/health/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                 + b"".join(b"X-H%03d: v\r\n" % i for i in range(200)) + b"\r\n")


@pytest.mark.parametrize("cut", [None, 2100], ids=["one-read", "two-reads"])
def test_a_head_is_measured_alike_however_it_arrives(
    small_head_server: RunningServer, cut: int | None
) -> None:
    # 2,261 bytes on the wire, of which 1,415 are header names and values
    writes = [SHORT_HEADERS] if cut is None else [SHORT_HEADERS[:cut], SHORT_HEADERS[cut:]]
    responses = _responses(_exchange_in_writes(small_head_server, writes))
    assert [status for status, _, _ in responses] == [431]
