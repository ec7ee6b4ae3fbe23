"""Loaded model versions and the hot swap.

One onnxruntime `InferenceSession` per model version, shared by every request
(`InferenceSession.run` is thread-safe). `ModelStore.sync(repository)` compares
the repository with what is loaded: a new version directory is loaded in the
caller's thread (the watcher thread, never the event loop), checked with a
smoke inference, and only then published. Publishing replaces one immutable
dict, so a request that already holds the old `LoadedModel` finishes on it
while the next request sees the new one: no request waits and none fails.
The previous version stays loaded for rollback and for requests that name it.
A loaded version whose model file is no longer the one it was loaded from (its
inode, mtime or size changed: replaced by hand) is loaded again, so the server
never answers under a version number with a model that left the disk.

The check of a new version (a smoke inference, timing runs, the batching check)
runs first in a child process with a deadline (`load_timeout_s`, `check_in_child`):
a valid model whose inference never ends (an ONNX `Loop` with 10^12 trips passes
`onnx.checker`) would otherwise hold the store's lock for good, and no later
version, nor a rollback, would ever load. A version that misses the deadline is
killed, marked failed with the reason, and not tried again until its file changes.

A file still being written is not loaded (`settle_s`): a prefix of an ONNX file
that ends between two fields is itself a valid model (without its metadata, say).
A file whose last change was not a write (renamed into place, by `install` or by
hand, chmod-ed, its times set by `cp -p` or rsync), or whose directory was renamed
in after it was written, is taken at once; any other must have been left
unwritten for `settle_s` first.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedge.serve.protocol import DATATYPES, ONNX_TYPES, ParsedHeader, TensorSpec
from fedge.serve.repository import ModelRepository

log = logging.getLogger("fedge.serve")

KEEP_LOADED = 2  # the live version and the one before it
SMALL_MODEL_S = 0.0001  # one row faster than this: a single intra-op thread
SMOKE_AXIS = 32  # size of a free non-batch axis in the load check
# A new version's check (load_model) must end within this, in its child process.
DEFAULT_LOAD_TIMEOUT_S = 60.0
# The child's imports (numpy, onnxruntime) do not count against the deadline: on a
# busy host they alone can take seconds. They are bounded too.
CHECK_START_TIMEOUT_S = 120.0
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding fedge/


FileId = tuple[int, int, int]  # inode, mtime in ns, size


def file_id(path: Path) -> FileId | None:
    """What tells one model file from the next at the same path; None if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class ModelLoadError(RuntimeError):
    """A version on disk that cannot be served (it is skipped, the old one stays live)."""


