"""The inference server: Open Inference Protocol (KServe v2) REST on uvicorn.

Request path. Everything but inference is a plain Starlette route (health,
metadata, config, /metrics, error pages). `POST …/infer` is answered by a
small ASGI handler in front of Starlette: it reads the body with a size cap,
hands it to the sans-I/O `protocol` module, runs the live session and sends
the bytes back, with no Request/Response objects, middleware or thread hop in
between. For the Cox model a request costs a few tens of microseconds of
onnxruntime, so inference runs inline on the event loop; a request whose
inputs exceed `offload_bytes` (a CNN batch) runs in a worker thread so the
loop keeps answering health checks meanwhile (onnxruntime releases the GIL).

Errors: every client mistake is a 4xx with the protocol's `{"error": "..."}`
body (400 malformed/invalid, 404 unknown model/version/route, 405 wrong
method, 413 oversized body); the server never answers 500 for a client's input.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedge import __version__
from fedge.serve.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    encode_infer_response,
    error_body,
    parse_infer_request,
)
from fedge.serve.repository import ModelRepository
from fedge.serve.runtime import LoadedModel, ModelStore, UnknownModel, Watcher
from fedge.systemd import Notifier, watchdog_interval

log = logging.getLogger("fedge.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_OFFLOAD_BYTES = 256 * 1024
# POST /v2/repository/index is served too, but not the rest of Triton's
# model_repository extension (load/unload), so it is not advertised.
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class Metrics:
    """Prometheus metrics in a registry of their own (one per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedge_serve_infer_requests", "Inference requests by model and HTTP status",
            ["model", "code"], registry=self.registry,
        )
        self.latency = Histogram(
            "fedge_serve_infer_duration_seconds",
            "Inference request handling time (body read to response sent)",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.live_version = Gauge(
            "fedge_serve_model_live_version", "Version being served", ["model"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "fedge_serve_model_swaps", "Versions swapped in", ["model"], registry=self.registry,
        )
        self.load_failures = Counter(
            "fedge_serve_model_load_failures", "Versions that failed to load or check",
            ["model"], registry=self.registry,
        )
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, model: str, code: int, seconds: float) -> None:
        pair = self._children.get((model, code))
        if pair is None:
            pair = (self.requests.labels(model, str(code)), self.latency.labels(model))
            self._children[(model, code)] = pair
        pair[0].inc()
        pair[1].observe(seconds)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class _ClientGone(Exception):
    pass


class InferenceServer:
    """The ASGI application: `InferenceServer(root)` is what uvicorn runs."""

    def __init__(
        self,
        repository: str | Path,
        *,
        poll_interval: float = 0.5,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        threads: int | None = None,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
    ):
        """Raises: ValueError for a non-positive poll interval or body limit."""
        if not max_body_bytes > 0:
            raise ValueError(f"max_body_bytes {max_body_bytes!r} must be > 0")
        self.repo = ModelRepository(repository)
        self.store = ModelStore(threads=threads)
        self.metrics = Metrics()
        self.max_body_bytes = max_body_bytes
        self.offload_bytes = offload_bytes
        self.watcher = Watcher(self.store, self.repo, poll_interval)
        # Large requests run one at a time on a worker thread: each already uses
        # every core through onnxruntime's intra-op pool, so running several at
        # once would only oversubscribe the CPUs.
        self._heavy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedge-infer")
        self.store.on_swap = self._swapped
        self.store.on_load_failure = lambda name, _v, _why: self.metrics.load_failures.labels(
            name
        ).inc()
        routes = [
            Route("/v2", self._server_metadata),
            Route("/v2/health/live", self._live),
            Route("/v2/health/ready", self._ready),
            Route("/v2/models/{name}", self._model_metadata),
            Route("/v2/models/{name}/versions/{version}", self._model_metadata),
            Route("/v2/models/{name}/ready", self._model_ready),
            Route("/v2/models/{name}/versions/{version}/ready", self._model_ready),
            Route("/v2/models/{name}/config", self._model_config),
            Route("/v2/models/{name}/versions/{version}/config", self._model_config),
            Route("/v2/models/{name}/infer", self._infer_route, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", self._infer_route,
                  methods=["POST"]),
            Route("/v2/repository/index", self._repository_index, methods=["POST"]),
            Route("/metrics", self._metrics),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error},
            lifespan=self._lifespan,
        )

    # -- lifecycle ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        self.store.sync(self.repo)
        # Everything loaded so far lives as long as the server: keep it out of the
        # cyclic collector's generations, and collect young objects less often, so
        # that a request rarely pays for a full collection (the p99 tail).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        self.watcher.start()
        notifier = Notifier()
        notifier.ready(f"serving {len(self.store.names())} model(s) from {self.repo.root}")
        # The watchdog is fed from the event loop, so a wedged loop (the thing
        # that answers requests) is what systemd notices.
        interval = watchdog_interval()
        pinger = asyncio.create_task(self._feed_watchdog(notifier, interval)) if interval else None
        try:
            yield
        finally:
            notifier.stopping("shutting down")
            if pinger is not None:
                pinger.cancel()
            self.watcher.stop()
            self._heavy.shutdown(wait=True)

    @staticmethod
    async def _feed_watchdog(notifier: Notifier, interval: float) -> None:
        while True:
            notifier.watchdog()
            await asyncio.sleep(interval / 2)

    def _swapped(self, name: str, version: int) -> None:
        self.metrics.swaps.labels(name).inc()
        self.metrics.live_version.labels(name).set(version)

    # -- ASGI entry: the inference fast path, Starlette for the rest --------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER.fullmatch(scope["path"])
            if match:
                await self._infer_asgi(match.group(1), match.group(2), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _infer_asgi(
        self, name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        # unknown names share one label: a client cannot grow the metric families
        label = name if self.store.has(name) else "_unknown"
        try:
            body = await self._read_body(scope, receive)
            status, payload, headers = await self.infer(name, version, body, scope)
        except _ClientGone:
            return
        except ProtocolError as exc:
            status, payload, headers = exc.status, exc.body(), {"content-type": "application/json"}
        raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
        raw_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})
        self.metrics.observe(label, status, time.perf_counter() - start)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise ProtocolError(400, f"Content-Length {declared!r} is not an integer") \
                    from None
            if n > limit:
                raise ProtocolError(
                    413, f"request body of {n} bytes exceeds the limit of {limit} bytes"
                )
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise ProtocolError(
                    413, f"request body exceeds the limit of {limit} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = _header(scope, b"content-encoding")
        if encoding and encoding != "identity":
            body = self._decompress(body, encoding)
        return body

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            raise ProtocolError(400, f"Content-Encoding {encoding!r} is not supported "
                                     "(gzip, deflate or identity)")
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, self.max_body_bytes + 1)
        except zlib.error as exc:
            raise ProtocolError(400, f"body is not valid {encoding} data: {exc}") from None
        if len(out) > self.max_body_bytes or inflater.unconsumed_tail:
            raise ProtocolError(
                413, f"decompressed body exceeds the limit of {self.max_body_bytes} bytes"
            )
        return out

    async def infer(
        self, name: str, version: str | None, body: bytes, scope: Scope
    ) -> tuple[int, bytes, dict[str, str]]:
        """Run one inference request; returns (status, body, headers).

        Raises:
            ProtocolError: 400 for an invalid request, 404 for an unknown model/version,
                500 when a valid request makes the model fail.
        """
        model = self._model(name, version)
        request = parse_infer_request(
            body, _header(scope, HEADER_LENGTH.encode()), name, model.inputs, model.outputs
        )
        names = [o.name for o in request.outputs]
        size = sum(a.nbytes for a in request.inputs.values())
        try:
            if size > self.offload_bytes:
                loop = asyncio.get_running_loop()
                results = await loop.run_in_executor(
                    self._heavy, model.run, request.inputs, names
                )
            else:
                results = model.run(request.inputs, names)
        except InvalidArgument as exc:
            raise ProtocolError(400, f"model '{name}' rejected the input: {exc}") from None
        except Exception as exc:  # the model failed on a valid request: our fault, say so
            log.exception("inference failed for %s version %d", name, model.version)
            raise ProtocolError(
                500, f"inference failed in model '{name}' version {model.version}: {exc}"
            ) from None
        payload, headers = encode_infer_response(name, str(model.version), request, results)
        return 200, payload, headers

    def _model(self, name: str, version: str | None) -> LoadedModel:
        try:
            return self.store.get(name, version)
        except UnknownModel as exc:
            raise ProtocolError(404, exc.message) from None

    # -- Starlette routes --------------------------------------------------

    @staticmethod
    def _error(status: int, message: str) -> Response:
        return Response(error_body(message), status_code=status, media_type="application/json")

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self._error(exc.status_code, str(exc.detail))

    async def _server_metadata(self, _request: Request) -> Response:
        return JSONResponse({"name": "fedge", "version": __version__, "extensions": EXTENSIONS})

    async def _live(self, _request: Request) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, _request: Request) -> Response:
        if self.store.names():
            return JSONResponse({"ready": True})
        return self._error(503, "no model is loaded yet")

    def _lookup(self, request: Request) -> LoadedModel | Response:
        try:
            return self.store.get(
                request.path_params["name"], request.path_params.get("version")
            )
        except UnknownModel as exc:
            return self._error(404, exc.message)

    async def _model_metadata(self, request: Request) -> Response:
        model = self._lookup(request)
        if isinstance(model, Response):
            return model
        return JSONResponse({
            "name": model.name,
            "versions": [str(v) for v in self.store.versions(model.name)],
            "platform": "onnxruntime_onnx",
            "inputs": [s.to_json() for s in model.inputs],
            "outputs": [s.to_json() for s in model.outputs],
        })

    async def _model_ready(self, request: Request) -> Response:
        model = self._lookup(request)
        if isinstance(model, Response):
            return model
        return JSONResponse({"name": model.name, "version": str(model.version), "ready": True})

    async def _model_config(self, request: Request) -> Response:
        model = self._lookup(request)
        if isinstance(model, Response):
            return model

        def tensor(s: Any) -> dict[str, Any]:
            return {"name": s.name, "data_type": f"TYPE_{s.datatype}", "dims": list(s.shape)}

        return JSONResponse({
            "name": model.name,
            "version": str(model.version),
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": 0,
            "input": [tensor(s) for s in model.inputs],
            "output": [tensor(s) for s in model.outputs],
            "parameters": {k: {"string_value": v} for k, v in sorted(model.metadata.items())},
        })

    async def _repository_index(self, _request: Request) -> Response:
        """Triton's repository index: every version on disk and whether it is served."""
        entries = []
        for name in self.repo.models():
            loaded = set(self.store.versions(name))
            for version in self.repo.versions(name):
                entry = {"name": name, "version": str(version)}
                if version in loaded:
                    entry["state"] = "READY"
                else:
                    entry["state"] = "UNAVAILABLE"
                    entry["reason"] = self.store.failures.get(
                        (name, version), "not loaded: only the newest versions stay in memory"
                    )
                entries.append(entry)
        return JSONResponse(entries)

    async def _infer_route(self, request: Request) -> Response:
        # Reached only when the app is mounted without the fast path in front.
        body = await request.body()
        try:
            status, payload, headers = await self.infer(
                request.path_params["name"], request.path_params.get("version"), body,
                request.scope,
            )
        except ProtocolError as exc:
            return self._error(exc.status, exc.message)
        return Response(payload, status_code=status, headers=headers)

    async def _metrics(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _CoalescingTransport:
    """A transport proxy that sends everything written in one event-loop step at once.

    uvicorn writes a response's status line and headers, then its body, as two
    `transport.write` calls: two syscalls, two TCP segments, two wake-ups of the
    client. Buffering until the end of the current loop step (`call_soon`) joins
    them into one write without delaying anything: the flush runs before the
    loop polls for I/O again. On this 2-core host that cut the server's CPU per
    Cox request by about 40% (bench/serve.py, `server CPU us/req`).
    """

    def __init__(self, transport: Any):
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _loop_and_http() -> tuple[str, Any]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - depends on the install
        loop = "asyncio"
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools missing: uvicorn's pure-Python h11
        return loop, "h11"

    class OneWriteHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses: duck-typed
            super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]

    return loop, OneWriteHttpToolsProtocol


def serve(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll_interval: float = 0.5,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    threads: int | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """Bind `host:port` (0: any free port), announce the URL, serve until SIGINT/SIGTERM.

    Raises:
        OSError: the address cannot be bound.
        ValueError: invalid settings (see InferenceServer), or a repository path
            that exists but is not a directory.
        RuntimeError: the application failed to start (e.g. an unreadable repository).
    """
    import socket

    import uvicorn

    root = Path(repository)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--repository {root} exists but is not a directory")
    if not root.exists():
        log.warning("repository %s does not exist yet; serving nothing until a model "
                    "is installed there", root)
    server_app = InferenceServer(
        repository, poll_interval=poll_interval, max_body_bytes=max_body_bytes, threads=threads
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    loop, http = _loop_and_http()
    config = uvicorn.Config(
        server_app, loop=loop, http=http, lifespan="on", access_log=False,
        log_level="warning", backlog=1024, timeout_keep_alive=30,
    )
    shown = f"[{host}]" if ":" in host else host
    announce(f"fedge serve listening on http://{shown}:{bound} (repository {repository})")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    if not server.started:
        raise RuntimeError("start-up failed (the reason is logged above)")
