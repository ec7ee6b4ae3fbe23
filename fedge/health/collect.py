"""Reading the health of this appliance: NVML (nvidia-ml-py) and psutil.

Every NVML call goes through the ``pynvml`` module attribute at call time, so
tests replace nvidia-ml-py's functions (``pynvml.nvmlInit`` …) and nothing
else. One metric a device does not support (``NVMLError_NotSupported``) is
recorded in ``GpuReading.unsupported`` and the rest is still read; any other
NVML error on one metric lands in ``GpuReading.errors`` under the metric name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pynvml

from fedge.health.report import GpuReading, HealthReport, HostReading, XidEvent

__all__ = ["CLOCKS_EVENT_REASONS", "STATE_DIR_PROBLEM", "XidMonitor", "collect",
           "decode_clocks_event_reasons", "os_error_kind", "state_dir_problem"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# nvmlClocksEventReason* bits → names (nvml.h); "None" (0) decodes to an empty list.
CLOCKS_EVENT_REASONS: tuple[tuple[int, str], ...] = (
    (0x001, "GpuIdle"),
    (0x002, "ApplicationsClocksSetting"),
    (0x004, "SwPowerCap"),
    (0x008, "HwSlowdown"),
    (0x010, "SyncBoost"),
    (0x020, "SwThermalSlowdown"),
    (0x040, "HwThermalSlowdown"),
    (0x080, "HwPowerBrakeSlowdown"),
    (0x100, "DisplayClockSetting"),
)


def decode_clocks_event_reasons(mask: int) -> list[str]:
    """Names of the set bits of a clocks-event (or, before r535, throttle) reason mask.

    Unknown bits are kept as ``"0x..."`` so a newer driver's reason is not lost.

    Raises:
        ValueError: ``mask`` is negative.
    """
    if mask < 0:
        raise ValueError(f"clocks-event reason mask {mask} must be >= 0")
    names = [name for bit, name in CLOCKS_EVENT_REASONS if mask & bit]
    known = 0
    for bit, _ in CLOCKS_EVENT_REASONS:
        known |= bit
    unknown = mask & ~known
    bit = 1
    while unknown:
        if unknown & bit:
            names.append(f"0x{bit:x}")
            unknown &= ~bit
        bit <<= 1
    return names


def nvml_error_name(exc: BaseException) -> str:
    """``NVMLError_LibraryNotFound`` → ``"LibraryNotFound"``."""
    return type(exc).__name__.removeprefix("NVMLError_")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _GpuReader:
    """Reads one metric at a time and records what the device did not support."""

    def __init__(self, reading: GpuReading) -> None:
        self.reading = reading

    def read(self, metric: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except pynvml.NVMLError_NotSupported:
            self.reading.unsupported.append(metric)
        except pynvml.NVMLError as exc:
            self.reading.errors[metric] = nvml_error_name(exc)
        return None


# Newest first: the clocks-event reasons came with driver r535 (and nvidia-ml-py 12.535)
# under a new name for the throttle reasons, with the same bits. An older driver answers
# the new name with FunctionNotFound; older bindings do not have it at all.
_CLOCKS_EVENT_REASON_CALLS = ("nvmlDeviceGetCurrentClocksEventReasons",
                              "nvmlDeviceGetCurrentClocksThrottleReasons")


def _clocks_event_reasons(handle: Any) -> int:
    """The device's clocks-event reason mask, from whichever call the driver and the
    bindings have.

    Raises:
        NVMLError_NotSupported: neither call exists here (the metric is absent, as on
            a device that does not report it, not an error).
        NVMLError: as the call raises it.
    """
    for name in _CLOCKS_EVENT_REASON_CALLS:
        call = getattr(pynvml, name, None)
        if call is None:
            continue
        try:
            return int(call(handle))
        except pynvml.NVMLError_FunctionNotFound:
            continue
    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


def _read_gpu(index: int) -> GpuReading:
    reading = GpuReading(index=index)
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except pynvml.NVMLError as exc:
        reading.errors["handle"] = nvml_error_name(exc)
        return reading
    r = _GpuReader(reading)
    name = r.read("name", lambda: pynvml.nvmlDeviceGetName(handle))
    reading.name = None if name is None else _text(name)
    uuid = r.read("uuid", lambda: pynvml.nvmlDeviceGetUUID(handle))
    reading.uuid = None if uuid is None else _text(uuid)

    temp = r.read(
        "temperature", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    )
    reading.temperature_c = None if temp is None else float(temp)
    slow = r.read(
        "slowdown_temp",
        lambda: pynvml.nvmlDeviceGetTemperatureThreshold(
            handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        ),
    )
    reading.slowdown_temp_c = None if slow is None else float(slow)
    shut = r.read(
        "shutdown_temp",
        lambda: pynvml.nvmlDeviceGetTemperatureThreshold(
            handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
        ),
    )
    reading.shutdown_temp_c = None if shut is None else float(shut)

    power = r.read("power", lambda: pynvml.nvmlDeviceGetPowerUsage(handle))  # mW
    reading.power_w = None if power is None else power / 1000.0
    limit = r.read("power_limit", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    reading.power_limit_w = None if limit is None else limit / 1000.0

    mem = r.read("memory", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    if mem is not None:
        reading.memory_used_bytes = int(mem.used)
        reading.memory_total_bytes = int(mem.total)
    util = r.read("utilization", lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
    if util is not None:
        reading.utilization_gpu_pct = float(util.gpu)
        reading.utilization_memory_pct = float(util.memory)
    sm = r.read("sm_clock", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    reading.sm_clock_mhz = None if sm is None else int(sm)
    reasons = r.read("clocks_event_reasons", lambda: _clocks_event_reasons(handle))
    reading.clocks_event_reasons = None if reasons is None else decode_clocks_event_reasons(
        int(reasons)
    )

    reading.ecc_uncorrected_volatile = r.read(
        "ecc_uncorrected_volatile",
        lambda: int(
            pynvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
            )
        ),
    )
    reading.ecc_uncorrected_aggregate = r.read(
        "ecc_uncorrected_aggregate",
        lambda: int(
            pynvml.nvmlDeviceGetTotalEccErrors(
                handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC
            )
        ),
    )
    # Pre-Ampere GPUs retire pages; Ampere and later remap rows (the other is NotSupported).
    sbe = r.read(
        "retired_pages",
        lambda: pynvml.nvmlDeviceGetRetiredPages(
            handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        ),
    )
    if sbe is not None:
        reading.retired_pages_sbe = len(sbe)
        dbe = r.read(
            "retired_pages_dbe",
            lambda: pynvml.nvmlDeviceGetRetiredPages(
                handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            ),
        )
        reading.retired_pages_dbe = None if dbe is None else len(dbe)
        pending = r.read(
            "retired_pages_pending",
            lambda: pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle),
        )
        reading.retired_pages_pending = None if pending is None else bool(pending)
    rows = r.read("remapped_rows", lambda: pynvml.nvmlDeviceGetRemappedRows(handle))
    if rows is not None:
        corr, unc, pending_remap, failed = rows
        reading.remapped_rows_correctable = int(corr)
        reading.remapped_rows_uncorrectable = int(unc)
        reading.remapping_pending = bool(pending_remap)
        reading.remapping_failed = bool(failed)
    replay = r.read("pcie_replay", lambda: pynvml.nvmlDeviceGetPcieReplayCounter(handle))
    reading.pcie_replay_count = None if replay is None else int(replay)
    return reading


def read_host(state_dir: str | os.PathLike[str]) -> HostReading:
    """CPU, memory and the free disk of the filesystem holding ``state_dir``.

    A state directory not created yet is measured at its nearest existing parent.

    Raises:
        ValueError: neither ``state_dir`` nor any parent exists.
    """
    path = Path(state_dir).absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            raise ValueError(f"state_dir {str(state_dir)!r}: no existing parent to measure")
        probe = probe.parent
    disk = psutil.disk_usage(str(probe))
    mem = psutil.virtual_memory()
    return HostReading(
        cpu_count=psutil.cpu_count() or 1,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_1m=float(os.getloadavg()[0]),
        memory_total_bytes=int(mem.total),
        memory_available_bytes=int(mem.available),
        state_dir=str(path),
        disk_total_bytes=int(disk.total),
        disk_free_bytes=int(disk.free),
    )


# The attribute of a collected HealthReport that holds why its state directory cannot
# be written ("" when it can; absent from a report not collected here, e.g. a fixture).
# Not a field of the report (fedge.health.report): the policy reads it where the report
# is collected, and the verdict's reason carries it to the coordinator.
STATE_DIR_PROBLEM = "state_dir_problem"
PROBE_FILE = ".fedge-health-probe"


def os_error_kind(exc: OSError) -> str:
    """``exc`` without the file it names: ``"[Errno 28] No space left on device"``, as
    ``str(exc)`` reads less its ``: '/path'``; the type's name when it has no errno."""
    if exc.errno is None or not exc.strerror:
        return type(exc).__name__
    return f"[Errno {exc.errno}] {exc.strerror}"