def default_threads() -> int:
    """Intra-op threads per session: the CPUs this process may use, at most 4.

    `load_model` drops to one thread for models whose single-row inference is
    below SMALL_MODEL_S (the Cox model), where a thread pool only adds wake-ups.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers burn a core between requests; on a small appliance that
    # core is the HTTP server's.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ONNX_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, not servable here")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, datatype, shape)


@dataclass(frozen=True)
class LoadedModel:
    """One servable model version: its session, signature and measured speed.

    `row_seconds` is the best single-row inference time measured at load (the
    server runs requests whose estimated cost is below its inline budget on the
    event loop, the rest on a worker thread).
    """

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    row_seconds: float = 0.0
    # rows are computed independently (checked at load): requests may share a run
    batchable: bool = False
    # the file as it was just before loading: a different one means another model
    file: FileId | None = None
    row_bytes: int = field(init=False, repr=False, compare=False)
    # request headers already checked against this version's signature (protocol.py)
    parsed_headers: dict[bytes, ParsedHeader] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _input_names: frozenset[str] = field(init=False, repr=False, compare=False)
    _run: Callable[..., list[np.ndarray]] = field(init=False, repr=False, compare=False)
    _run_options: ort.RunOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # `InferenceSession.run` is a Python wrapper around the binding's `run`
        # that re-checks input names (the protocol layer already did, against
        # this very signature) and handles execution-provider fallback (there is
        # only the CPU provider here). At batch 1 on the Cox model that wrapper,
        # plus pybind11's failed conversion of run_options=None, was a third of
        # the call; the binding itself still validates every feed's type and shape.
        run = getattr(self.session, "_sess", self.session).run
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_run_options", ort.RunOptions())
        object.__setattr__(self, "_input_names", frozenset(s.name for s in self.inputs))
        # bytes of one row of every input (a free non-batch axis counts as 1)
        object.__setattr__(self, "row_bytes", max(1, sum(
            DATATYPES[s.datatype].itemsize * math.prod(max(d, 1) for d in s.shape[1:])
            for s in self.inputs if s.datatype in DATATYPES
        )))

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str],
            run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        """The outputs named, in that order, for `feeds` (input name -> array);
        `run_options`: this run's own (`RunDeadlines.start`), else the model's shared ones.

        Raises:
            ValueError: `feeds` has more or fewer entries than the model has inputs
                (the binding does not check for a missing one itself).
            onnxruntime's InvalidArgument: a feed with a name the model does not
                have, or of the wrong type or shape; other onnxruntime errors when
                the model fails.
        """
        if len(feeds) != len(self._input_names):
            want = sorted(self._input_names)
            raise ValueError(
                f"{self.name} version {self.version} takes inputs {want}, got {sorted(feeds)}"
            )
        return self._run(  # type: ignore[no-any-return]
            output_names, feeds, self._run_options if run_options is None else run_options)


class RunDeadlines:
    """Stops onnxruntime runs that pass their deadline.

    Each watched run has RunOptions of its own (`start`); one thread sets their
    `terminate` flag once a run is past due, and onnxruntime then fails the run
    between two nodes (or two iterations of a Loop) with an error. A model that
    passed its load check can still run for days on some inputs (a Loop whose
    trip count comes from the input): without a deadline that run would hold the
    server's worker thread, or its event loop, for good.

    On the request path a deadline costs about a microsecond: a dict entry set and
    popped (each one atomic in CPython: no lock), and no thread switch, since the
    thread looks at least once a second and runs are due a second or more later;
    only an earlier deadline wakes it.
    """

    LOOK_S = 1.0

    def __init__(self) -> None:
        self._due: dict[int, tuple[float, ort.RunOptions]] = {}
        self._wake = threading.Event()
        self._wakes_at = -math.inf  # when the thread next looks (none yet: wake it)
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> ort.RunOptions:
        """RunOptions for one run, to be stopped in `seconds`; pass them to `stop` after."""
        options = ort.RunOptions()
        # the stop itself is reported by the caller; onnxruntime would also log it
        # as an error of its own on stderr (journald) for every run stopped
        options.log_severity_level = 4
        due = time.monotonic() + seconds
        if self._thread is None:
            with self._started:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._watch, name="fedge-run-deadlines", daemon=True)
                    self._thread.start()
        self._due[id(options)] = (due, options)
        if due < self._wakes_at:
            self._wake.set()
        return options

    def stop(self, options: ort.RunOptions) -> None:
        """The run with `options` is over: no deadline for it any more."""
        self._due.pop(id(options), None)

    @property
    def watched(self) -> int:
        """Runs with a deadline now (for tests and metrics)."""
        return len(self._due)

    def _watch(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            wakes_at = now + self.LOOK_S
            for key, (due, options) in self._due.copy().items():
                if due <= now:
                    options.terminate = True
                    self._due.pop(key, None)
                else:
                    wakes_at = min(wakes_at, due)
            self._wakes_at = wakes_at
            # a run started between the copy and here, due before wakes_at, has set
            # the event already (it read the older, later wakes_at) or reads this one
            self._wake.wait(max(0.0, wakes_at - time.monotonic()))


def open_session(
    name: str, version: int, path: Path, *, threads: int
) -> tuple[ort.InferenceSession, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The session of one version, and its inputs and outputs (no inference is run).

    Raises:
        ModelLoadError: the file is missing, not ONNX, or uses unsupported types.
    """
    try:
        session = ort.InferenceSession(
            str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelLoadError(f"{name} version {version}: cannot load {path}: {exc}") from None
    inputs = tuple(_spec(a) for a in session.get_inputs())
    outputs = tuple(_spec(a) for a in session.get_outputs())
    for spec in (*inputs, *outputs):
        if spec.datatype not in DATATYPES:
            raise ModelLoadError(
                f"{name} version {version}: tensor {spec.name!r} is {spec.datatype}, "
                "which this server does not serve"
            )
    return session, inputs, outputs


@dataclass(frozen=True)
class LoadCheck:
    """What a version's check measured in its child process (`check_in_child`)."""

    threads: int
    row_seconds: float
    batchable: bool


def load_model(name: str, version: int, path: Path, *, threads: int,
               checked: LoadCheck | None = None) -> LoadedModel:
    """Load and check one version: session built, a smoke inference gives finite outputs.

    With `checked` (the same file passed `check_in_child`), the session gets the
    thread count found there and its timing and batching results; only the smoke
    inference runs here (it also warms the session up for the first request).

    Raises:
        ModelLoadError: the file is missing, not ONNX, uses unsupported types, or its
            smoke inference fails or gives non-finite numbers.
    """
    loaded_file = file_id(path)  # before reading: a change meanwhile shows next time
    if checked is not None:
        threads = checked.threads
    session, inputs, outputs = open_session(name, version, path, threads=threads)
    # Smoke input: one row; other free axes (sequence length, image size) get a
    # size that strided convolutions and pooling accept.
    feeds = {
        s.name: np.zeros(
            [d if d >= 0 else (1 if i == 0 else SMOKE_AXIS) for i, d in enumerate(s.shape)],
            dtype=DATATYPES[s.datatype],
        )
        for s in inputs
    }
    try:
        results = session.run(None, feeds)
    except Exception as exc:
        raise ModelLoadError(f"{name} version {version}: smoke inference failed: {exc}") from None
    for spec, res in zip(outputs, results, strict=True):
        if res.dtype.kind == "f" and not np.all(np.isfinite(res)):
            raise ModelLoadError(
                f"{name} version {version}: output {spec.name!r} is not finite on a zero input"
            )
    meta = session.get_modelmeta().custom_metadata_map
    if checked is not None:
        return LoadedModel(
            name, version, path, session, inputs, outputs, dict(meta), threads,
            checked.row_seconds, checked.batchable, loaded_file,
        )
    row_seconds = _single_row_seconds(session, feeds)
    if threads > 1 and row_seconds < SMALL_MODEL_S:
        # A model this small never gains from the intra-op pool, and waking its
        # workers costs more than the whole inference (and jitter on a busy host).
        threads = 1
        session = ort.InferenceSession(
            str(path), sess_options=session_options(1), providers=["CPUExecutionProvider"]
        )
        row_seconds = _single_row_seconds(session, feeds)
    return LoadedModel(
        name, version, path, session, inputs, outputs, dict(meta), threads, row_seconds,
        _rows_independent(session, inputs), loaded_file,
    )


def check_in_child(name: str, version: int, path: Path, *, threads: int, timeout_s: float,
                   started: Callable[[subprocess.Popen[bytes]], None] | None = None) -> LoadCheck:
    """Run `load_model` on `path` in a child process; what it measured.

    The deadline `timeout_s` counts from when the child has imported onnxruntime
    (at most CHECK_START_TIMEOUT_S): the model's load and inferences, not the
    host's import speed. The child is killed when it is missed, and dies with this
    process (PR_SET_PDEATHSIG). `started` is given the child as soon as it runs (to
    kill it from another thread: the check then fails).

    Raises:
        ModelLoadError: the check failed (the child's reason), missed its deadline,
            or the child died or could not be started.
    """
    cmd = [sys.executable, "-c", "from fedge.serve.runtime import _child_check; _child_check()",
           name, str(version), str(path), str(threads), str(os.getpid())]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, close_fds=True)
    except OSError as exc:
        raise ModelLoadError(
            f"{name} version {version}: cannot start the process that checks it: {exc}"
        ) from None
    if started is not None:
        started(proc)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + CHECK_START_TIMEOUT_S
    ready = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if ready:
                    raise ModelLoadError(
                        f"{name} version {version}: its check (a trial inference, timing runs "
                        f"and a batching check) did not end within {timeout_s:g} s "
                        "(--load-timeout): an inference of this model may never end"
                    )
                raise ModelLoadError(
                    f"{name} version {version}: the process that checks it did not start "
                    f"within {CHECK_START_TIMEOUT_S:g} s"
                )
            readable, _, _ = select.select([proc.stdout], [], [], left)
            if not readable:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if not ready and b"\n" in out:
                ready = True
                out = out.split(b"\n", 1)[1]
                deadline = time.monotonic() + timeout_s
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    try:
        result = json.loads(out)
    except ValueError:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise ModelLoadError(
            f"{name} version {version}: the process that checks it {how} before it gave a "
            "result (out of memory? a crash in onnxruntime?)"
        ) from None
    if "error" in result:
        raise ModelLoadError(str(result["error"]))
    return LoadCheck(int(result["threads"]), float(result["row_seconds"]),
                     bool(result["batchable"]))


