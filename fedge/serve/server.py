"""The inference server: Open Inference Protocol (KServe v2) REST on uvicorn.

Request path. Everything but inference is a plain Starlette route (health,
metadata, config, /metrics, error pages). `POST …/infer` has two lanes:

- direct: the HTTP protocol object itself (uvicorn's httptools protocol,
  subclassed below) answers an inference request whose estimated cost fits
  the inline budget, as soon as its last body byte is parsed: sans-I/O
  `protocol` parsing, the live session, one write of status line, headers and
  body. No ASGI scope, task, event or header re-validation: on the Cox model
  those were most of the server's CPU per request, and on a 2-core host the
  server's CPU per request is its latency under load;
- ASGI: every other inference request (chunked or compressed bodies,
  `Expect: 100-continue`, unknown models, a client that does not read its
  responses, costly requests) goes through a small ASGI handler in front of
  Starlette that reads the body with a size cap; a request whose estimated
  cost exceeds the inline budget runs on a worker thread (onnxruntime releases
  the GIL) so that the loop keeps answering health checks meanwhile.

The estimate is the model's single-row time measured at load
(`LoadedModel.row_seconds`) times the rows in the request (from the body size
before parsing, exactly after); the budget is `inline_budget_s`.

Direct-lane requests for one model that are read in the same step of the event
loop (several connections ready at once: the usual case under load) run as one
onnxruntime batch at the end of that step, if the model's rows were found
independent at load (`LoadedModel.batchable`). Nothing waits for a batch to
fill; it only shares the fixed cost of a run, which for the Cox model is most
of the inference.

A JSON body larger than `PARSE_APART_BYTES` is parsed, and a JSON response of
more than `ENCODE_APART_ELEMENTS` numbers written, in a helper process (the
JSON process): `json.loads`, the arrays built from its lists and `json.dumps`
hold the GIL from start to end (0.7 s to parse 58 MiB here), so on a worker
thread they would stall the event loop, health checks included, just the same.

Connections (`_Connections`): a connection waiting on its client has a deadline
(`idle_timeout_s` to begin a request, `request_timeout_s` from its first byte to
its last, and `request_timeout_s` to read any more once it has stopped reading its
responses and the server's send buffer is full), and at most `max_connections`
are open; one more evicts the connection that has waited longest on its client.
Half-sent requests and unread responses therefore neither pile up nor use up the
file descriptors that the health checks and the repository watcher need.

Errors: every client mistake is a 4xx with the protocol's `{"error": "..."}`
body (400 malformed/invalid, HTTP that httptools cannot parse included, 404
unknown model/version/route, 405 wrong method, 408 request not in within its
deadline, 413 oversized body, 414/431 a request line or headers over
`max_header_bytes`); the server never answers 500 for a client's input. A
request that cannot be parsed (400, 414, 431) closes its connection, after the
responses to the requests pipelined before it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import gc
import itertools
import logging
import math
import multiprocessing
import os
import re
import tempfile
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedge import __version__
from fedge.serve.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    encode_infer_response,
    error_body,
    json_process_init,
    parse_infer_request,
    parse_infer_request_file,
)
from fedge.serve.repository import ModelRepository
from fedge.serve.runtime import (
    DEFAULT_LOAD_TIMEOUT_S,
    LoadedModel,
    ModelStore,
    RunDeadlines,
    UnknownModel,
    Watcher,
)
from fedge.systemd import Notifier, watchdog_interval

log = logging.getLogger("fedge.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY = 64 * 1024 * 1024
# Request bodies held at once, all connections together (see _BodyBudget): without
# it, 1000 connections could each hold a 64 MiB body (64 GB).
DEFAULT_MAX_BUFFERED_BODY = 256 * 1024 * 1024
BUSY_RETRY_AFTER_S = 1  # Retry-After of a 503 for a body that does not fit now
# A request's line and headers together. httptools and uvicorn keep appending to
# a header value or URL that does not end, each append copying all of it so far:
# one client sending an endless header held the event loop for seconds at a time.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
# A request estimated to cost more than this runs on a worker thread, not on the
# event loop (which would stall every other client meanwhile).
DEFAULT_INLINE_BUDGET_S = 0.002
DIRECT_MAX_BYTES = 1024 * 1024  # larger bodies take the ASGI lane (streamed, capped)
# One inference run, on the worker thread, is stopped past this (504): some valid
# models run for days on some inputs (a Loop whose trip count comes from the input).
DEFAULT_INFER_TIMEOUT_S = 60.0
# A run on the event loop (estimated under the inline budget) that is still going
# after this is stopped and run again on the worker thread: the loop, and with it
# every other client, the health checks and the watchdog pings, waits no longer.
INLINE_RUN_DEADLINE_S = 1.0
# JSON (the whole body, or the part before the binary tensors) larger than this is
# parsed in the JSON process; about 12 ms of the event loop's time per MiB here.
PARSE_APART_BYTES = DIRECT_MAX_BYTES
# JSON outputs of more elements than this are written there too (about 0.5 to 1.5
# microseconds per float here).
ENCODE_APART_ELEMENTS = 32768
DEFAULT_MAX_CONNECTIONS = 1000
BACKLOG = 1024  # connections the kernel accepts for the server before it takes them
DEFAULT_IDLE_TIMEOUT_S = 30.0  # to begin a request (a fresh or a keep-alive connection)
# From a request's first byte to its last: a 64 MiB body needs about 9 Mbit/s.
DEFAULT_REQUEST_TIMEOUT_S = 60.0
# Descriptors kept free of client connections: the listening socket, logs, the
# JSON process's pipes, model files being loaded, the watcher's directory scans.
FD_RESERVE = 64
_NEVER = math.inf
MAX_POLL_INTERVAL_S = 3600.0  # fedge.serve.cli's bound on --poll-interval
_T = TypeVar("_T")
# POST /v2/repository/index is served too, but not the rest of Triton's
# model_repository extension (load/unload), so it is not advertised.
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
_INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
# A version as the repository names its directories: "01" is not another name
# for version 1 (nor is "١" or "²"); 20 digits bound int()'s work.
_VERSION_TEXT = re.compile(r"[1-9][0-9]{0,19}")
MODEL_FAILURE_LOG_INTERVAL_S = 60.0
# how often STATUS= is checked against the repository (sent only when it changed)
STATUS_REFRESH_S = 1.0
# How long a connection refused for a malformed or oversized request head stays
# open after its response, so that the client can read it (see _send_refusal),
# and how much it reads and discards meanwhile before it stops reading.
LINGER_S = 2.0
LINGER_BYTES = 256 * 1024
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)


class _InferStats:
    """Inference counts and latencies as plain numbers, turned into Prometheus
    families only when /metrics is scraped.

    prometheus_client's `Counter.inc` and `Histogram.observe` take a lock and walk
    the buckets on every request; here a request costs a bisect and two
    increments. Only the event-loop thread writes these numbers and /metrics
    reads them on that same thread, so no lock is needed.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        # model -> [count per bucket (the last is +Inf)..., sum of seconds]
        self.latency: dict[str, list[float]] = {}

    def observe(self, model: str, code: int, seconds: float) -> None:
        key = (model, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        row = self.latency.get(model)
        if row is None:
            row = self.latency[model] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        row[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        row[-1] += seconds

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily(
            "fedge_serve_infer_requests", "Inference requests by model and HTTP status",
            labels=["model", "code"],
        )
        for (model, code), n in sorted(self.counts.items()):
            requests.add_metric([model, str(code)], n)
        yield requests
        latency = HistogramMetricFamily(
            "fedge_serve_infer_duration_seconds",
            "Inference request handling time (body read to response sent)",
            labels=["model"],
        )
        bounds = [repr(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        for model, row in sorted(self.latency.items()):
            cumulative = list(itertools.accumulate(row[:-1]))
            latency.add_metric([model], list(zip(bounds, cumulative, strict=True)), row[-1])
        yield latency


class Metrics:
    """Prometheus metrics in a registry of their own (one per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.infer = _InferStats()
        self.registry.register(self.infer)  # type: ignore[arg-type]
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
        self.batches = Histogram(
            "fedge_serve_infer_batch_requests",
            "Requests answered by one onnxruntime run (only runs of 2 or more are counted)",
            buckets=(2, 4, 8, 16, 32, 64), registry=self.registry,
        )
        self.observe = self.infer.observe
        self.buffered_body_bytes = Gauge(
            "fedge_serve_buffered_body_bytes",
            "Request-body bytes held now, all connections together (at most "
            "--max-buffered-body-bytes)", registry=self.registry,
        )
        self.open_connections = Gauge(
            "fedge_serve_open_connections", "Client connections open now",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "fedge_serve_connections_closed",
            "Client connections the server closed on its own: idle_timeout, request_timeout "
            "(408), write_timeout (stopped reading its responses), evicted (at the connection "
            "limit, the one waiting longest on its client), refused (at the limit with every "
            "connection busy, 503), malformed (400: not a valid HTTP request), "
            "headers_too_large (431, or 414 for the URL: the request line and headers over "
            "their limit), body_too_large (413: a declared body over the limit), busy (503: "
            "a body that does not fit --max-buffered-body-bytes now)",
            ["reason"], registry=self.registry,
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class _ClientGone(Exception):
    pass


class _FailureLog:
    """Logs an error with its traceback at most once per `interval_s`; the ones in
    between are counted, and their number is logged with the next one.

    A request that matches a model's signature can still make the model fail (an
    input its graph cannot take): a client repeating it must not fill the journal
    with tracebacks. Called from the event loop and the worker thread alike.
    """

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._next = 0.0
        self._unlogged = 0

    def exception(self, message: str, *args: object) -> None:
        """`log.exception(message, *args)`, or only a count if one was logged recently;
        call it in an `except` block."""
        self._log(log.exception, message, *args)

    def warning(self, message: str, *args: object) -> None:
        """`log.warning(message, *args)`, or only a count, as `exception`."""
        self._log(log.warning, message, *args)

    def _log(self, emit: Callable[..., None], message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._unlogged += 1
                return
            unlogged, self._unlogged = self._unlogged, 0
            self._next = now + self.interval_s
        if unlogged:
            message += f" ({unlogged} more such failures since the last one logged)"
        emit(message, *args)


class _Connections:
    """The server's client connections: their deadlines and how many may be open.

    A connection waits either on its client (fresh, between requests, or with a
    request still arriving) or on the server (a request read, its response not
    written yet). Waiting on the client has a deadline: `idle_timeout_s` to begin
    a request, `request_timeout_s` from a request's first byte to its last, and,
    once it has stopped reading its responses (the send buffer full), each
    `request_timeout_s` it must have read some more: a slow reader stays. Past a
    deadline the connection is closed, after a 408 when a request was under way
    (a reader that stopped gets nothing more: it is aborted).
    Waiting on the server has none: a slow model is not the client's doing.

    At most `limit` connections are open. One more evicts the connection that has
    waited longest on its client (a half-sent request, an idle keep-alive
    connection, or one whose client stopped reading its responses); if every
    connection is waiting on the server, the newcomer gets a 503 instead. A flood
    of half-sent requests can thus neither use up the process's file descriptors
    nor lock out the health checks: each new connection displaces an old one.

    One timer checks every deadline each `tick` seconds, rather than one timer
    per request: on the request path a deadline is a float assignment.
    """

    def __init__(self, limit: int, idle_timeout_s: float, request_timeout_s: float,
                 metrics: Metrics):
        self.limit = limit
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.tick = min(1.0, idle_timeout_s / 4, request_timeout_s / 4)
        self.open: set[Any] = set()
        self._metrics = metrics
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._unreported: dict[str, int] = {}
        self._next_report = 0.0
        metrics.open_connections.set_function(lambda: len(self.open))

    def admit(self, conn: Any) -> bool:
        """Count a new connection in; False when it must be refused (the caller says why).

        At the limit, the connection waiting longest on its client is closed to
        make room.
        """
        self.open.add(conn)
        loop = conn.loop
        if self._timer is None or self._timer_loop is not loop:
            self._timer_loop = loop
            self._timer = loop.call_later(self.tick, self._sweep)
        if len(self.open) <= self.limit:
            return True
        victim = None
        oldest = _NEVER
        for other in self.open:
            since = other.waiting_on_client_since()
            if since is not None and since < oldest and other is not conn:
                victim, oldest = other, since
        if victim is None:
            self.note("refused")
            return False
        victim.evict()
        self.note("evicted")
        return True

    def drop(self, conn: Any) -> None:
        self.open.discard(conn)

    def note(self, reason: str) -> None:
        """Count a connection the server closed; anything but idle timeouts is also
        logged, at most once a minute (a flood must not flood the journal too)."""
        self._metrics.connections_closed.labels(reason).inc()
        if reason != "idle_timeout":
            self._unreported[reason] = self._unreported.get(reason, 0) + 1
            self._report()

    def _report(self) -> None:
        now = time.monotonic()
        if self._unreported and now >= self._next_report:
            counts = ", ".join(f"{n} {why}" for why, n in sorted(self._unreported.items()))
            log.warning(
                "closed client connections: %s (limit %d open connections; a request must "
                "arrive within %g s; see fedge_serve_connections_closed)",
                counts, self.limit, self.request_timeout_s,
            )
            self._unreported.clear()
            self._next_report = now + 60

    def _sweep(self) -> None:
        loop = self._timer_loop
        assert loop is not None
        now = loop.time()
        for conn in [c for c in self.open if c.deadline <= now or c.stall_deadline <= now]:
            conn.deadline_passed(now)
        self._report()
        self._timer = loop.call_later(self.tick, self._sweep) if self.open else None


class _BodyBudget:
    """The request-body bytes the server holds, all connections together: a request
    takes its declared length (or its chunks as they come) before its body is
    read, and gives it back once answered; one that does not fit gets a 503 with
    Retry-After and is not read. Used on the event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def fits(self, n: int) -> bool:
        return self.used + n <= self.limit

    def take(self, n: int) -> bool:
        if not self.fits(n):
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n

    def refusal(self) -> str:
        return (f"the server holds as many request bodies as it may ({self.limit} bytes, all "
                f"connections together); try again in {BUSY_RETRY_AFTER_S} s")


class _InlineTooSlow(Exception):
    """A run on the event loop passed INLINE_RUN_DEADLINE_S: it is run again on the
    worker thread (with the full --infer-timeout)."""


class _Busy(ProtocolError):
    """503: the body does not fit the server's body budget now (the ASGI lane)."""

    def __init__(self, budget: _BodyBudget):
        super().__init__(503, budget.refusal())
        self.headers = {"retry-after": str(BUSY_RETRY_AFTER_S), "connection": "close"}


class InferenceServer:
    """The ASGI application: `InferenceServer(root)` is what uvicorn runs."""

    def __init__(
        self,
        repository: str | Path,
        *,
        poll_interval: float = 0.5,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        threads: int | None = None,
        inline_budget_s: float = DEFAULT_INLINE_BUDGET_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        load_timeout_s: float | None = DEFAULT_LOAD_TIMEOUT_S,
        max_buffered_body_bytes: int = DEFAULT_MAX_BUFFERED_BODY,
        infer_timeout_s: float = DEFAULT_INFER_TIMEOUT_S,
    ):
        """`max_buffered_body_bytes`: request-body bytes held at once, all connections
        together (`_BodyBudget`). `load_timeout_s`: seconds a new version's check may
        take in its child process (`fedge.serve.runtime.check_in_child`); None checks
        it in this process with no deadline. `infer_timeout_s`: seconds one inference
        run may take before it is stopped and answered with 504 (a run on the event
        loop is moved to the worker thread after `INLINE_RUN_DEADLINE_S` first).

        Raises: ValueError for a non-positive poll interval, body or header limit,
        connection limit, timeout or load timeout, a body budget below the body limit
        (a request of the largest size allowed could never be read), a poll interval
        over an hour (the watcher thread could not wait on 1e10 or inf: it died, and no
        new version ever loaded), a thread count below 1 or a negative inline budget."""
        if not 0 < poll_interval <= MAX_POLL_INTERVAL_S:
            raise ValueError(f"poll_interval {poll_interval!r} must be > 0 seconds and at "
                             f"most {MAX_POLL_INTERVAL_S:g}")
        if threads is not None and not threads >= 1:
            raise ValueError(f"threads {threads!r} must be >= 1")
        if not max_body_bytes > 0:
            raise ValueError(f"max_body_bytes {max_body_bytes!r} must be > 0")
        if not max_buffered_body_bytes >= max_body_bytes:
            raise ValueError(
                f"max_buffered_body_bytes {max_buffered_body_bytes!r} must be at least "
                f"max_body_bytes {max_body_bytes!r}: a request of the largest size allowed "
                "could never be read")
        if not max_header_bytes > 0:
            raise ValueError(f"max_header_bytes {max_header_bytes!r} must be > 0")
        if not inline_budget_s >= 0:
            raise ValueError(f"inline_budget_s {inline_budget_s!r} must be >= 0 seconds")
        if not max_connections >= 1:
            raise ValueError(f"max_connections {max_connections!r} must be >= 1")
        for what, seconds in (("idle_timeout_s", idle_timeout_s),
                              ("request_timeout_s", request_timeout_s),
                              ("infer_timeout_s", infer_timeout_s)):
            if not 0 < seconds < _NEVER:
                raise ValueError(f"{what} {seconds!r} must be a finite number of seconds > 0")
        self.repo = ModelRepository(repository)
        # a file written in place by hand must rest one scan before it loads
        self.store = ModelStore(threads=threads, load_timeout_s=load_timeout_s,
                                settle_s=poll_interval)
        self.metrics = Metrics()
        self.max_body_bytes = max_body_bytes
        self.body_budget = _BodyBudget(max_buffered_body_bytes)
        self.metrics.buffered_body_bytes.set_function(lambda: self.body_budget.used)
        self.max_header_bytes = max_header_bytes
        # one per (model, version): a model failing often hides none of another's
        self._model_failures: dict[tuple[str, int], _FailureLog] = {}
        self.inline_budget_s = inline_budget_s
        self.infer_timeout_s = infer_timeout_s
        self.deadlines = RunDeadlines()
        self.watcher = Watcher(self.store, self.repo, poll_interval)
        # Large requests run one at a time on a worker thread: each already uses
        # every core through onnxruntime's intra-op pool, so running several at
        # once would only oversubscribe the CPUs.
        self._heavy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedge-infer")
        # the JSON process (see PARSE_APART_BYTES), started on first use
        self._json_process: ProcessPoolExecutor | None = None
        self._json_unavailable = False
        self._spill = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedge-spill")
        self.connections = _Connections(max_connections, idle_timeout_s, request_timeout_s,
                                        self.metrics)
        # called on the event loop once the repository is first loaded (see _lifespan)
        self.on_ready: Callable[[], None] | None = None
        # direct-lane requests read in the current loop step (see `submit`)
        self._batch: list[tuple[LoadedModel, InferRequest, Any]] = []
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
            middleware=[Middleware(_RefuseEncodedSlash)],
            lifespan=self._lifespan,
        )

    # -- lifecycle ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        # The repository is first loaded on the watcher thread, not here: the event
        # loop must not wait on a model's checks (up to load_timeout_s each) before
        # the server answers health checks and handles SIGTERM. Until then it is
        # live and not ready (no model loaded yet).
        loop = asyncio.get_running_loop()
        first_sync = asyncio.Event()

        def synced() -> None:  # on the watcher thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(first_sync.set)

        self.watcher.on_first_sync = synced
        self.watcher.start()
        notifier = Notifier()
        readiness = asyncio.create_task(self._ready_after(first_sync, notifier))
        # The watchdog is fed from the event loop, so a wedged loop (the thing
        # that answers requests) is what systemd notices.
        interval = watchdog_interval()
        pinger = asyncio.create_task(self._feed_watchdog(notifier, interval)) if interval else None
        try:
            yield
        finally:
            notifier.stopping("shutting down")
            readiness.cancel()
            if pinger is not None:
                pinger.cancel()
            self.watcher.stop()
            self._heavy.shutdown(wait=True)
            if self._json_process is not None:
                self._json_process.shutdown(wait=True, cancel_futures=True)
            self._spill.shutdown(wait=True)

    async def _ready_after(self, first_sync: asyncio.Event, notifier: Notifier) -> None:
        await first_sync.wait()
        # Everything loaded so far lives as long as the server: keep it out of the
        # cyclic collector's generations, and collect young objects less often, so
        # that a request rarely pays for a full collection (the p99 tail).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        if self.on_ready is not None:
            self.on_ready()
        status = self.status_text()
        notifier.ready(status)
        # then STATUS= follows the repository (versions loaded, swapped, removed or
        # failing to load), sent each time it changes and never again while it stays
        while True:
            await asyncio.sleep(STATUS_REFRESH_S)
            now = self.status_text()
            if now != status:
                status = now
                notifier.status(status)

    def status_text(self) -> str:
        """What systemd's STATUS= says: the models and versions served now, and how many
        versions failed to load (each retried when its file changes)."""
        names = self.store.names()
        versions = sum(len(self.store.versions(name)) for name in names)
        return (f"serving {len(names)} model(s), {versions} version(s) from "
                f"{self.repo.root}; {len(self.store.failures)} version(s) failed to load")

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
            if match and _encoded_slash(scope) is None:  # else Starlette refuses it
                await self._infer_asgi(match.group(1), match.group(2), scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _infer_asgi(
        self, name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        start = time.perf_counter()
        # unknown names share one label: a client cannot grow the metric families
        label = name if self.store.has(name) else "_unknown"
        held = [0]  # bytes of the body budget this request holds, until it is answered
        try:
            try:
                body = await self._read_body(scope, receive, held)
                status, payload, headers = await self.infer(name, version, body, scope)
            except _ClientGone:
                return
            except ProtocolError as exc:
                status, payload = exc.status, exc.body()
                headers = {"content-type": "application/json", **getattr(exc, "headers", {})}
            except Exception as exc:  # a bug, not the client: the protocol's error JSON, not
                # uvicorn's plain-text 500 with our traceback in it
                log.exception("inference request failed")
                status, payload = 500, error_body(f"internal error: {exc}")
                headers = {"content-type": "application/json"}
            raw_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
            raw_headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": raw_headers})
            await send({"type": "http.response.body", "body": payload})
        finally:
            self.body_budget.give(held[0])
        self.metrics.observe(label, status, time.perf_counter() - start)

    async def _read_body(self, scope: Scope, receive: Receive,
                         held: list[int] | None = None) -> bytes | list[bytes]:
        """The request body: bytes, or its chunks when it is large enough for the JSON
        process (joining 58 MiB held the event loop for about 50 ms here; the chunks
        are written to a file off the loop instead, see `_parse_apart`).

        With `held`, the body's bytes are taken from the body budget before they are
        read (the declared length at once, else chunk by chunk) and counted in
        held[0]; the caller gives them back.

        Raises: ProtocolError 400/413 for a bad or oversized length; _Busy (503) for a
        body that does not fit the budget now; _ClientGone.
        """
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
            if held is not None:
                if not self.body_budget.take(n):
                    raise _Busy(self.body_budget)
                held[0] = n
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
            if held is not None and total > held[0]:  # chunked: no length declared
                if not self.body_budget.take(total - held[0]):
                    raise _Busy(self.body_budget)
                held[0] = total
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        encoding = _header(scope, b"content-encoding")
        if encoding and encoding != "identity":
            return self._decompress(_joined(chunks), encoding)
        return chunks if total > PARSE_APART_BYTES else _joined(chunks)

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

    def inline(self, model: LoadedModel, rows: float) -> bool:
        """Whether `rows` rows of `model` may run on the event loop."""
        return model.row_seconds * max(rows, 1.0) <= self.inline_budget_s

    def direct_model(self, name: str, version: str | None, body_bytes: int) -> LoadedModel | None:
        """The model a direct-lane request of `body_bytes` bytes may run inline, else None.

        The row count is estimated from the body size and the bytes of one input
        row (binary tensors; a JSON body overestimates it, which only errs towards
        the worker thread).
        """
        if body_bytes > DIRECT_MAX_BYTES:
            return None
        try:
            model = self._resolve(name, version)
        except UnknownModel:
            return None
        return model if self.inline(model, body_bytes / model.row_bytes) else None

    def submit(self, direct: _Direct, reply: Callable[[int, bytes, dict[str, str]], None]) -> None:
        """Answer a direct-lane request through `reply`: now, or with the other
        requests for the same model that arrive in this event-loop step.

        Requests read from several connections in one step of the loop run as one
        batch (rows concatenated, outputs split back), for models whose rows are
        independent (`LoadedModel.batchable`): one onnxruntime call instead of
        one per request. The batch runs at the end of the step (`call_soon`), so
        no request waits for a later one.
        """
        model = direct.model
        try:
            request = self._parse(model, direct.body, direct.header_length)
        except ProtocolError as exc:
            reply(exc.status, exc.body(), {"content-type": "application/json"})
            return
        if not model.batchable:
            self._settle(model, request, reply)
            return
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._run_batch)
        self._batch.append((model, request, reply))

    def _settle(self, model: LoadedModel, request: InferRequest,
                reply: Callable[[int, bytes, dict[str, str]], None]) -> None:
        """Answer one direct-lane request through `reply`: run on the event loop, or,
        when that run passes `INLINE_RUN_DEADLINE_S`, again on the worker thread."""
        try:
            answer = self._answer(model, request, inline=True)
        except _InlineTooSlow:
            self._hand_off(model, request, reply)
            return
        self._safe_reply(reply, answer)

    @staticmethod
    def _safe_reply(reply: Callable[[int, bytes, dict[str, str]], None],
                    answer: tuple[int, bytes, dict[str, str]] | BaseException) -> None:
        """`reply(*answer)`; an exception instead of an answer (a bug, not the client)
        is logged and answered 500, and a reply that fails is logged: one request's
        failure is not the others'."""
        if isinstance(answer, BaseException):
            log.error("inference request failed", exc_info=answer)
            answer = (500, error_body(f"internal error: {answer}"),
                      {"content-type": "application/json"})
        try:
            reply(*answer)
        except Exception:
            log.exception("inference reply failed")

    def _answer(self, model: LoadedModel, request: InferRequest,
                inline: bool = False) -> tuple[int, bytes, dict[str, str]]:
        try:
            return self._respond(model, request, self._run(model, request, inline))
        except ProtocolError as exc:
            return exc.status, exc.body(), {"content-type": "application/json"}

    def _hand_off(self, model: LoadedModel, request: InferRequest,
                  reply: Callable[[int, bytes, dict[str, str]], None]) -> None:
        """Answer a direct-lane request from the worker thread (`reply` is called on
        the event loop once it is done)."""
        def done(future: asyncio.Future[tuple[int, bytes, dict[str, str]]]) -> None:
            self._safe_reply(reply, future.exception() or future.result())

        loop = asyncio.get_running_loop()
        loop.run_in_executor(self._heavy, self._answer, model, request).add_done_callback(done)

    def _run_batch(self) -> None:
        pending, self._batch = self._batch, []
        groups: dict[tuple[Any, ...], list[tuple[LoadedModel, InferRequest, Any]]] = {}
        for item in pending:
            model, request, _ = item
            key = (id(model), request.outputs, tuple(
                (k, v.dtype.str, v.shape[1:]) for k, v in request.inputs.items()
            ))
            groups.setdefault(key, []).append(item)
        for group in groups.values():
            try:
                answers = self._batched(group) if len(group) > 1 else None
            except _InlineTooSlow:  # each on the worker thread, not once more here
                for model, request, reply in group:
                    self._hand_off(model, request, reply)
                continue
            for i, (model, request, reply) in enumerate(group):
                if answers is not None:
                    self._safe_reply(reply, answers[i])
                    continue
                try:
                    self._settle(model, request, reply)
                except Exception as exc:  # a bug, not the client: say so, keep serving
                    self._safe_reply(reply, exc)

    def _batched(
        self, group: list[tuple[LoadedModel, InferRequest, Any]]
    ) -> list[tuple[int, bytes, dict[str, str]]] | None:
        """The answers of requests with one model and one signature, from one run;
        None when that run fails (each request is then answered on its own).

        Raises: _InlineTooSlow when the run passed `INLINE_RUN_DEADLINE_S`."""
        model, first, _ = group[0]
        rows = []
        for _, request, _ in group:
            counts = {v.shape[0] if v.ndim else -1 for v in request.inputs.values()}
            if len(counts) != 1 or -1 in counts:
                return None  # inputs that disagree on the batch: not splittable by rows
            rows.append(counts.pop())
        total = sum(rows)
        options = None
        try:
            feeds = {name: np.concatenate([r.inputs[name] for _, r, _ in group])
                     for name in first.inputs}
            options = self.deadlines.start(self._deadline(inline=True))
            outputs = model.run(feeds, [o.name for o in first.outputs], options)
            if any(out.ndim == 0 or out.shape[0] != total for out in outputs):
                return None
            answers = []
            start = 0
            for (_, request, _), n in zip(group, rows, strict=True):
                part = [out[start : start + n] for out in outputs]
                start += n
                answers.append(self._respond(model, request, part))
        except Exception:
            if options is not None and options.terminate:
                raise _InlineTooSlow from None
            return None  # e.g. one request's input the model rejects: answer each alone
        finally:
            if options is not None:
                self.deadlines.stop(options)
        self.metrics.batches.observe(len(group))
        return answers

    async def infer(
        self, name: str, version: str | None, body: bytes | list[bytes], scope: Scope
    ) -> tuple[int, bytes, dict[str, str]]:
        """Run one inference request (`body`: bytes, or its chunks); returns (status,
        body, headers).

        Raises:
            ProtocolError: 400 for an invalid request, 404 for an unknown model/version,
                500 when a valid request makes the model fail, 503 when the JSON
                process died under it.
        """
        model = self._model(name, version)
        header_length = _header(scope, HEADER_LENGTH.encode())
        size = len(body) if isinstance(body, bytes) else sum(map(len, body))
        if _json_bytes(size, header_length) > PARSE_APART_BYTES:
            request = await self._parse_apart(model, body, header_length)
        else:
            request = self._parse(model, _joined(body), header_length)
        first = next(iter(request.inputs.values()), None)
        rows = float(first.shape[0]) if first is not None and first.ndim else 1.0
        loop = asyncio.get_running_loop()
        results = None
        if self.inline(model, rows):
            with contextlib.suppress(_InlineTooSlow):  # then on the worker thread, as below
                results = self._run(model, request, inline=True)
        if results is None:
            results = await loop.run_in_executor(self._heavy, self._run, model, request)
        json_elements = sum(arr.size for want, arr in zip(request.outputs, results, strict=True)
                            if not want.binary)
        if json_elements > ENCODE_APART_ELEMENTS:
            payload, headers = await self._apart(
                encode_infer_response, model.name, str(model.version),
                request._replace(inputs={}), results,  # the inputs need not travel
            )
            return 200, payload, headers
        return self._respond(model, request, results)

    @staticmethod
    def _parse(model: LoadedModel, body: bytes, header_length: str | None) -> InferRequest:
        return parse_infer_request(
            body, header_length, model.name, model.inputs, model.outputs, model.parsed_headers
        )

    async def _parse_apart(
        self, model: LoadedModel, body: bytes | list[bytes], header_length: str | None
    ) -> InferRequest:
        """`_parse` in the JSON process. The body travels as a file written on a
        worker thread (os.write lets go of the GIL; pickling it to the process, as
        ProcessPoolExecutor does with arguments, held the event loop for 0.1 to
        0.25 s per 58 MiB here).

        Raises: ProtocolError as `_parse` and `_apart` do.
        """
        chunks = [body] if isinstance(body, bytes) else body
        loop = asyncio.get_running_loop()
        try:
            path = await loop.run_in_executor(self._spill, _spill, chunks)
        except OSError as exc:  # no room for it: hand it over the slower way
            log.warning("cannot write a large request body to a temporary file (%s)", exc)
            return await self._apart(parse_infer_request, _joined(body), header_length,
                                     model.name, model.inputs, model.outputs)
        try:
            return await self._apart(parse_infer_request_file, path, header_length, model.name,
                                     model.inputs, model.outputs)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _apart(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` in the JSON process, so that the event loop keeps answering
        meanwhile; on a worker thread where no such process can be started (the
        request is answered, the others wait meanwhile).

        Raises:
            ProtocolError: what `fn` raises; 503 when the JSON process died under
                this call (killed for memory, say: running it here instead could
                take the server down with it). The next call gets a new process.
        """
        loop = asyncio.get_running_loop()
        pool = self._json_pool()
        if pool is None:
            return await loop.run_in_executor(self._heavy, fn, *args)
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            if self._json_process is pool:
                self._json_process = None
                pool.shutdown(wait=False, cancel_futures=True)
            log.warning("the JSON process died in %s", fn.__name__)
            raise ProtocolError(
                503, "the server's JSON process stopped while handling this request (out of "
                     "memory?); try again, or send and ask for the tensors as binary data"
            ) from None
        except OSError as exc:  # the process could not be started at all
            self._json_process, self._json_unavailable = None, True
            pool.shutdown(wait=False, cancel_futures=True)
            log.warning("cannot start the JSON process (%s): large JSON requests and responses "
                        "are handled on a thread, which stalls the other requests meanwhile", exc)
            return await loop.run_in_executor(self._heavy, fn, *args)

    def _json_pool(self) -> ProcessPoolExecutor | None:
        if self._json_process is None and not self._json_unavailable:
            try:
                # spawn, not fork: this process has threads (onnxruntime's, the watcher)
                self._json_process = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=json_process_init, initargs=(os.getpid(),),
                )
            except (OSError, ImportError) as exc:  # e.g. no working sem_open (/dev/shm)
                log.warning("no JSON process (%s): large JSON requests and responses are "
                            "handled on a thread, which stalls the other requests meanwhile", exc)
                self._json_unavailable = True
        return self._json_process

    def _deadline(self, inline: bool) -> float:
        return min(INLINE_RUN_DEADLINE_S, self.infer_timeout_s) if inline \
            else self.infer_timeout_s

    def _run(self, model: LoadedModel, request: InferRequest, inline: bool = False) -> list[Any]:
        """One run, stopped at its deadline (`_deadline`); `inline`: on the event loop.

        Raises: ProtocolError 400 when onnxruntime rejects the input, 500 when it
        fails, 504 when it was stopped at `infer_timeout_s`; _InlineTooSlow when an
        inline run was stopped at `INLINE_RUN_DEADLINE_S` (run it on the worker).
        """
        seconds = self._deadline(inline)
        options = self.deadlines.start(seconds)
        try:
            return model.run(request.inputs, [o.name for o in request.outputs], options)
        except InvalidArgument as exc:
            raise ProtocolError(400, f"model '{model.name}' rejected the input: {exc}") from None
        except Exception as exc:  # the model failed on a valid request: our fault, say so
            stopped = options.terminate
            if stopped and inline and seconds < self.infer_timeout_s:
                raise _InlineTooSlow from None
            failures = self._model_failures.setdefault(  # atomic: loop and worker alike
                (model.name, model.version), _FailureLog(MODEL_FAILURE_LOG_INTERVAL_S))
            if stopped:
                failures.warning("an inference run of %s version %d was stopped after %g s "
                                 "(--infer-timeout)", model.name, model.version, seconds)
                raise ProtocolError(
                    504, f"inference in model '{model.name}' version {model.version} was "
                         f"stopped after {seconds:g} s (the server's --infer-timeout)"
                ) from None
            failures.exception("inference failed for %s version %d", model.name, model.version)
            raise ProtocolError(
                500, f"inference failed in model '{model.name}' version {model.version}: {exc}"
            ) from None
        finally:
            self.deadlines.stop(options)

    @staticmethod
    def _respond(
        model: LoadedModel, request: InferRequest, results: list[Any]
    ) -> tuple[int, bytes, dict[str, str]]:
        payload, headers = encode_infer_response(model.name, str(model.version), request, results)
        return 200, payload, headers

    def _model(self, name: str, version: str | None) -> LoadedModel:
        try:
            return self.find(name, version)
        except UnknownModel as exc:
            raise ProtocolError(404, exc.message) from None

    def _resolve(self, name: str, version: str | None) -> LoadedModel:
        """Raises: UnknownModel (see `find`), without the reason."""
        if version is not None and not _VERSION_TEXT.fullmatch(version) and self.store.has(name):
            raise UnknownModel(
                f"unknown version '{version}' of model '{name}' (a version is a positive "
                "integer written without leading zeros)"
            )
        return self.store.get(name, version)

    def find(self, name: str, version: str | None) -> LoadedModel:
        """The live version of `name`, or the version named in the URL.

        Raises:
            UnknownModel: no such model, or no such version loaded; when a version on
                disk failed to load, the message says why (as the log and
                /v2/repository/index do).
        """
        try:
            return self._resolve(name, version)
        except UnknownModel as exc:
            why = self._load_failure(name, version)
            if why is None:
                raise
            raise UnknownModel(f"{exc.message}: not serving {why}") from None

    def _load_failure(self, name: str, version: str | None) -> str | None:
        """Why the version named (else the newest version of `name` on disk) is not
        served, if it failed to load; else None."""
        failures = dict(self.store.failures)  # one copy: the watcher thread writes it
        if version is None:
            candidates = sorted((v for n, v in failures if n == name), reverse=True)
        elif _VERSION_TEXT.fullmatch(version):
            candidates = [int(version)] if (name, int(version)) in failures else []
        else:
            candidates = []
        for v in candidates:
            if self.repo.path(name, v).is_file():  # still on disk, not a stale entry
                return failures[(name, v)]
        return None

    # -- Starlette routes --------------------------------------------------

    @staticmethod
    def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
        return Response(error_body(message), status_code=status, headers=headers,
                        media_type="application/json")

    async def _http_error(self, _request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        # with the headers Starlette puts on it: a 405's `Allow` (RFC 9110 15.5.6)
        return self._error(exc.status_code, str(exc.detail), exc.headers)

    async def _server_metadata(self, _request: Request) -> Response:
        return JSONResponse({"name": "fedge", "version": __version__, "extensions": EXTENSIONS})

    async def _live(self, _request: Request) -> Response:
        return JSONResponse({"live": True})

    async def _ready(self, _request: Request) -> Response:
        # "a 4xx status code indicates false" (v2 health API); Triton answers 400 too
        if self.store.names():
            return JSONResponse({"ready": True})
        return self._error(400, "no model is loaded yet")

    def _lookup(self, request: Request) -> LoadedModel | Response:
        try:
            return self.find(request.path_params["name"], request.path_params.get("version"))
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


def _encoded_slash(scope: Scope) -> str | None:
    """Why a request whose URL path has an encoded slash (`%2F`, any case) is refused,
    else None.

    Routes match the decoded path, in which `cox%2Fversions%2F1` is three segments:
    `POST /v2/models/cox%2Fversions%2F1/infer` was answered by version 1, past a
    proxy that lets through only `/v2/models/cox/infer`. No model name, version or
    fixed route of this server holds a '/' inside a segment, so it is refused.
    """
    raw = scope.get("raw_path")
    if not raw or b"%" not in raw:
        return None
    path = raw.split(b"?", 1)[0]  # some servers leave the query in raw_path
    if b"%2f" not in path.lower():
        return None
    return (f"no route for the URL path '{path.decode('latin-1')}': it holds an encoded "
            "slash (%2F), and no model name or version can contain '/'")


class _RefuseEncodedSlash:
    """ASGI middleware: a 404 with the protocol's error JSON for a URL path with an
    encoded slash (see `_encoded_slash`), before any route is matched."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = _encoded_slash(scope)
            if refusal is not None:
                response = Response(error_body(refusal), status_code=404,
                                    media_type="application/json")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _json_bytes(size: int, header_length: str | None) -> int:
    """How much of a body of `size` bytes is JSON: all of it, or the binary
    extension's header part."""
    if header_length is None:
        return size
    try:
        return min(max(int(header_length), 0), size)
    except ValueError:
        return size  # parse_infer_request says what is wrong with it


def _joined(body: bytes | list[bytes]) -> bytes:
    if isinstance(body, bytes):
        return body
    return body[0] if len(body) == 1 else b"".join(body)


_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
# a tmpfs where there is one: the body is read back at once
_SPILL_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
    else None


def _spill(chunks: list[bytes]) -> str:
    """Write `chunks` to a new temporary file; returns its path (the caller removes it).

    Raises: OSError (the file is removed).
    """
    fd, path = tempfile.mkstemp(prefix="fedge-serve-body-", dir=_SPILL_DIR)
    try:
        # a few large writes, not one per 64 KiB chunk: each write gives the GIL
        # back to the event loop and must then wait to take it again
        views = [memoryview(c) for c in chunks if c]
        i = 0
        while i < len(views):
            written = os.writev(fd, views[i : i + _IOV_MAX])
            while i < len(views) and written >= len(views[i]):
                written -= len(views[i])
                i += 1
            if written:  # a short write: the rest of this chunk next time
                views[i] = views[i][written:]
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


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
        self._ended = False  # write_eof() called: what is written after it is dropped

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended:  # a refused request's app answering late: nobody to read it
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def write_now(self, data: bytes) -> None:
        """Send `data` at once, after anything still pending (responses stay in order)."""
        if self._ended:
            return
        if self._pending:
            self._pending.append(data)
            self._flush()
        elif not self._transport.is_closing():
            self._transport.write(data)

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

    def write_eof(self) -> None:
        self._flush()
        self._ended = True
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Direct:
    """A direct-lane request between its headers and its last body byte."""

    __slots__ = ("body", "header_length", "keep_alive", "label", "model", "reserved", "start")

    def __init__(self, model: LoadedModel, header_length: str | None, keep_alive: bool,
                 start: float):
        self.model = model
        self.header_length = header_length
        self.body = b""  # one chunk (the usual case) is kept as is, never copied
        self.keep_alive = keep_alive
        self.start = start
        self.label = model.name
        self.reserved = 0  # bytes of the body budget taken for it (given back when read)


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The body length a request declares: its one Content-Length, if it has no
    Transfer-Encoding; else None (the ASGI lane says what is wrong, if anything)."""
    length: int | None = None
    for key, value in headers:
        if key == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 20:
                return None
            length = int(value)
        elif key == b"transfer-encoding":
            return None
    return length


def _direct_headers(headers: list[tuple[bytes, bytes]]) -> tuple[int, str | None] | None:
    """(Content-Length, Inference-Header-Content-Length) of a request the direct lane
    can take: a declared length, no body encoding, no `Expect`; else None."""
    length: int | None = None
    header_length = None
    for key, value in headers:
        if key == b"content-length":
            if length is not None or not value.isdigit():
                return None  # repeated or odd: the ASGI lane says what is wrong
            length = int(value)
        elif key == b"inference-header-content-length":
            header_length = value.decode("latin-1")
        elif key in (b"transfer-encoding", b"expect") or (
            key == b"content-encoding" and value.lower() != b"identity"
        ):
            return None
    return None if length is None else (length, header_length)


@functools.lru_cache(maxsize=256)
def _infer_route(url: bytes) -> tuple[str, str | None] | None:
    """(model, version or None) of an inference URL the direct lane can take, else None
    (anything percent-encoded goes through ASGI, which decodes it)."""
    path = url.split(b"?", 1)[0]
    match = None if b"%" in path else _INFER.fullmatch(path.decode("latin-1"))
    return None if match is None else (match.group(1), match.group(2))


_default_block: tuple[object, bytes] = (None, b"")


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """uvicorn's default response headers (server, date) as one block; uvicorn
    replaces the list when the date changes, so the list's identity is the key."""
    global _default_block
    source, block = _default_block
    if source is not headers:
        block = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        _default_block = (headers, block)
    return block


def _loop_and_http(app: InferenceServer) -> tuple[str, Any]:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover - depends on the install
        loop = "asyncio"
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools missing: uvicorn's pure-Python h11
        return loop, "h11"

    connections = app.connections
    head_limit = app.max_header_bytes
    # a bug in a parser callback, met by every request that takes the same path
    callback_failures = _FailureLog(MODEL_FAILURE_LOG_INTERVAL_S)

    class _HeadTooLarge(Exception):
        """Raised from a parser callback to stop parsing a head over the limit."""

    class _BodyRefused(Exception):
        """Raised from on_headers_complete to refuse a request for its declared body
        before any of it is read (data_received answers, and closes)."""

        def __init__(self, status: int, message: str, reason: str, headers: bytes = b""):
            super().__init__(message)
            self.status, self.message, self.reason = status, message, reason
            self.headers = headers  # header lines added to the refusal

    class InferenceHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, answering cheap inference requests itself,
        with the deadlines and the connection limit of `_Connections`."""

        _direct: _Direct | None = None
        _owed: _Direct | None = None  # a direct-lane request not answered yet
        # an ASGI request that arrived behind `_owed` waits in `pipeline` for its answer
        _deferred = False
        # loop time by which the client must act; _NEVER while the server owes it
        deadline: float = _NEVER
        # loop time by which a client that stopped reading its responses must read on
        stall_deadline: float = _NEVER
        _unsent = 0  # bytes waiting to be sent when the stall deadline was last set
        _since: float | None = None  # waiting on the client since (loop time)
        _stalled: float | None = None  # the client stopped reading responses since
        _reading = False  # between a request's first byte and its last
        _in_headers = False  # ... and before the end of its headers
        _head_bytes = 0  # bytes read since the last request's headers ended
        _head_over = 0  # the size of a head measured whole and found over the limit
        # (status, message) to answer before closing, once the responses owed for
        # the earlier requests on this connection are written
        _refusal: tuple[int, str, bytes] | None = None  # and header lines to add
        _lingering = False  # the refusal is sent: reading what else comes until closed
        _discarded = 0  # bytes read and dropped meanwhile

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses: duck-typed
            super().connection_made(_CoalescingTransport(transport))  # type: ignore[arg-type]
            self._wait_on_client(connections.idle_timeout_s)
            if not connections.admit(self):
                self._close_with(503, f"the server is at its limit of {connections.limit} "
                                      "connections, all of them busy; try again shortly")

        def connection_lost(self, exc: Exception | None) -> None:
            connections.drop(self)
            self._drop_direct()
            super().connection_lost(exc)

        def _wait_on_client(self, timeout_s: float) -> None:
            now = self.loop.time()
            self._since = now
            self.deadline = now + timeout_s

        def waiting_on_client_since(self) -> float | None:
            """Since when this connection has waited on its client (-inf: closing
            already), or None while the server owes it something."""
            if self.transport.is_closing():
                return -_NEVER
            return self._since if self._since is not None else self._stalled

        def evict(self) -> None:
            self.deadline = _NEVER
            self.transport.abort()  # not close(): that would wait for a stalled reader

        def deadline_passed(self, now: float) -> None:
            if self.stall_deadline <= now:
                unsent = self.transport.get_write_buffer_size()
                if unsent < self._unsent:  # it read some: a slow reader, not a stopped one
                    self._unsent = unsent
                    self.stall_deadline = now + connections.request_timeout_s
                else:  # read nothing of its responses for so long
                    self.stall_deadline = self.deadline = _NEVER
                    connections.note("write_timeout")
                    self.transport.abort()  # close() would wait on the reader that stopped
                    return
            if self.deadline > now:
                return
            self.deadline = _NEVER
            if self.transport.is_closing():
                return
            if self._lingering:  # a refused client had its time to read the refusal
                self.transport.abort()
                return
            if not self._reading:  # no request begun within the idle timeout
                connections.note("idle_timeout")
                self.transport.close()
                return
            if self._owes_response() or self.flow.read_paused:
                # the server has yet to answer (or to read) what came before:
                # not the client's delay
                self.deadline = now + connections.request_timeout_s
                return
            connections.note("request_timeout")
            message = (f"the request did not arrive in full within "
                       f"{connections.request_timeout_s:g} s")
            if (self._in_headers or self._direct is not None or self.cycle is None
                    or not self.cycle.response_started):
                self._close_with(408, message)
            else:  # answered already (a 413 before the body): nothing more to say
                self.transport.close()

        def _owes_response(self) -> bool:
            if self._owed is not None or self.pipeline:
                return True
            # until the headers are in, self.cycle is the previous request's
            return self._in_headers and self.cycle is not None and not self.cycle.response_complete

        def _close_with(self, status: int, message: str) -> None:
            payload = error_body(message)
            self.transport.write(b"".join([
                STATUS_LINE[status], _default_headers(self.server_state.default_headers),
                b"content-type: application/json\r\ncontent-length: ",
                str(len(payload)).encode(), b"\r\nconnection: close\r\n\r\n", payload,
            ]))
            self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            self._stalled = self.loop.time()
            self.stall_deadline = self._stalled + connections.request_timeout_s
            self._unsent = self.transport.get_write_buffer_size()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._stalled = None
            self.stall_deadline = _NEVER

        def data_received(self, data: bytes) -> None:
            """uvicorn's, plus a limit on a request's line and headers, and the
            protocol's JSON error body for a request that is not valid HTTP.

            A head still arriving is checked after each read from the socket, so a
            flood may overshoot the limit by one read (256 KiB at most) before the
            431; a head that arrives whole is measured in on_headers_complete.
            """
            if self._refusal is not None:  # closing: parse nothing more
                self._discarded += len(data)
                if not self._lingering or self._discarded > LINGER_BYTES:
                    self.flow.pause_reading()  # a flooder: let its sends block instead
                return
            self._unset_keepalive_if_required()
            if self._in_headers or not self._reading:
                self._head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                # answered as a plain request (no WebSocket here, ws="none"); the
                # parser reads nothing after an Upgrade request's head
                return
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
                return
            if self._in_headers and self._head_bytes > head_limit:
                self._refuse_head(self._head_bytes)

        def _parse_failed(self, exc: Exception) -> None:
            """Refuse the request httptools stopped at. An exception raised in one of
            the parser's callbacks (uvicorn's or this class's) reaches here as an
            HttpParserCallbackError whose __context__ is the original: a client's
            fault only if it is one of the faults named here, else a bug. Called in
            an `except` block."""
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            if cause is None:
                self._refuse(400, f"malformed HTTP request: {exc}", "malformed")
            elif isinstance(cause, _HeadTooLarge):  # raised by on_headers_complete
                self._refuse_head(self._head_over)
            elif isinstance(cause, _BodyRefused):  # raised by on_headers_complete too
                self._refuse(cause.status, cause.message, cause.reason, cause.headers)
            elif isinstance(cause, httptools.HttpParserInvalidURLError):
                self._refuse(400, "malformed HTTP request: invalid URL", "malformed")
            elif isinstance(cause, UnicodeDecodeError):  # uvicorn decodes the path as ASCII
                self._refuse(400, "malformed HTTP request: the URL is not ASCII", "malformed")
            else:  # called in data_received's except: the log shows both tracebacks
                callback_failures.exception("HTTP request handling failed")
                self._refuse(500, "internal error", "internal_error")

        def _refuse_head(self, size: int) -> None:
            if 2 * len(self.url) >= size:  # mostly the URL
                self._refuse(414, f"request URL too long: the request line and headers "
                                  f"exceed {head_limit} bytes", "headers_too_large")
            else:
                self._refuse(431, f"request headers exceed {head_limit} bytes",
                             "headers_too_large")

        def _refuse(self, status: int, message: str, reason: str,
                    headers: bytes = b"") -> None:
            """Answer `status` with `message` and close. The refusal is answered after
            the responses still owed for the earlier requests on this connection
            (pipelined), which keep their order; a request at fault in its body that
            has had its answer already (a 413 before the body) gets none: the
            connection is only closed."""
            connections.note(reason)
            in_head = self._in_headers or not self._reading
            direct_body = self._direct is not None  # else self.cycle is the request's
            self._refusal = (status, message, headers)
            self._reading = self._in_headers = False
            self._drop_direct()
            self.flow.pause_reading()
            self._since, self.deadline = None, _NEVER  # the server's turn now
            if in_head:
                if not self._owes_earlier():
                    self._send_refusal()
                # else sent by on_response_complete (after a direct reply too)
            elif direct_body or self.cycle is None or not self.cycle.response_started:
                if not direct_body and self.cycle is not None:
                    # its app is told the client left and its writes are dropped: the
                    # refusal is this request's answer, owed after the earlier ones
                    self.cycle.disconnected = self.cycle.response_complete = True
                    self.cycle.message_event.set()
                    if self.pipeline and self.pipeline[0][0] is self.cycle:
                        # queued behind an earlier ASGI response (uvicorn appends on
                        # the left), never started: sent by on_response_complete
                        self.pipeline.popleft()
                        return
                if not self._owes_earlier():
                    self._send_refusal()
                # else sent by on_response_complete (after a direct reply too)
            else:
                self._lingering = True
                self.transport.close()

        def _owes_earlier(self) -> bool:
            """Whether a response to an earlier request is still to be written (called
            before the current request's headers are in: self.cycle is an earlier one)."""
            return self._owed is not None or bool(self.pipeline) or (
                self.cycle is not None and not self.cycle.response_complete
            )

        def _send_refusal_if_due(self) -> None:
            if (self._refusal is not None and not self._lingering
                    and not self.transport.is_closing() and not self._owes_earlier()):
                self._send_refusal()

        def _send_refusal(self) -> None:
            """Write the refusal, end the sending side, and keep the connection for up
            to LINGER_S, reading and dropping up to LINGER_BYTES of what the client
            still sends (then no more): closing a socket with unread data in it
            resets the connection, which can destroy the response in the client's
            buffer before it is read (a flooder would never see its 431). A client
            that reads the response and closes ends it sooner."""
            assert self._refusal is not None
            status, message, extra = self._refusal
            self._lingering = True
            payload = error_body(message)
            self.transport.write(b"".join([
                STATUS_LINE[status], _default_headers(self.server_state.default_headers), extra,
                b"content-type: application/json\r\ncontent-length: ",
                str(len(payload)).encode(), b"\r\nconnection: close\r\n\r\n", payload,
            ]))
            if not self.transport.can_write_eof():  # pragma: no cover - TLS
                self.transport.close()
                return
            self.transport.write_eof()  # the client reads the response, then EOF
            self._discarded = 0
            self.flow.resume_reading()
            now = self.loop.time()
            self._since, self.deadline = now, now + LINGER_S  # evictable meanwhile

        def _drop_direct(self) -> None:
            """Forget the direct-lane request being read, giving its body budget back."""
            direct, self._direct = self._direct, None
            if direct is not None:
                app.body_budget.give(direct.reserved)
                direct.reserved = 0

        def on_message_begin(self) -> None:
            self._drop_direct()
            self._reading = self._in_headers = True
            self.deadline = self.loop.time() + connections.request_timeout_s
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._head_bytes = 0
            # a head that came whole in one read is measured here, in the bytes it
            # took on the wire (as data_received counts a head arriving in parts, so
            # the verdict does not depend on how TCP cut it): "METHOD URL HTTP/1.1\r\n",
            # "name: value\r\n" each, and the blank line
            method = self.parser.get_method()
            size = (len(method) + len(self.url) + 12
                    + sum(len(k) + len(v) + 4 for k, v in self.headers) + 2)
            if size > head_limit:
                self._head_over = size
                raise _HeadTooLarge(size)  # httptools stops parsing; data_received answers
            if method == b"POST":
                declared = _declared_length(self.headers)
                if declared is not None and declared > app.max_body_bytes:
                    # refused before the body: answered with `connection: close`, and
                    # the connection closed soon after (_send_refusal), not drained
                    raise _BodyRefused(
                        413, f"request body of {declared} bytes exceeds the limit of "
                             f"{app.max_body_bytes} bytes", "body_too_large")
                if declared is not None and not app.body_budget.fits(declared):
                    raise _BodyRefused(503, app.body_budget.refusal(), "busy",
                                       b"retry-after: %d\r\n" % BUSY_RETRY_AFTER_S)
            self._direct = self._take_direct(method)
            if self._direct is None:
                super().on_headers_complete()  # raises for a URL it cannot parse
            # only now, with the request taken: anything raised above is a fault in
            # its head, answered after the responses owed to the earlier requests
            self._in_headers = False

        def _take_direct(self, method: bytes) -> _Direct | None:
            if (method != b"POST" or self.flow.write_paused
                    or self._owed is not None):
                return None
            if self.pipeline or not (self.cycle is None or self.cycle.response_complete):
                return None  # an ASGI response is still owed first: keep the order
            route = _infer_route(self.url)
            if route is None:
                return None
            declared = _direct_headers(self.headers)
            if declared is None or declared[0] > app.max_body_bytes:
                return None
            model = app.direct_model(route[0], route[1], declared[0])
            if model is None:
                return None
            if not app.body_budget.take(declared[0]):
                return None  # not reached: on_headers_complete checked that it fits
            keep_alive = (self.parser.get_http_version() != "1.0"
                          and self.parser.should_keep_alive())
            direct = _Direct(model, declared[1], keep_alive, time.perf_counter())
            direct.reserved = declared[0]
            return direct

        def shutdown(self) -> None:
            if self._owed is not None:  # answer it first, then close (as uvicorn does
                self._owed.keep_alive = False  # for an ASGI request under way)
                return
            super().shutdown()

        def on_body(self, body: bytes) -> None:
            if self._direct is None:
                super().on_body(body)
            else:
                self._direct.body += body  # b"" + chunk is the chunk itself

        def on_message_complete(self) -> None:
            self._reading = False
            direct = self._direct
            if direct is None:
                if self.cycle is not None and self.cycle.response_complete:
                    # answered before its body was in (a 413): idle from now on
                    self._wait_on_client(connections.idle_timeout_s)
                else:
                    self._since, self.deadline = None, _NEVER
                super().on_message_complete()
                return
            self._since, self.deadline = None, _NEVER
            self._drop_direct()  # parsed now, run by the end of this loop step
            self._owed = direct  # until it is answered, this connection's next request
            # takes the ASGI lane and waits in the pipeline (_start_asgi_task): an answer
            # may come seconds later, from the worker thread (InferenceServer._hand_off),
            # and responses keep their order
            try:
                app.submit(direct, functools.partial(self._reply, direct))
            except Exception as exc:  # a bug, not the client: say so, keep serving
                log.exception("inference request failed")
                self._reply(direct, 500, error_body(f"internal error: {exc}"),
                            {"content-type": "application/json"})

        def _start_asgi_task(self, cycle: Any, asgi: Any) -> None:
            if self._owed is not None:  # its response comes after the one owed
                self._deferred = True
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, asgi))
                return
            super()._start_asgi_task(cycle, asgi)

        def _reply(self, direct: _Direct, status: int, payload: bytes,
                   headers: dict[str, str]) -> None:
            self._owed = None
            deferred, self._deferred = self._deferred, False
            if self.transport.is_closing():
                return  # the client left meanwhile
            out = [STATUS_LINE[status], _default_headers(self.server_state.default_headers)]
            for name, text in headers.items():
                out += [name.encode(), b": ", text.encode("latin-1"), b"\r\n"]
            out += [b"content-length: ", str(len(payload)).encode(), b"\r\n"]
            if not direct.keep_alive:
                out.append(b"connection: close\r\n")
            out += [b"\r\n", payload]
            self.transport.write_now(b"".join(out))  # type: ignore[attr-defined]
            app.metrics.observe(direct.label, status, time.perf_counter() - direct.start)
            if not direct.keep_alive:
                self.transport.close()
            elif deferred or self.cycle is None or self.cycle.response_complete:
                # what uvicorn does after an ASGI response: count it, start the
                # request waiting behind it, or arm the keep-alive timeout (cancelled
                # by the next request's bytes), and send a refusal that was waiting
                self._unset_keepalive_if_required()
                self.on_response_complete()
            else:  # a pipelined ASGI request is under way; its end arms the timeout
                self.server_state.total_requests += 1  # (and sends a refusal behind it)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self._refusal is not None:
                self._send_refusal_if_due()
                return
            if self._reading:  # the next request is still arriving: the client's turn
                self._since = self.loop.time()
            elif self.timeout_keep_alive_task is not None:  # uvicorn found nothing queued
                self._wait_on_client(connections.idle_timeout_s)

    return loop, InferenceHttpProtocol


def serve(
    repository: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    poll_interval: float = 0.5,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    threads: int | None = None,
    inline_budget_s: float = DEFAULT_INLINE_BUDGET_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    load_timeout_s: float | None = DEFAULT_LOAD_TIMEOUT_S,
    max_buffered_body_bytes: int = DEFAULT_MAX_BUFFERED_BODY,
    infer_timeout_s: float = DEFAULT_INFER_TIMEOUT_S,
    announce: Callable[[str], None] = print,
) -> None:
    """Bind and listen on `host:port` (0: any free port), serve until SIGINT/SIGTERM.

    The URL is announced once the server listens and has loaded its repository
    (each new version checked within `load_timeout_s`): scripts that wait for the
    line find the models served. Meanwhile it already answers (/v2/health/live,
    and /v2/health/ready with 400) and stops on SIGTERM.

    The soft limit on open files is raised to the hard limit, and the connection
    limit lowered to fit under it (`FD_RESERVE` descriptors kept for the rest).
    Logging is the caller's: uvicorn's records go to the root logger.

    Raises:
        OSError: the address cannot be bound.
        ValueError: invalid settings (see InferenceServer), an open-file limit too
            low for any connection, or a repository path that exists but is not a
            directory.
        RuntimeError: the application failed to start (e.g. an unreadable repository).
    """

    import uvicorn

    root = Path(repository)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--repository {root} exists but is not a directory")
    if not root.exists():
        log.warning("repository %s does not exist yet; serving nothing until a model "
                    "is installed there", root)
    open_files = _open_file_limit()
    if open_files - FD_RESERVE < 1:
        raise ValueError(f"the open-file limit of {open_files} leaves no descriptors for client "
                         f"connections; raise it above {FD_RESERVE} (LimitNOFILE=, ulimit -n)")
    if open_files - FD_RESERVE < max_connections:
        log.warning("at most %d client connections, not %d: the open-file limit is %d",
                    open_files - FD_RESERVE, max_connections, open_files)
        max_connections = open_files - FD_RESERVE
    server_app = InferenceServer(
        repository, poll_interval=poll_interval, max_body_bytes=max_body_bytes, threads=threads,
        inline_budget_s=inline_budget_s, max_connections=max_connections,
        idle_timeout_s=idle_timeout_s, request_timeout_s=request_timeout_s,
        max_header_bytes=max_header_bytes, load_timeout_s=load_timeout_s,
        max_buffered_body_bytes=max_buffered_body_bytes, infer_timeout_s=infer_timeout_s,
    )
    socks, shown, on = listening_sockets(host, port)
    bound = socks[0].getsockname()[1]
    loop, http = _loop_and_http(server_app)
    config = uvicorn.Config(
        server_app, loop=loop, http=http, lifespan="on", access_log=False,
        log_level="warning", backlog=BACKLOG,
        log_config=None,  # its records reach the root logger: the journal, under systemd
        timeout_keep_alive=idle_timeout_s,  # type: ignore[arg-type]  # a float works
        proxy_headers=False,  # nothing here reads the client address
        # no WebSocket route, and an upgraded connection would leave the HTTP
        # protocol without passing through connection_lost: uncounted by
        # _Connections. (What a host without a WebSocket library does anyway.)
        ws="none",
    )
    server_app.on_ready = lambda: announce(
        f"fedge serve listening on http://{shown}:{bound}{on} (repository {repository})")
    server = uvicorn.Server(config)
    ignore_sighup()
    server.run(sockets=socks)
    if not server.started:
        raise RuntimeError("start-up failed (the reason is logged above)")


def listening_sockets(host: str, port: int) -> tuple[list[Any], str, str]:
    """Listening TCP sockets for ``--host`` and ``--port`` (0: any free port, the same on
    every address): the sockets, the host as a URL shows it, and, for a name, " on
    ADDRESSES" for the announcement.

    ``host`` is an IP address, an IPv6 one in brackets or not (``[::1]`` was looked up
    as a name, "cannot listen on [[::1]]"), or a name: every address it resolves to,
    IPv4 and IPv6, is listened on (a name was resolved for IPv4 only, so
    ``--host localhost`` did not answer on ::1).

    Raises:
        OSError: an address cannot be bound (in use, not this host's), or the name does
            not resolve; the message names host and port, and the address for a name.
    """
    import ipaddress
    import socket

    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    shown = f"[{literal}]" if ":" in literal else literal
    try:
        ipaddress.ip_address(literal.partition("%")[0])
        is_name = False
    except ValueError:
        is_name = True
    try:
        infos = socket.getaddrinfo(literal, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        errno = getattr(exc, "errno", None)
        raise OSError(errno, f"cannot listen on {shown}:{port}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    addresses: dict[tuple[int, str], Any] = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            addresses.setdefault((family, str(sockaddr[0])), sockaddr)
    socks: list[Any] = []
    try:
        for (family, address), sockaddr in addresses.items():
            where = f"{shown}:{port}" + (f" (address {address})" if is_name else "")
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                # its IPv4 twin listens itself: a dual-stack socket would take its port
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port, *sockaddr[2:]))
                sock.listen(BACKLOG)  # uvicorn listens again (the same backlog)
            except OSError as exc:  # in use, not this host's address
                raise OSError(exc.errno, f"cannot listen on {where}: "
                                         f"{exc.strerror or exc}") from None
            sock.set_inheritable(True)
            port = port or sock.getsockname()[1]  # any free port: the same on each
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    on = ""
    if is_name:
        on = " on " + ", ".join(f"[{a}]" if ":" in a else a for _, a in addresses)
    return socks, shown, on


def ignore_sighup() -> None:
    """SIGHUP (an operator's `kill -HUP` to "reload") is logged and ignored: left to
    its default it ended the server at once, and systemd counts a death by SIGHUP as
    clean, so Restart=on-failure did not start it again. Models are picked up
    without a reload; the options are read at start."""
    import signal

    def warn(signum: int, frame: object) -> None:
        log.warning("SIGHUP received: reload is not supported (new model versions are "
                    "picked up by themselves; options are read at start: use systemctl "
                    "restart fedge-serve). Still serving")

    signal.signal(signal.SIGHUP, warn)


def _open_file_limit() -> int:
    """The soft limit on open files, raised to the hard limit first where allowed
    (systemd's default soft limit is 1024; a unit's system-call filter may forbid
    raising it, and then its LimitNOFILE= is what counts)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and (hard == unlimited or soft < hard):
        target = hard if hard != unlimited else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.info("the open-file limit stays at %d (raising it to %d: %s)", soft, target, exc)
    return soft if soft != unlimited else 1 << 20