# The state directory's problem last written to the journal: the probe runs with every
# heartbeat, and one failing disk is told there once (again when what fails changes).
_journalled: dict[str, str] = {}
_journalled_lock = threading.Lock()


# The directories under the state directory that a round writes: the privacy ledger
# (fedge.agent.trainer.ledger_path), the SecAgg reveal log (secagg/revealed.jsonl) and
# the job state (jobs/). One that the agent's user cannot write (e.g. left by a `sudo
# fedge agent run`) lets the top of the state dir pass the probe while every round the
# site is picked for is refused.
ROUND_DIRS = ("privacy", "secagg", "jobs")


def state_dir_problem(state_dir: str | os.PathLike[str]) -> str:
    """Why ``state_dir``, or one of the directories under it that a round writes
    (`ROUND_DIRS`), cannot be written, or "" when they can: a small file is created in
    each, written, fsynced and removed. A file system remounted read-only (after an I/O
    error) or full, or a directory replaced by a file, still reports free space; this
    is what the agent meets when it saves its privacy ledger and reveal log, and then
    withholds the update. A directory not created yet is not probed (the agent makes it
    when first needed, in a directory the probe found writable).

    The text goes to the coordinator (the eligibility reason of every heartbeat), which
    keeps it: it names the directory under the state dir (``privacy/``; not the state
    dir's own path), the step of the probe that failed and the error's kind; the whole
    error, with the path (and, for permissions, the chown that mends it), is written to
    this appliance's journal, once for as long as it stays the same.

    Runs where ``collect`` runs, on the agent's health-probe thread (an fsync on a
    failing disk may block: the heartbeats do not wait for it)."""
    path = Path(state_dir).absolute()
    if not os.path.lexists(path):
        return ""
    for sub in ("", *ROUND_DIRS):
        directory = path / sub if sub else path
        if sub and not os.path.lexists(directory):
            continue
        step, exc = _probe(directory)
        if exc is None:
            continue
        what = f"state directory's {sub}/" if sub else "state directory"
        problem = (f"{what} cannot be written (the health probe could not {step} a file "
                   f"in it): {os_error_kind(exc)}")
        hint = ""
        if exc.errno in (errno.EACCES, errno.EPERM):
            hint = (f"; the state directory must belong to the user the agent runs as "
                    f"(e.g. chown -R fedge: {path})")
        _journal(str(path), problem, f"state dir {directory} cannot be written: {exc}{hint}")
        return problem
    _journal(str(path), "", "")
    return ""