def _child_check() -> None:
    """The child of `check_in_child`: argv is name, version, path, threads, parent pid.
    Writes "ready" once imported, then one JSON line: what load_model measured, or
    {"error": why}."""
    name, version, path, threads, parent = sys.argv[1:6]
    _die_with_parent(int(parent))
    print("ready", flush=True)
    try:
        model = load_model(name, int(version), Path(path), threads=int(threads))
        result: dict[str, object] = {"threads": model.threads, "row_seconds": model.row_seconds,
                                     "batchable": model.batchable}
    except ModelLoadError as exc:
        result = {"error": str(exc)}
    except Exception as exc:  # onnxruntime failing in a way load_model does not name
        result = {"error": f"{name} version {version}: its check failed: {exc}"}
    print(json.dumps(result), flush=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux): a check
    spinning in a model's endless loop must not outlive a killed server."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


BATCH_CHECK_ROWS = 3


def _rows_independent(session: ort.InferenceSession, inputs: Sequence[TensorSpec]) -> bool:
    """Whether each output row depends on its own input row only: random rows run
    together give what they give one at a time (every output keeps the batch axis).

    A model that mixes rows (a batch statistic, a reshape across the batch) fails
    this and never has requests batched together.
    """
    if not inputs or any(not s.shape or s.shape[0] != -1 for s in inputs):
        return False
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for s in inputs:
        shape = [BATCH_CHECK_ROWS, *(d if d >= 0 else SMOKE_AXIS for d in s.shape[1:])]
        dtype = DATATYPES[s.datatype]
        values = rng.standard_normal(shape) if dtype.kind == "f" else rng.integers(0, 2, shape)
        feeds[s.name] = values.astype(dtype)
    try:
        together = session.run(None, feeds)
        alone = [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()})
                 for i in range(BATCH_CHECK_ROWS)]
    except Exception:
        return False
    for j, out in enumerate(together):
        if out.ndim == 0 or out.shape[0] != BATCH_CHECK_ROWS:
            return False
        stacked = np.concatenate([a[j] for a in alone])
        if stacked.shape != out.shape or not np.allclose(out, stacked, rtol=1e-4, atol=1e-5):
            return False
    return True


