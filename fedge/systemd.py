"""Being a well-behaved systemd service: sd_notify, the watchdog, journald, SIGTERM.

The coordinator and agent daemons run as ``Type=notify`` units with
``WatchdogSec=``. This module is everything they need for that, and nothing
fedge-specific:

* :class:`Notifier` sends ``READY=1``, ``WATCHDOG=1``, ``STATUS=…`` and
  ``STOPPING=1`` through ``systemd.daemon.notify`` (systemd-python), or through
  a plain datagram socket when systemd-python is absent. Outside systemd
  (``NOTIFY_SOCKET`` unset) every call is a no-op, so the same daemon runs in a
  terminal, in tests and under systemd.
* :func:`watchdog_interval` reads ``WATCHDOG_USEC``/``WATCHDOG_PID`` the way
  ``sd_watchdog_enabled(3)`` does.
* :func:`start_watchdog` pings from a task *on the daemon's event loop*, so the
  pings are proof that the loop runs: a loop stalled by blocking code stops
  them and systemd restarts the service (a watchdog thread would keep pinging
  a dead daemon). A daemon whose loop runs while its work is stuck (a worker
  thread that never returns) passes ``alive``: while it says no, no pings.
* :func:`setup_logging` logs to journald under systemd and to stderr otherwise,
  at INFO unless ``FEDGE_LOG_LEVEL`` (:data:`LOG_LEVEL_ENV`) says otherwise.
* :class:`GracefulShutdown` turns SIGTERM/SIGINT into ``STOPPING=1`` plus an
  asyncio event the daemon awaits; :func:`run_service` wires all of it around a
  daemon's main coroutine and returns exit status 0 after a clean stop.

Theory of operation for a daemon::

    async def main(shutdown: GracefulShutdown, notifier: Notifier) -> None:
        await start_serving()
        notifier.ready("serving")
        while not shutdown.requested:
            notifier.status(f"job {job} round {r}")
            ...  # finish or abandon the stage when shutdown.requested
    sys.exit(run_service("fedge-agent", main))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = [
    "LOG_LEVELS",
    "LOG_LEVEL_ENV",
    "GracefulShutdown",
    "Notifier",
    "log_level",
    "run_service",
    "setup_logging",
    "start_watchdog",
    "under_systemd",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

# Fraction of WatchdogSec between two pings; sd_watchdog_enabled(3) recommends half.
WATCHDOG_PING_FRACTION = 0.5
# How often a daemon that asks for it (start_watchdog's unsupervised_s) pings when no
# watchdog timeout is set: a supervisor may still read WATCHDOG=1 as the sign of a
# healthy start (fedge.update.ab.NotifyProcessService does).
UNSUPERVISED_PING_S = 1.0


def _send_datagram(address: str, state: str) -> None:
    """Send one sd_notify datagram without libsystemd (abstract sockets start with '@')."""
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(target)
        sock.sendall(state.encode("utf-8"))


class Notifier:
    """sd_notify(3) for one daemon; a no-op when ``NOTIFY_SOCKET`` is unset.

    ``environ`` defaults to ``os.environ`` and is read when each message is sent,
    so a test or a supervisor may set ``NOTIFY_SOCKET`` after construction.
    Send failures are logged, never raised: a lost notification must not take
    the daemon down (systemd's watchdog is the judge of liveness).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ
        self.sent: int = 0

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured (running under systemd)."""
        return bool(self._environ.get("NOTIFY_SOCKET"))

    def notify(self, state: str) -> bool:
        """Send raw ``KEY=VALUE`` lines; returns True when a datagram was sent.

        Raises:
            ValueError: ``state`` is empty.
        """
        if not state:
            raise ValueError("sd_notify state must be a non-empty 'KEY=VALUE' string")
        address = self._environ.get("NOTIFY_SOCKET")
        if not address:
            return False
        try:
            if self._environ is os.environ and _SD_NOTIFY is not None:
                # libsystemd reads NOTIFY_SOCKET from the environment itself.
                if not _SD_NOTIFY(state):
                    raise OSError("systemd.daemon.notify reported nothing sent")
            else:
                _send_datagram(address, state)
        except OSError as exc:
            log.warning("sd_notify %r to %s failed: %s", state.split("\n")[0], address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (plus ``STATUS=``): the daemon is serving.

        Raises:
            ValueError: ``status`` contains a newline.
        """
        return self.notify("READY=1" + ("\n" + _status_line(status) if status else ""))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the daemon is alive."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``.

        Raises:
            ValueError: ``text`` is empty or contains a newline.
        """
        if not text:
            raise ValueError("status text must be non-empty")
        return self.notify(_status_line(text))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1`` (plus ``STATUS=``): the daemon began shutting down.

        Raises:
            ValueError: ``status`` contains a newline.
        """
        return self.notify("STOPPING=1" + ("\n" + _status_line(status) if status else ""))


def _status_line(text: str) -> str:
    if "\n" in text or "\r" in text:
        raise ValueError(
            f"status text {text!r} contains a line break; sd_notify takes one line per "
            "assignment, so a newline would inject another KEY=VALUE"
        )
    return "STATUS=" + text


def _load_sd_notify() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # systemd-python, the [systemd] extra
    except ImportError:
        return None
    return daemon.notify  # type: ignore[no-any-return]


_SD_NOTIFY = _load_sd_notify()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """The service watchdog timeout in seconds, or None when no watchdog applies.

    Follows sd_watchdog_enabled(3): ``WATCHDOG_USEC`` holds the timeout in
    microseconds; when ``WATCHDOG_PID`` is set, the watchdog is ours only if it
    names this process.

    Raises:
        ValueError: ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is not a positive integer.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    usec = _positive_int("WATCHDOG_USEC", raw)
    pid_raw = env.get("WATCHDOG_PID")
    if pid_raw and _positive_int("WATCHDOG_PID", pid_raw) != os.getpid():
        return None
    return usec / 1_000_000


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive integer")
    return value


async def _watchdog_loop(notifier: Notifier, period: float,
                         alive: Callable[[], bool] | None) -> None:
    while True:
        if alive is None or alive():
            notifier.watchdog()
        await asyncio.sleep(period)


def start_watchdog(
    notifier: Notifier, interval: float | None = None, *, unsupervised_s: float | None = None,
    alive: Callable[[], bool] | None = None,
) -> asyncio.Task[None] | None:
    """Start pinging ``WATCHDOG=1`` every ``interval/2`` s from the running loop.

    ``alive``, when given, is asked before each ping: while it returns False no ping
    goes (the daemon's loop runs but its work is stuck), so systemd restarts it once
    ``WatchdogSec`` passes. It runs on the loop and must not block.

    ``interval`` defaults to :func:`watchdog_interval`. Without one (no watchdog),
    pings go out every ``unsupervised_s`` when it is given, else nothing starts; so
    they do, logged, when that environment is malformed. A disabled notifier starts
    nothing. Returns the task (cancel it to stop) or None.

    The period depends on the watchdog alone, never on what else the daemon does
    at its own pace (heartbeats, ticks): a daemon must not be restarted because it
    was configured to beat slowly.

    Raises:
        RuntimeError: no running event loop.
        ValueError: ``interval`` or ``unsupervised_s`` is not positive, or the
            environment is malformed and ``unsupervised_s`` is not given.
    """
    if unsupervised_s is not None and not unsupervised_s > 0:
        raise ValueError(f"unsupervised ping period {unsupervised_s!r} must be > 0 seconds")
    if interval is None:
        try:
            interval = watchdog_interval()
        except ValueError as exc:
            if unsupervised_s is None:
                raise
            log.error("%s; pinging the watchdog every %g s", exc, unsupervised_s)
    if interval is None:
        if unsupervised_s is None:
            return None
        period = unsupervised_s
    elif interval <= 0:
        raise ValueError(f"watchdog interval {interval!r} must be > 0 seconds")
    else:
        period = interval * WATCHDOG_PING_FRACTION
    if not notifier.enabled:
        return None
    loop = asyncio.get_running_loop()
    return loop.create_task(_watchdog_loop(notifier, period, alive), name="sd-watchdog")


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by systemd with stderr on the journal.

    ``JOURNAL_STREAM`` (device:inode of the journal stream) is checked against
    stderr as systemd.exec(5) recommends; ``INVOCATION_ID`` alone also counts.
    """
    env = os.environ if environ is None else environ
    stream = env.get("JOURNAL_STREAM")
    if stream:
        with contextlib.suppress(OSError, ValueError):
            dev, ino = (int(part) for part in stream.split(":", 1))
            st = os.fstat(sys.stderr.fileno())
            if (st.st_dev, st.st_ino) == (dev, ino):
                return True
    return bool(env.get("INVOCATION_ID"))


_HANDLER_MARK = "_fedge_systemd_handler"


class UtcFormatter(logging.Formatter):
    """Time stamps in UTC with a 'Z' (2026-11-30T17:58:12.554Z): the ledger, the audit
    and the enrolment times are UTC, and a host-local time with no offset cannot be
    set beside them (journald keeps its own time stamps)."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


#: The environment variable that sets the daemons' log level (a systemd drop-in's
#: ``Environment=FEDGE_LOG_LEVEL=DEBUG``); INFO when unset or empty. DEBUG writes
#: detail the journal otherwise lacks, a data cell's value among it (docs/security.md).
LOG_LEVEL_ENV = "FEDGE_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level(value: int | str, *, what: str = "log level") -> int:
    """The logging level named by ``value`` (one of :data:`LOG_LEVELS`, any case) or
    given as a number.

    Raises:
        ValueError: not one of them; the message names ``what`` (the variable or
            option it came from), the value and the levels there are.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    name = value.strip().upper() if isinstance(value, str) else None
    if name not in LOG_LEVELS:
        raise ValueError(f"{what} {value!r} is not a log level: give one of "
                         f"{', '.join(LOG_LEVELS)} (INFO when unset)")
    return int(getattr(logging, name))


def setup_logging(
    name: str, level: int | str | None = None, environ: Mapping[str, str] | None = None
) -> logging.Logger:
    """Configure the root logger once for daemon ``name``; return ``logging.getLogger(name)``.

    Under systemd the records go to journald (``systemd.journal.JournalHandler``
    with ``SYSLOG_IDENTIFIER=name``, levels mapped to syslog priorities);
    otherwise to stderr with UTC timestamps (``UtcFormatter``). Calling it again
    replaces the handler. ``level`` None: ``$FEDGE_LOG_LEVEL`` (:data:`LOG_LEVEL_ENV`)
    when set and not empty, else INFO.

    Raises:
        ValueError: ``name`` is empty, or ``level`` or ``$FEDGE_LOG_LEVEL`` is not a
            log level (named, with the levels there are).
    """
    if not name:
        raise ValueError("setup_logging needs a non-empty daemon name")
    if level is None:
        env = os.environ if environ is None else environ
        from_env = env.get(LOG_LEVEL_ENV, "")
        level = (log_level(from_env, what=LOG_LEVEL_ENV) if from_env.strip()
                 else logging.INFO)
    level = log_level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    handler: logging.Handler
    journal_handler = None
    if under_systemd(environ):
        with contextlib.suppress(ImportError):
            from systemd.journal import JournalHandler

            journal_handler = JournalHandler(SYSLOG_IDENTIFIER=name)
    if journal_handler is not None:
        handler = journal_handler
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(UtcFormatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    return logging.getLogger(name)


class GracefulShutdown:
    """SIGTERM/SIGINT → ``STOPPING=1`` and an event the daemon's stages watch.

    A second signal while stopping is logged and ignored: the daemon decides
    whether to finish or abandon its current stage; systemd's ``TimeoutStopSec``
    is the backstop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier
        self._event = asyncio.Event()
        self.signal_name: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def requested(self) -> bool:
        """True once a stop was requested."""
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once a stop was requested."""
        await self._event.wait()

    def request(self, reason: str = "stop requested") -> None:
        """Request a stop (what the signal handler does); idempotent."""
        if self._event.is_set():
            log.info("%s while already stopping; still finishing the current stage", reason)
            return
        self.signal_name = reason
        log.info("%s: stopping", reason)
        self._notifier.stopping(f"stopping ({reason})")
        self._event.set()

    def install(self) -> None:
        """Install the handlers on the running loop.

        Raises:
            RuntimeError: no running event loop.
        """
        self._loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            self._loop.add_signal_handler(sig, self.request, signal.Signals(sig).name)

    def uninstall(self) -> None:
        """Remove the handlers installed by :meth:`install`."""
        if self._loop is not None:
            for sig in self.SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None


DaemonMain = Callable[[GracefulShutdown, Notifier], Awaitable[None]]


def run_service(
    name: str,
    main: DaemonMain,
    *,
    notifier: Notifier | None = None,
    setup_log: bool = True,
) -> int:
    """Run a daemon's ``main(shutdown, notifier)`` under the systemd protocol.

    Sets up logging, the SIGTERM handler and the loop-bound watchdog, then runs
    ``main``, which must call ``notifier.ready()`` once serving and return when
    ``shutdown.requested``. Returns 0 after a clean stop; an exception from
    ``main`` is logged and gives 1 (so ``Restart=on-failure`` applies).

    Raises:
        ValueError: a malformed ``WATCHDOG_USEC``/``WATCHDOG_PID``.
    """
    notifier = notifier or Notifier()
    logger = setup_logging(name) if setup_log else logging.getLogger(name)
    interval = watchdog_interval()

    async def runner() -> int:
        shutdown = GracefulShutdown(notifier)
        shutdown.install()
        task = start_watchdog(notifier, interval) if interval else None
        try:
            await main(shutdown, notifier)
        except Exception:
            logger.exception("%s failed", name)
            notifier.stopping("failed")
            return 1
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            shutdown.uninstall()
        if not shutdown.requested:
            notifier.stopping("finished")
        logger.info("%s stopped cleanly", name)
        return 0

    return asyncio.run(runner())