def _probe(directory: Path) -> tuple[str, OSError | None]:
    """Create, write, fsync and remove a small file in ``directory``: the step that
    failed and its error, or (``"remove"``, None) when none did."""
    probe = directory / f"{PROBE_FILE}-{os.getpid()}-{threading.get_ident()}"
    step = "create"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            step = "write"
            os.write(fd, b"fedge health probe\n")
            step = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
        step = "remove"
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return step, exc
    return step, None


def _journal(key: str, problem: str, text: str) -> None:
    """Write ``text`` to the journal when ``problem`` is new for ``key``."""
    with _journalled_lock:
        if _journalled.get(key, "") == problem:
            return
        _journalled[key] = problem
    if problem:
        log.warning("%s", text)
    else:
        log.info("state dir %s can be written again", key)


_PROBE_NAME = re.compile(re.escape(PROBE_FILE) + r"-(\d+)-(\d+)")


def remove_stale_probes(state_dir: str | os.PathLike[str], *,
                        grace_s: float = 60.0) -> list[Path]:
    """Remove the probe files of :func:`state_dir_problem` that a process killed
    during the probe's write or fsync left in ``state_dir`` or a directory under it
    that it probes (`ROUND_DIRS`): regular files named ``PROBE_FILE-<pid>-<thread>``
    whose pid is no live process and that were last modified more than ``grace_s``
    ago (their name holds a pid, so no later probe replaces them). A probe of a live
    process (an agent, ``fedge health``) is left alone. Never raises: what cannot be
    removed is logged. Returns the paths removed."""
    entries: list[os.DirEntry[str]] = []
    for sub in ("", *ROUND_DIRS):
        try:
            entries += [e for e in os.scandir(Path(state_dir) / sub)
                        if _PROBE_NAME.fullmatch(e.name)]
        except OSError:  # no such directory yet, or unreadable: the probe says so
            continue
    removed = []
    for entry in entries:
        pid = int(_PROBE_NAME.fullmatch(entry.name).group(1))  # type: ignore[union-attr]
        try:
            if (not entry.is_file(follow_symlinks=False) or _alive(pid)
                    or entry.stat(follow_symlinks=False).st_mtime > time.time() - grace_s):
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale health probe file %s: %s", entry.path, exc)
            continue
        removed.append(Path(entry.path))
        log.info("removed %s, left by a health probe that did not finish", entry.path)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def collect(
    state_dir: str | os.PathLike[str], *, xid_monitor: XidMonitor | None = None
) -> HealthReport:
    """A fresh :class:`HealthReport` for this appliance.

    The state directory is probed for writing (:func:`state_dir_problem`); the report
    holds the outcome as its ``STATE_DIR_PROBLEM`` attribute, which the eligibility
    policy reads.

    Without a driver the report's ``nvml`` says ``"no GPU (NVML: LibraryNotFound)"``
    (or the error met) and ``gpus`` is empty; the policy decides whether
    CPU-only training is allowed. ``xid_monitor`` contributes the XID events it
    has seen.

    Raises:
        ValueError: ``state_dir`` has no existing parent.
    """
    host = read_host(state_dir)
    gpus: list[GpuReading] = []
    driver: str | None = None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        status = f"no GPU (NVML: {nvml_error_name(exc)})"
    else:
        try:
            with contextlib.suppress(pynvml.NVMLError):
                driver = _text(pynvml.nvmlSystemGetDriverVersion())
            try:
                count = int(pynvml.nvmlDeviceGetCount())
            except pynvml.NVMLError as exc:
                status = f"no GPU (NVML: {nvml_error_name(exc)})"
            else:
                status = "ok" if count else "no GPU (NVML: no devices)"
                gpus = [_read_gpu(i) for i in range(count)]
        finally:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()
    # the events dated from the monotonic clock against this same wall-clock reading
    # (XidMonitor.events): their age in the report is true across wall-clock steps
    now = time.time()
    events = xid_monitor.events(wall=now) if xid_monitor is not None else []
    report = HealthReport(
        time=now, nvml=status, driver_version=driver, gpus=gpus, host=host,
        xid_events=events,
    )
    setattr(report, STATE_DIR_PROBLEM, state_dir_problem(state_dir))
    return report