def _single_row_seconds(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    times = []
    for _ in range(20):  # the minimum of several: robust to a busy host
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass(frozen=True)
class ModelVersions:
    """What is loaded of one model: versions ascending; the live one is the last."""

    loaded: dict[int, LoadedModel]

    @property
    def live(self) -> LoadedModel:
        return self.loaded[max(self.loaded)]


class UnknownModel(LookupError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelStore:
    """Loaded models, swapped atomically by `sync`; `get` never blocks."""

    def __init__(self, *, threads: int | None = None, keep: int = KEEP_LOADED,
                 load_timeout_s: float | None = None, settle_s: float = 0.0):
        """`load_timeout_s`: check each new version in a child process, which must
        end within that many seconds (`check_in_child`); None checks it in this
        process, with no deadline (for tests and tools that load trusted models).
        `settle_s`: a file still being written waits this long (module docstring).

        Raises: ValueError for a `load_timeout_s` that is not a finite number > 0.
        """
        if load_timeout_s is not None and not 0 < load_timeout_s < math.inf:
            raise ValueError(f"load_timeout_s {load_timeout_s!r} must be a finite number of "
                             "seconds > 0")
        self.threads = threads or default_threads()
        self.keep = keep
        self.load_timeout_s = load_timeout_s
        self.settle_s = settle_s
        # files seen unsettled: their id and since when (monotonic) it has not changed
        self._unsettled: dict[Path, tuple[FileId, float]] = {}
        self._child: subprocess.Popen[bytes] | None = None  # a check running now
        self._closed = False
        self._models: dict[str, ModelVersions] = {}
        self._failed: dict[Path, FileId] = {}
        self.failures: dict[tuple[str, int], str] = {}  # (model, version) -> why not served
        self._lock = threading.Lock()  # serialises sync(), never taken by get()
        self.on_swap: Callable[[str, int], None] | None = None
        self.on_load_failure: Callable[[str, int, str], None] | None = None

    def names(self) -> list[str]:
        return sorted(self._models)

    def close(self) -> None:
        """Stop loading: a check running now is killed (its version is not marked
        failed), and later syncs load nothing new."""
        self._closed = True
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()

    def has(self, name: str) -> bool:
        return name in self._models

    def versions(self, name: str) -> list[int]:
        entry = self._models.get(name)
        return sorted(entry.loaded) if entry else []

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The live version of `name`, or the named version.

        Raises:
            UnknownModel: no such model, a version that is not a number in ASCII
                digits, or one that is not loaded.
        """
        entry = self._models.get(name)
        if entry is None:
            raise UnknownModel(f"unknown model '{name}'")
        if version is None or version == "":
            return entry.live
        # str.isdigit() alone takes "²" (which int() refuses: a 500) and "١" (which
        # int() reads as 1: another name for version 1); 20 digits bound int()'s work
        if not (version.isascii() and version.isdigit() and len(version) <= 20):
            raise UnknownModel(f"unknown version '{version}' of model '{name}'")
        found = entry.loaded.get(int(version))
        if found is None:
            have = ", ".join(str(v) for v in sorted(entry.loaded))
            raise UnknownModel(
                f"unknown version '{version}' of model '{name}' (loaded: {have})"
            )
        return found

    def sync(self, repo: ModelRepository) -> list[tuple[str, int]]:
        """Load what is new in `repo` and drop what left it.

        Returns the (model, version) pairs that became live.
        """
        swapped: list[tuple[str, int]] = []
        with self._lock:
            current = dict(self._models)
            on_disk = {name: repo.versions(name) for name in repo.models()}
            for name in list(current):
                if name not in on_disk:
                    del current[name]
            for name, versions in on_disk.items():
                have = current[name].loaded if name in current else {}
                # a version whose file was replaced is another model: load it again
                loaded = {v: m for v, m in have.items()
                          if v in versions and m.file == file_id(repo.path(name, v))}
                # the newest `keep` versions that load: one that does not is passed
                # over for the next older (a pushed model onnxruntime cannot run must
                # not leave a restarted server with nothing to serve)
                servable = 0
                for v in reversed(versions):
                    if servable >= self.keep:
                        break
                    if v not in loaded:
                        model = self._try_load(repo, name, v)
                        if model is None:
                            continue
                        loaded[v] = model
                    servable += 1
                # keep at most `keep`, newest first
                for v in sorted(loaded)[: -self.keep]:
                    del loaded[v]
                if loaded:
                    before = max(have) if have else None
                    new_live = loaded[max(loaded)]
                    if before is not None and before in have and (
                        have[before].inputs != new_live.inputs
                        or have[before].outputs != new_live.outputs
                    ):
                        log.warning(
                            "%s version %d changes the signature of version %d: inputs %s, "
                            "outputs %s; clients built for the old one will get 400s",
                            name, new_live.version, before, new_live.inputs, new_live.outputs,
                        )
                    current[name] = ModelVersions(loaded)
                    if before is None or new_live is not have[before]:
                        swapped.append((name, new_live.version))
                else:
                    current.pop(name, None)
            self._models = current  # the swap: one reference assignment
        for name, version in swapped:
            log.info("serving %s version %d", name, version)
            if self.on_swap:
                self.on_swap(name, version)
        return swapped

    def _try_load(self, repo: ModelRepository, name: str, version: int) -> LoadedModel | None:
        path = repo.path(name, version)
        stamp = file_id(path)
        if stamp is None:
            return None
        if self._failed.get(path) == stamp:
            return None  # same bytes failed before; retry only when the file changes
        if self._closed or not self._settled(path):
            return None
        try:
            checked = None
            if self.load_timeout_s is not None:
                # what fails without running the model fails here, at once (a file
                # that is not ONNX, a string tensor), not after the child's start-up
                open_session(name, version, path, threads=1)
                checked = check_in_child(name, version, path, threads=self.threads,
                                         timeout_s=self.load_timeout_s, started=self._started)
                if file_id(path) != stamp:
                    return None  # replaced while checked: the next scan checks the new one
            model = load_model(name, version, path, threads=self.threads, checked=checked)
        except ModelLoadError as exc:
            if self._closed:
                return None  # killed by close(): not the model's fault
            self._failed[path] = stamp
            self.failures[(name, version)] = str(exc)
            log.warning("not serving %s", exc)
            if self.on_load_failure:
                self.on_load_failure(name, version, str(exc))
            return None
        finally:
            self._child = None
        self._failed.pop(path, None)
        self.failures.pop((name, version), None)
        return model

    def _settled(self, path: Path) -> bool:
        """Whether the model file at `path` is done being written, as far as its
        times tell (module docstring)."""
        if self.settle_s <= 0:
            return True
        try:
            st = path.stat()
            folder = path.parent.stat()
        except OSError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if (st.st_ctime_ns > st.st_mtime_ns or folder.st_ctime_ns > st.st_mtime_ns
                or time.time_ns() - st.st_mtime_ns >= self.settle_s * 1e9):
            self._unsettled.pop(path, None)
            return True
        # written within settle_s, or a clock behind the file's times: the file must
        # stay as it is for settle_s as seen from here
        now = time.monotonic()
        seen = self._unsettled.get(path)
        if seen is None or seen[0] != stamp:
            self._unsettled[path] = (stamp, now)
            return False
        if now - seen[1] < self.settle_s:
            return False
        del self._unsettled[path]
        return True

    def _started(self, child: subprocess.Popen[bytes]) -> None:
        self._child = child
        if self._closed:
            child.kill()


class Watcher:
    """Polls the repository in a daemon thread and calls `store.sync` on it: at once
    when started (then `on_first_sync` is called, from that thread), then every
    `interval` seconds."""

    def __init__(self, store: ModelStore, repo: ModelRepository, interval: float,
                 on_first_sync: Callable[[], None] | None = None):
        if not interval > 0:
            raise ValueError(f"poll interval {interval!r} must be > 0 seconds")
        self.store, self.repo, self.interval = store, repo, interval
        self.on_first_sync = on_first_sync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedge-serve-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.store.close()  # a check under way is killed, not waited for
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        self._sync()
        if self.on_first_sync is not None and not self._stop.is_set():
            self.on_first_sync()
        while not self._stop.wait(self.interval):
            self._sync()

    def _sync(self) -> None:
        try:
            self.store.sync(self.repo)
        except Exception:  # a scan that races a deletion: try again next tick
            log.exception("repository scan failed")