class XidMonitor:
    """A background thread waiting on an NVML event set for XID critical errors.

    ``start()`` returns False (and starts no thread) when NVML or the event API
    is unavailable; ``reason`` says why. Events are kept in a bounded deque, each
    stamped with the monotonic clock when it arrived: ``events()`` dates it from
    that, so a step of the wall clock (NTP, an RTC put right) neither ages an event
    nor makes it new again (see ``events``).
    """

    def __init__(self, *, poll_ms: int = 500, max_events: int = 256) -> None:
        if poll_ms <= 0:
            raise ValueError(f"poll_ms {poll_ms} must be > 0")
        if max_events <= 0:
            raise ValueError(f"max_events {max_events} must be > 0")
        self.poll_ms = poll_ms
        # (gpu index, xid, time.monotonic() when the event set delivered it)
        self._events: deque[tuple[int | None, int, float]] = deque(maxlen=max_events)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._event_set: Any = None
        self._initialised = False
        self.reason: str = "not started"
        self.registered: list[int] = []

    def start(self) -> bool:
        """Register every GPU for XID critical events and start the waiting thread."""
        if self._thread is not None:
            return True
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.reason = f"NVML: {nvml_error_name(exc)}"
            return False
        self._initialised = True
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
            for i in range(int(pynvml.nvmlDeviceGetCount())):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                try:
                    pynvml.nvmlDeviceRegisterEvents(
                        handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set
                    )
                except pynvml.NVMLError_NotSupported:
                    continue
                self.registered.append(i)
        except pynvml.NVMLError as exc:
            self.reason = f"NVML: {nvml_error_name(exc)}"
            self._release()
            return False
        if not self.registered:
            self.reason = "no GPU supports XID events"
            self._release()
            return False
        self.reason = "running"
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedge-xid", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, self.poll_ms)
            except pynvml.NVMLError_Timeout:
                continue
            except pynvml.NVMLError as exc:
                self.reason = f"stopped: NVML: {nvml_error_name(exc)}"
                log.warning("XID monitor stopped: %s", self.reason)
                return
            if int(data.eventType) != pynvml.nvmlEventTypeXidCriticalError:
                continue
            index: int | None
            try:
                index = int(pynvml.nvmlDeviceGetIndex(data.device))
            except pynvml.NVMLError:
                index = None
            xid = int(data.eventData)
            log.warning("GPU %s reported XID %d", index, xid)
            with self._lock:
                self._events.append((index, xid, time.monotonic()))

    def events(self, *, wall: float | None = None) -> list[XidEvent]:
        """The events seen so far, oldest first.

        Each event's ``time`` is ``wall`` (the wall clock now by default) less the
        event's age on the monotonic clock: against a report stamped ``wall``
        (``collect``), its age is its true age whatever steps the wall clock took
        since, so the policy's XID lookback holds across them; the wall time itself
        is for display.
        """
        mono = time.monotonic()
        wall = time.time() if wall is None else wall
        with self._lock:
            seen = list(self._events)
        return [XidEvent(gpu_index=index, xid=xid, time=wall - max(0.0, mono - at))
                for index, xid, at in seen]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (within one poll period) and free the event set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._release()
        if self.reason == "running":
            self.reason = "stopped"

    def _release(self) -> None:
        if self._event_set is not None:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(self._event_set)
            self._event_set = None
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    def __enter__(self) -> XidMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
