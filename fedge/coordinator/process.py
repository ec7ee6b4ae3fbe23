"""The coordinator process: the ROUTER socket, the admin channel, the tick loop.

Only I/O lives here; the decisions are :class:`~fedge.coordinator.service.Coordinator`'s.
The bound endpoint is written to ``<state_dir>/endpoint`` (useful with port 0).
The ZAP allow-list follows the registry: enrolment or revocation through the
admin channel applies at once; a change written to the database by another
process (``fedge coordinator enrol``) is picked up within a second.

One event loop takes every message, ticks, and sends systemd's watchdog pings,
so nothing on it may wait long. A database locked by another process (an
operator's sqlite3 shell in a write transaction) costs one write's short wait
(``store.SERVICE_BUSY_TIMEOUT_S``), after which the loop stops taking messages
for that turn and backs off (``BUSY_BACKOFF_S``, no tick); while the lock stays
held, writes fail at once instead of waiting (``store.BUSY_QUIET_S``), so the
loop goes on at its pace, every record it cannot write logged as lost, except
a message whose handling met the lock before acting (``service.DatabaseLocked``):
that one is held, no newer message is taken (they wait in ZeroMQ, in order) and
no tick runs until it has been handled. The lock is logged naming the file, once
per FINISH_RETRY_S while it lasts, and its end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import importlib
import logging
import os
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge import __version__, instance_lock
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.service import FINISH_RETRY_S, Coordinator, DatabaseLocked
from fedge.coordinator.store import (
    DISK_ERRNOS,
    HEARTBEAT_FLUSH_S,
    Store,
    StoreError,
    database_error,
    is_locked,
)
from fedge.instance_lock import InstanceLocked
from fedge.wire import messages as m

log = logging.getLogger("fedge.coordinator")

ALLOW_LIST_REFRESH_S = 1.0
RECV_BATCH = 256
# a loop that took no message for this long was deaf: the sites' silence meanwhile is
# not held against them (_deaf_for)
STALL_S = 1.0
# After a write found the database locked by another process: no tick and no new
# message for this long (the loop awaits meanwhile: pings, sends, the admin channel).
BUSY_BACKOFF_S = 0.5
# Fault injection for the crash tests: "ROUND:PHASE" (e.g. "2:aggregating"); the
# coordinator SIGKILLs itself when a round reaches that phase. "update.outcome": it
# SIGKILLs itself as an agent's update outcome arrives, before recording it.
KILL_AT_ENV = "FEDGE_TEST_KILL_AT"
# One of the socket's own tasks (its reader, heartbeats, connection monitor) ended on
# an error (ServerSocket.on_failure): the coordinator would take no message any more
# while it looked alive. EX_SOFTWARE; the unit's Restart=on-failure restarts it after
# RestartSec, within its start limit.
TRANSPORT_FAILED_EXIT = 70
KILL_ON_OUTCOME = "update.outcome"


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return None


def private_state_dir(state_dir: Path) -> None:
    """Make a new state directory 0700, whatever the umask: it holds the database
    (audit log, enrolled keys), the roster and the TUF relay's online keys, and a
    coordinator run by hand (umask 022, not under the unit's UMask=0077) would
    otherwise leave them readable by every local user. An existing one is left as it
    is: it may be the operator's own directory (the package makes its own 0700).

    Raises: OSError: the directory cannot be made."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # mkdir's mode goes through the umask


def hold_state_dir(cfg: CoordinatorConfig) -> None:
    """Make the state directory if need be and hold its coordinator lock for the life
    of this process (fedge.instance_lock).

    Raises: InstanceLocked: another coordinator runs on it (its pid named), or the
        directory cannot be made or locked (named)."""
    try:
        private_state_dir(Path(cfg.state_dir))
    except OSError as exc:
        raise InstanceLocked(f"cannot make state directory {cfg.state_dir}: "
                             f"{exc.strerror or exc}") from None
    instance_lock.hold(Path(cfg.state_dir), "coordinator")


RELOAD_REFUSED = ("SIGHUP received: reload is not supported; use systemctl restart "
                  "fedge-coordinator (the configuration is read at start). Still running")


def _reload_refused() -> None:
    log.warning(RELOAD_REFUSED)


def build_coordinator(cfg: CoordinatorConfig, **kwargs: Any) -> Coordinator:
    """A :class:`Coordinator` for this configuration (the saved roster if newer and valid).

    Its clocks are the defaults (fedge.coordinator.service): ``time.monotonic``
    measures its deadlines and the heartbeat timeout, as the loop below measures the
    deafness it hands to ``not_listening`` (_deaf_for), and ``time.time`` only dates
    its records, so a step of the wall clock moves no deadline."""
    private_state_dir(Path(cfg.state_dir))
    # the configured roster; the Coordinator weighs it against state_dir/roster.json
    # (the console's last install), keeping the newest that verifies under the key
    roster = cfg.roster
    updates = None
    upd_mod = _optional("fedge.coordinator.updates")
    if upd_mod is not None and (cfg.state_dir / "tuf").exists():
        try:
            updates = upd_mod.UpdateRepository(cfg.state_dir)
        except Exception as exc:  # a broken TUF store must not stop federated training
            log.error("update relay disabled: %s", exc)
    coord = Coordinator(
        cfg.state_dir, roster=roster, roster_public_key=cfg.roster_public_key,
        heartbeat_timeout_s=cfg.heartbeat_timeout_s,
        update_handler=updates.handle_fetch if updates is not None else None, **kwargs)
    coord.updates = updates  # type: ignore[attr-defined]
    return coord


async def serve(cfg: CoordinatorConfig, *, stop: asyncio.Event | None = None,
                coordinator: Coordinator | None = None) -> int:
    """Run the coordinator until ``stop`` is set (or SIGTERM/SIGINT); returns the exit code:
    0, 1 when the endpoint cannot be bound, TRANSPORT_FAILED_EXIT (70) when one of the
    socket's own tasks failed (said at ERROR with its traceback: the coordinator would
    otherwise have taken no message any more while it looked alive).
    SIGHUP is logged (RELOAD_REFUSED) and otherwise ignored.

    Raises:
        TransportError: the endpoint cannot be bound.
    """
    from fedge.systemd import UNSUPERVISED_PING_S, Notifier, start_watchdog
    from fedge.transport import CurveKeyPair, HeartbeatConfig, ServerSocket, TransportError
    from fedge.wire import codec

    started = time.time()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP's default ends the process without a word, and systemd counts a death
        # by SIGHUP as a clean exit (Restart=on-failure does not restart it): an
        # operator's habitual `kill -HUP` to "reload" left the federation coordinator-less
        loop.add_signal_handler(signal.SIGHUP, _reload_refused)
    coord = coordinator or build_coordinator(cfg)
    if cfg.path is not None:  # named where a site is counted disconnected for its silence
        coord.config_path = cfg.path
    for warning in cfg.warnings:  # e.g. bind on another port than the appliances dial
        log.warning("%s", warning)
    # temp files of checkpoint writes, ONNX exports and report files killed mid-way
    # (their names hold a pid or a random part, so no later write overwrites them)
    for stale in ck.remove_stale_temps(cfg.state_dir, older_than=started):
        log.warning("removed %s, left by a checkpoint, export or report write that did "
                    "not finish",
                    stale)
    notifier = Notifier()
    key_of: dict[str, str] = {}
    site_by_key: dict[str, str] = {}  # cache; cleared whenever the allow-list changes

    def site_of(public_key: str) -> str | None:
        site = site_by_key.get(public_key)
        if site is None:
            site = coord.store.site_for_key(public_key)
            if site is not None:
                key_of[site] = public_key
                site_by_key[public_key] = site
        return site

    def on_refused(refusal: Any) -> None:
        coord.refused(refusal.public_key or "", f"{refusal.reason} (from {refusal.address})")

    flapping = _Flapping()
    exit_code: list[int] = []

    def on_transport_failure(exc: BaseException) -> None:
        log.error("the coordinator's socket no longer works (%s): %s: %s; the coordinator "
                  "stops (exit %d) so that systemd restarts it", server.endpoint,
                  type(exc).__name__, exc, TRANSPORT_FAILED_EXIT, exc_info=exc)
        exit_code.append(TRANSPORT_FAILED_EXIT)
        stop.set()

    def on_peer_lost(peer: Any) -> None:
        site = coord.store.site_for_key(peer.public_key)
        if site is None:
            return
        silent = _silent_for(coord, site)
        if silent is None or silent < cfg.heartbeat_timeout_s:
            coord.peer_lost(site, peer.address)  # closed (or silence not measured here)
            return
        coord.peer_lost(site, peer.address, why=_went_silent(cfg, silent))
        times = flapping.went_silent(site, time.monotonic())
        if times is not None:
            log.warning("site %s went silent %d times in %.0f s, coming back each time: an "
                        "agent sending its heartbeats less often than this coordinator's "
                        "%s does that. Its agent.toml's [heartbeat] interval_s must be "
                        "shorter (default 1.0)", site, times, flapping.window_s,
                        _timeout_setting(cfg))

    def on_superseded(old: Any, new: Any) -> None:
        site = coord.store.site_for_key(new.public_key)
        if site is not None:
            coord.superseded(site, old.address, new.address)

    server = ServerSocket(
        CurveKeyPair(cfg.curve_public, cfg.curve_secret), allowed=coord.store.allowed_keys(),
        on_refused=on_refused, on_peer_lost=on_peer_lost, on_superseded=on_superseded,
        heartbeat=HeartbeatConfig(cfg.heartbeat_interval_s, cfg.heartbeat_timeout_s),
        max_message_bytes=coord.max_message_bytes, on_failure=on_transport_failure)
    try:
        endpoint = server.bind(cfg.bind)
    except TransportError as exc:
        # the TransportError names the endpoint and libzmq's reason
        log.error("%s%s", exc, f" (bind in {cfg.path})" if cfg.path else "")
        return 1
    (cfg.state_dir / "endpoint").write_text(endpoint + "\n")
    allowed = coord.store.allowed_keys()

    def set_allowed(keys: set[str]) -> None:
        nonlocal allowed
        allowed = set(keys)
        site_by_key.clear()
        server.set_allowed(keys)

    def disconnect(site: str) -> None:
        key = key_of.pop(site, None)
        if key is not None:
            server.disconnect(key)

    coord.on_allow_list = set_allowed
    coord.on_disconnect = disconnect
    exports: set[asyncio.Task[None]] = set()
    finish_again = _FinishAgain()
    given_up_said: set[str] = set()  # jobs whose export given up was said (unfinished_jobs)

    def finishing(work: Any, name: str) -> None:
        task = loop.create_task(work, name=name)
        exports.add(task)
        task.add_done_callback(finished)

    def finished(task: asyncio.Task[None]) -> None:
        exports.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # said, not left to "Task exception was never retrieved" at exit; what it
            # did not write is looked for again (finish_again)
            log.error("%s failed: %s: %s; tried again while the coordinator runs",
                      task.get_name(), type(exc).__name__, exc, exc_info=exc)
        if not task.cancelled():
            finish_again.finished(time.monotonic())

    def on_job_completed(job_id: str) -> None:
        finishing(finish_job(coord, job_id),
                  f"writing the ONNX model and report of job {job_id}")

    coord.on_job_completed = on_job_completed
    unfinished = unfinished_jobs(coord, said=given_up_said)
    if unfinished:
        # one after the other: each export is a torch child of its own
        finishing(_resume_finishing(coord, unfinished),
                  f"finishing {len(unfinished)} ended job(s)")
    admin_task = _start_admin(cfg, coord)
    if cfg.admin_off:  # once, not retried: the address is not this host's (NAT, split DNS)
        log.error("%s", cfg.admin_off)
    log.info("coordinator listening on %s", endpoint)
    notifier.ready()
    # STATUS= then follows what the coordinator does (Coordinator.status_text), sent
    # each time it changes, never again while it stays the same
    last_status = f"listening on {endpoint}" + (
        "; admin channel off: the console cannot reach it (see the log)"
        if cfg.admin_off else "")
    notifier.status(last_status)
    # WATCHDOG=1 from this loop at half of WatchdogSec, whatever tick_s is (a loop
    # turn waits up to tick_s for a message): the pings say the loop runs
    pinger = start_watchdog(notifier, unsupervised_s=UNSUPERVISED_PING_S)
    last_refresh = time.monotonic()
    max_bytes = coord.max_message_bytes
    kill_at = os.environ.get(KILL_AT_ENV, "")
    preparing: asyncio.Future[None] | None = None
    disk_wait = _DiskWait()
    tick_failed_at = float("-inf")
    flush_failed_at = float("-inf")
    admin_watch = _AdminWatch(started_at=time.monotonic())
    # messages whose handling met a locked database before acting, oldest first:
    # (site, frames, the address of its connection)
    held: collections.deque[tuple[str, Any, str]] = collections.deque()
    held_since: float | None = None  # since when no new message has been taken for them
    lock = _LockReport(coord.store)
    backoff_until = float("-inf")
    heard_at = time.monotonic()  # when the loop last took what had arrived
    try:
        while not stop.is_set():
            wait = backoff_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # a write that waited for the lock this turn: no more messages, no tick
            waits_before = coord.store.lock_waits
            while held and coord.store.lock_waits == waits_before:
                if _handle(coord, *held[0]) is not None:
                    break
                held.popleft()
            if not held and held_since is not None:
                # the sites were not listened to meanwhile: not their silence
                coord.not_listening(time.monotonic() - held_since)
                held_since = None
                heard_at = time.monotonic()
            # Take what has arrived (up to a batch), then tick once: with hundreds of
            # agents a tick per message would dominate the coordinator's CPU time.
            timeout = cfg.tick_s
            for _ in range(RECV_BATCH):
                if held or coord.store.lock_waits != waits_before:
                    break  # the database is locked: the rest waits in ZeroMQ
                entered = time.monotonic()
                try:
                    msg = await server.recv(timeout=timeout)
                except TimeoutError:
                    heard_at = _deaf_for(coord, heard_at, entered, timeout)
                    break
                except TransportError:
                    if server.failure is None:
                        raise
                    break  # said by on_transport_failure, which stops the loop
                heard_at = _deaf_for(coord, heard_at, entered, timeout)
                timeout = 0.0005
                site = site_of(msg.peer.public_key)
                if site is None:
                    coord.refused(msg.peer.public_key, "message from a key not enrolled")
                    server.disconnect(msg.peer)
                elif (locked := _handle(coord, site, msg.frames,
                                        msg.peer.address)) is not None:
                    held.append((site, msg.frames, msg.peer.address))
                    held_since = time.monotonic()
                    log.info("%s from %s met the database locked before it took effect: "
                             "held, and handled again once the lock is free (no newer "
                             "message is taken meanwhile)", locked.kind, site)
                del msg
            if held or coord.store.lock_waits != waits_before:
                pass  # backing off: no tick while a message is held or a write waited
            else:
                try:
                    upcoming = _needs_initial_model(coord) if coord.runner is None \
                        else None
                    if disk_wait.job_id and (upcoming is None
                                             or upcoming.job_id != disk_wait.job_id):
                        # the job that waited is no longer next (cancelled): its model
                        # is dropped, and the next one, if any, tried at once
                        disk_wait.forget()
                        coord.start_wait = None
                    if upcoming is not None:
                        # the next job's starting model is built in a child process,
                        # and waits for a disk that could not take it; the loop ticks
                        # meanwhile (silence checks, refusal summaries) without
                        # starting the job, and keeps serving heartbeats
                        if preparing is None:
                            if disk_wait.due(upcoming.job_id, time.monotonic()):
                                preparing = loop.create_task(
                                    _prepare_initial_model(coord, disk_wait),
                                    name="building the starting model of job "
                                         f"{upcoming.job_id}")
                        elif preparing.done():
                            if not preparing.cancelled() and \
                                    preparing.exception() is not None:
                                log.error("preparing the next job's starting model failed",
                                          exc_info=preparing.exception())
                            preparing = None
                    if upcoming is None:
                        coord.tick()
                    else:
                        coord.tick(start_next=False)
                except (OSError, sqlite3.OperationalError) as exc:
                    # a full disk (SQLITE_FULL, ENOSPC) fails this tick's writes; the
                    # next tick retries them. A corrupt database is no OperationalError:
                    # it ends the process (fedge.coordinator.cli says so in one line).
                    # A locked one is reported by _LockReport.
                    if not is_locked(exc) and \
                            time.monotonic() - tick_failed_at >= FINISH_RETRY_S:
                        tick_failed_at = time.monotonic()
                        log.error("coordinator tick failed, retried every tick (next report "
                                  "in %g s): %s", FINISH_RETRY_S,
                                  database_error(coord.store.path, exc)
                                  if isinstance(exc, sqlite3.Error)
                                  else f"{type(exc).__name__}: {exc}")
                except sqlite3.DatabaseError:
                    raise
                except Exception as exc:
                    # a bug, or what a site sent, that the round cannot get past: the
                    # round in flight fails naming it (and is retried, up to the plan's
                    # max_failed_attempts), so the same error is not met on every tick;
                    # the coordinator goes on serving every other site and job
                    tick_failed_at = _tick_raised(coord, exc, tick_failed_at)
            if not held and coord.store.lock_waits == waits_before:
                # the heartbeats held since the last flush, once HEARTBEAT_FLUSH_S has
                # passed (also when no heartbeat has come since: the last ones are written)
                flush_failed_at = _flush_heartbeats(coord, flush_failed_at)
            if held or coord.store.lock_waits != waits_before:
                # (a held message is tried again after it: the loop awaits meanwhile)
                backoff_until = time.monotonic() + BUSY_BACKOFF_S
            lock.update(len(held))
            if kill_at:
                _maybe_die(coord, kill_at)
            if coord.max_message_bytes != max_bytes:
                max_bytes = coord.max_message_bytes
                server.set_max_message_bytes(max_bytes)
            await _drain(coord, server, key_of, codec)
            if not exports and finish_again.due(time.monotonic()):
                again = _look_again(coord, finish_again, given_up_said)
                if again:
                    finishing(_resume_finishing(coord, again),
                              f"finishing {len(again)} ended job(s) again")
            admin_task = _watch_admin(cfg, coord, admin_task, admin_watch)
            now = time.monotonic()
            if now - last_refresh > ALLOW_LIST_REFRESH_S:
                last_refresh = now
                fresh = coord.store.allowed_keys()
                if fresh != allowed:
                    for site, key in list(key_of.items()):
                        if key not in fresh:
                            disconnect(site)
                            coord.peer_lost(site, why="its key is no longer enrolled")
                    set_allowed(fresh)
            status = _status_text(coord, preparing, exports, disk_wait)
            if status is not None and status != last_status:
                last_status = status
                notifier.status(status)
    finally:
        notifier.stopping()
        # a finish (its export child) or a starting model's build still running is cut
        # short now, its child killed and awaited: left to asyncio.run's own
        # cancellation, after this returns, the child outlived the loop and wrote into
        # the job directory with the database closed, its outcome never audited. What
        # it did not write brings the job back at the next start (unfinished_jobs).
        await _cut_short([*exports, *([preparing] if preparing is not None else [])])
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        if admin_task is not None:
            admin_task.cancel()
            try:
                await admin_task
            except asyncio.CancelledError:
                pass
            except Exception:  # said, not hidden: the channel had stopped by itself
                log.exception("the admin channel had failed")
        await server.close()
        try:
            coord.close()  # writes the heartbeats still held
        except sqlite3.Error as exc:
            log.error("closing the database %s: %s: %s (the sites' heartbeats of the last "
                      "%g s may not be in it)", coord.store.path, type(exc).__name__, exc,
                      HEARTBEAT_FLUSH_S)
    return exit_code[0] if exit_code else 0


async def _cut_short(tasks: list[asyncio.Future[None]]) -> None:
    """Cancel ``tasks`` (serve's finishes and its starting model's build, at a stop)
    and wait for their end: an export kills its child at once (export_final_model), so
    the stop stays prompt. A task that had already ended is only collected here (its
    outcome was said by serve's ``finished``)."""
    running = [t for t in tasks if not t.done()]
    for task in running:
        log.info("%s: cut short by the stop; what it did not write is done at the next "
                 "start", task.get_name() if isinstance(task, asyncio.Task) else task)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _status_text(coord: Coordinator, preparing: asyncio.Future[None] | None,
                 exports: set[asyncio.Task[None]],
                 disk_wait: _DiskWait | None = None) -> str | None:
    """What STATUS= says now (Coordinator.status_text; with no job running, what this
    loop does meanwhile: a starting model built, or waiting for the disk, an ended
    job's export and report written), or None when the database cannot say (the tick
    reports why)."""
    activity = ""
    building = preparing is not None and not preparing.done()
    waiting = disk_wait is not None and disk_wait.job_id
    if coord.runner is None and (building or waiting):
        try:
            job = _needs_initial_model(coord)
        except sqlite3.Error:
            return None
        if job is not None and building:
            activity = f"job {job.job_id}: building its starting model"
        elif job is not None and disk_wait is not None:
            activity = disk_wait.activity(job.job_id)
    if coord.runner is None and not activity and exports:
        activity = "idle, " + "; ".join(sorted(t.get_name() for t in exports))
    try:
        return coord.status_text(activity)
    except sqlite3.Error:
        return None


def _flush_heartbeats(coord: Coordinator, failed_at: float) -> float:
    """Write the heartbeats the store holds, if due (store.HEARTBEAT_FLUSH_S). A write
    that fails keeps them held for the next try; it is logged at most once per
    FINISH_RETRY_S (a locked database is _LockReport's). Returns when a failure was
    last logged."""
    try:
        coord.store.flush_heartbeats()
    except sqlite3.OperationalError as exc:
        if not is_locked(exc) and time.monotonic() - failed_at >= FINISH_RETRY_S:
            log.error("the sites' heartbeats not written to the database %s (retried; next "
                      "report in %g s): %s: %s", coord.store.path, FINISH_RETRY_S,
                      type(exc).__name__, exc)
            return time.monotonic()
    return failed_at


async def finish_job(coord: Coordinator, job_id: str) -> None:
    """After a job's last commit: its ONNX export, then its report (fedge.coordinator.
    report), both beside the final checkpoint for ``fedge console jobs fetch``.

    Safe to run again for a job it has finished, wholly or in part: a ``model.onnx``
    that loads and names the job's final model is kept, not exported again; an export
    that failed the same way for this model already (``admin.export_given_up``: a cause
    that does not pass) is not tried again (audited ``model_export_skipped``).

    Each outcome is logged first, then audited (`_audit`): on a full disk the audit
    record is what is lost, not the log line, nor the report after a failed export.
    What it could not write is finished again while the coordinator runs (serve's
    `_FinishAgain`), and at its next start (unfinished_jobs).
    """
    out = ck.final_path(coord.state_dir, job_id).with_name("model.onnx")
    final_digest = coord.store.job(job_id).final_digest
    if await asyncio.to_thread(_is_export_of, out, final_digest):
        log.info("job %s: %s is already its final model's export", job_id, out)
        _audit(coord, job_id, "model_export_kept", {"job": job_id, "path": str(out)})
    elif (given_up := _export_given_up(coord, job_id, final_digest)) is not None:
        log.warning("%s", _given_up_text(coord, job_id, given_up))
        _audit(coord, job_id, "model_export_skipped",
               {"job": job_id, "reason": given_up[0], "times": given_up[1],
                "final_digest": final_digest})
    else:
        await export_final_model(coord, job_id)
    await write_report(coord, job_id)


def _export_given_up(coord: Coordinator, job_id: str, final_digest: str
                     ) -> tuple[str, int] | None:
    """fedge.coordinator.admin.export_given_up for ``job_id``; None (tried again) when
    the audit log cannot be read."""
    from fedge.coordinator.admin import export_given_up

    try:
        return export_given_up(coord.store, job_id, final_digest)
    except sqlite3.Error as exc:
        log.warning("job %s: its earlier export failures cannot be read (%s): the export "
                    "is tried", job_id, exc)
        return None


def _given_up_text(coord: Coordinator, job_id: str, given_up: tuple[str, int]) -> str:
    reason, times = given_up
    return (f"job {job_id}: its ONNX export failed {times} times the same way for its "
            f"final model ({reason}); not tried again at this start. Fix the cause, then "
            f"run `fedge export --job {job_id} --state-dir {coord.state_dir}` on this host, "
            "which writes the job's model.onnx")


REPORT_FILES = ("report.md", "report.json")
# what finish_job leaves beside an ended job's final model (unfinished_jobs)
RESULT_FILES = ("model.onnx", *REPORT_FILES)


def _audit(coord: Coordinator, job_id: str, action: str, detail: dict[str, Any]) -> None:
    """Audit ``action`` of an ended job's finish, after its log line said it: a database
    that cannot take the record now (a full disk) costs the record, logged, never the
    finish (as the Coordinator's records: service ``_not_written``)."""
    try:
        coord.store.audit("coordinator", action, detail)
    except (StoreError, sqlite3.Error) as exc:
        log.error("%s of job %s not written to the database %s: %s: %s", action, job_id,
                  coord.store.path, type(exc).__name__, exc)


def unfinished_jobs(coord: Coordinator, *, said: set[str] | None = None) -> list[str]:
    """Ended jobs whose results are not all written: a coordinator stopped (or killed)
    between the job's last commit and the end of finish_job (the report is written
    last), or one whose ONNX export failed (a full disk, say) while its smaller report
    was written: its export is tried again at each start until it is there, and the
    report written again after it. A failed or cancelled job that committed a round
    has its last committed model as its result; one that committed nothing has none.
    A job whose directory is gone is not one: every ended job with a result has one
    (its final or last committed checkpoint is written before its status), so the
    operator deleted it (packaging/debian/README.Debian), and there is nothing left to
    finish it from.

    Nor is a job whose export alone is missing and has failed the same way for its final
    model EXPORT_GIVE_UP_AFTER times (``admin.export_given_up``: a parity check that
    refuses NaN weights, not a full disk): tried at every start, it only failed again.
    A WARNING says so and names the command that writes it by hand (once per job
    in ``said``, when given: the jobs it was said of are added); `jobs fetch` and
    `jobs status` say the same."""
    out = []
    for status in ("completed", "failed", "cancelled"):
        for job in coord.store.jobs(status=status):
            if status != "completed" and job.committed_round < 1:
                continue
            if not ck.job_dir(coord.state_dir, job.job_id).is_dir():
                continue
            missing = set(RESULT_FILES) - set(ck.results(coord.state_dir, job.job_id))
            if not missing:
                continue
            if missing == {"model.onnx"}:
                given_up = _export_given_up(coord, job.job_id, job.final_digest)
                if given_up is not None:
                    if said is None or job.job_id not in said:
                        log.warning("%s", _given_up_text(coord, job.job_id, given_up))
                    if said is not None:
                        said.add(job.job_id)
                    continue
            out.append(job.job_id)
    return out


async def _resume_finishing(coord: Coordinator, job_ids: list[str]) -> None:
    for job_id in job_ids:
        try:
            await _resume_finishing_one(coord, job_id)
        except Exception:  # one job's records must not keep the others unfinished
            log.exception("job %s: finishing failed", job_id)


async def _resume_finishing_one(coord: Coordinator, job_id: str) -> None:
    job = coord.store.job(job_id)
    if job.status != "completed" and not ck.final_path(coord.state_dir, job_id).is_file():
        # ended before its last committed model was kept as its result (a kill
        # between the status and the file, or a write that failed): keep it now
        digest = coord.keep_last_model(job_id, job.committed_round)
        if not digest:
            return  # logged and audited; tried again later
        coord.store.set_final_digest(job_id, digest)
    # killed before its old round checkpoints went (service: they go before the
    # export and report, whose absence brings the job here)
    coord.forget_rounds(job_id)
    missing = [n for n in RESULT_FILES if n not in ck.results(coord.state_dir, job_id)]
    log.info("job %s (%s) without %s: finishing it now", job_id, job.status,
             ", ".join(missing))
    _audit(coord, job_id, "job_finish_resumed", {"job": job_id, "missing": missing})
    await finish_job(coord, job_id)


# An ended job whose results are not all written while the coordinator runs (its
# export or report met a full or failing disk) is finished again: FINISH_RETRY_S after
# a finish ends, then after twice the last pause each time some are still missing, up
# to this: each export is a torch child of its own, not to be started every few
# seconds for days on a disk that stays read-only. A restart still tries at once.
FINISH_AGAIN_MAX_S = 600.0


@dataclass
class _FinishAgain:
    """When serve next looks for ended jobs whose results are not all written
    (unfinished_jobs), to finish them again without a restart: a pause after each
    finish ends (whatever its outcome, which a full disk may have kept from the audit
    log), FINISH_RETRY_S at first, doubled each time one is found, up to
    FINISH_AGAIN_MAX_S; back to FINISH_RETRY_S once none is. Nothing is looked for
    while a finish runs, nor after one until its pause has passed: no tight loop."""

    at: float | None = None  # when to look; None: not until a finish ends
    pause: float = 0.0  # 0: the next is FINISH_RETRY_S

    def finished(self, now: float) -> None:
        """A finish task ended."""
        self.pause = self.pause or FINISH_RETRY_S
        self.at = now + self.pause

    def due(self, now: float) -> bool:
        return self.at is not None and now >= self.at

    def looked(self, found: bool) -> None:
        """What the look found: jobs to finish again (the next pause doubles), or none."""
        self.at = None
        self.pause = min(2 * self.pause, FINISH_AGAIN_MAX_S) if found else 0.0


def _look_again(coord: Coordinator, finish_again: _FinishAgain,
                given_up_said: set[str]) -> list[str]:
    """The ended jobs to finish again now (serve, once finish_again is due); [] when
    none or the database cannot say (looked at again after the pause, logged)."""
    try:
        again = unfinished_jobs(coord, said=given_up_said)
    except sqlite3.Error as exc:
        finish_again.looked(True)
        finish_again.finished(time.monotonic())
        log.warning("ended jobs whose results are not all written cannot be looked up (%s); "
                    "looked at again in %g s", database_error(coord.store.path, exc),
                    finish_again.pause)
        return []
    finish_again.looked(bool(again))
    if again:
        log.info("ended job(s) %s: results not all written; finishing again (if still "
                 "not, looked at again %g s after)", ", ".join(again), finish_again.pause)
    return again


def _is_export_of(path: Path, final_digest: str) -> bool:
    """Whether ``path`` is an ONNX model exported from the weights with ``final_digest``
    (its ``model_digest`` metadata). The export renames the file into place only after
    its parity check, so a file that loads and names the digest is a whole export."""
    if not final_digest or not path.is_file():
        return False
    try:
        from fedge.serve.export import read_metadata

        return read_metadata(path).get("model_digest") == final_digest
    except Exception:  # not ONNX, truncated, or onnx missing: export again
        return False


async def write_report(coord: Coordinator, job_id: str) -> bool:
    """The job's report from the coordinator's records, written in a worker thread
    (the loop keeps serving). Audited either way; a failure leaves the job completed."""
    from fedge.coordinator.admin import onnx_export_failure
    from fedge.coordinator.report import write_job_report

    status = coord.job_status(job_id)
    plan_toml = coord.store.job(job_id).plan_toml
    out = ck.job_dir(coord.state_dir, job_id)
    # report.md's "Model file" says why model.onnx is absent, in jobs status's words
    try:
        failure = onnx_export_failure(coord, job_id, status)
    except sqlite3.Error as exc:
        log.warning("job %s: its export's failures cannot be read (%s): the report names "
                    "none", job_id, exc)
        failure = None
    if failure is not None:
        status = {**status, "onnx_export": failure}
    try:
        files = await _thread_to_its_end(write_job_report, out, status, plan_toml)
    except Exception as exc:  # a report must not take the coordinator down
        reason = str(exc)
        if isinstance(exc, OSError) and exc.filename is None:
            # a write's own error names no file (ENOSPC): the directory is named here
            reason = f"cannot write the report in {out}: {type(exc).__name__}: {exc}"
        log.error("job %s: report failed: %s", job_id, reason, exc_info=exc)
        _audit(coord, job_id, "report_failed", {"job": job_id, "reason": reason})
        return False
    log.info("job %s report written to %s (%s)", job_id, out, ", ".join(files))
    _audit(coord, job_id, "report_written", {"job": job_id, "files": files})
    return True


async def _thread_to_its_end(fn: Any, *args: Any) -> Any:
    """``asyncio.to_thread(fn, *args)``, except that a cancellation (a stop: serve's
    _cut_short) waits for the thread's end before it goes on: a thread is not stopped
    by it, and would write on after serve returned. For short writes (a report)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation is what is said
        raise


async def export_final_model(coord: Coordinator, job_id: str, *,
                             timeout_s: float = 600.0) -> bool:
    """Export a finished job's model to ONNX beside its checkpoint (``model.onnx``).

    The export (torch, onnx, the parity check) runs in a child process, ``fedge
    export``, so the coordinator never imports torch and its loop keeps serving.
    The outcome is audited either way; a refused export leaves the job completed.
    """
    out = ck.final_path(coord.state_dir, job_id).with_name("model.onnx")
    # fedge.coordinator.child: the export dies with the coordinator, even with SIGKILL
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedge.coordinator.child", str(os.getpid()),
        "fedge.cli", "export", "--job", job_id,
        "--state-dir", str(coord.state_dir), "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        err = f"timed out after {timeout_s:.0f} s".encode()
    except BaseException:
        # cancelled (the coordinator stops: serve's _cut_short): the child goes now, and
        # is waited for, so that it writes nothing after the coordinator is gone. Not
        # audited as a failure (it would count towards admin.export_given_up): the job
        # stays without model.onnx, so its next start exports it again (unfinished_jobs)
        await _kill_child(proc)
        raise
    if proc.returncode == 0 and out.exists():
        log.info("job %s exported to %s", job_id, out)
        _audit(coord, job_id, "model_exported", {"job": job_id, "path": str(out)})
        return True
    reason = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    # the model and the version it failed for: the same failure for the same model
    # twice is not tried again at each start (admin.export_given_up)
    try:
        final_digest = coord.store.job(job_id).final_digest
    except StoreError:  # a checkpoint exported without its job's record (no digest)
        final_digest = ""
    log.warning("job %s: ONNX export failed: %s", job_id, reason)
    _audit(coord, job_id, "model_export_failed", {
        "job": job_id, "reason": reason, "final_digest": final_digest,
        "version": __version__})
    return False


async def _kill_child(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL ``proc`` if it still runs, and wait for its end: reaped while the loop
    runs, it leaves no transport for a closed loop's ``__del__`` ("Event loop is
    closed") and writes nothing after its coordinator is gone."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


def _needs_initial_model(coord: Coordinator) -> Any:
    """The next job to start if its round-0 checkpoint does not exist yet."""
    jobs = coord.store.jobs(status="running") or coord.store.jobs(status="queued")
    if not jobs or jobs[0].committed_round != 0:
        return None
    if ck.round_path(coord.state_dir, jobs[0].job_id, 0).exists():
        return None
    return jobs[0]


# What a disk says when it cannot take a write for now: full, over quota, remounted
# read-only, failing. A job's starting model that meets one waits for the disk (as a
# round's commit and a job's finish do), rather than failing the job for good: on a
# full disk every queued job behind it would fail the same way, one after another.


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk refusing a write for now (DISK_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


# A starting model the disk refused is tried again after FINISH_RETRY_S, then after
# twice the last pause each time it fails again, up to this: a disk that stays
# read-only or failing (EROFS, EIO) is not written to every few seconds for days.
DISK_WAIT_MAX_S = 300.0


@dataclass
class _DiskWait:
    """The next job whose starting model the disk could not take, and when to try
    again: FINISH_RETRY_S after the first failure, then each pause twice the last, up
    to DISK_WAIT_MAX_S; and, once the model's size is known, not before the disk has
    that much free (os.statvfs, looked at every FINISH_RETRY_S): on a full disk a try
    would only fill it again for a moment, taking the room the database's writes need.
    (A quota, EDQUOT, is not what statvfs says is free; a read-only or failing disk
    has room: those are tried after the pause alone.) The model built is kept for the
    next try, so its torch child runs once per job, not at each try. Said once when
    the job begins to wait (and again if the cause changes), and once when its model
    is written."""

    job_id: str = ""
    why: str = ""  # "PATH: CAUSE"
    since: float = 0.0
    retry_at: float = float("-inf")
    path: Path | None = None
    cause: str = ""
    pause: float = 0.0  # before the next try, doubled at each failure
    needed: int = 0  # bytes the model needs on the disk (0: not known)
    cause_errno: int | None = None  # the last failure's: only ENOSPC waits for room
    weights: Any = None  # the model built for job_id, kept for the next try

    def due(self, job_id: str, now: float) -> bool:
        """Whether ``job_id``'s starting model may be tried now."""
        if job_id != self.job_id:
            return True
        if now < self.retry_at:
            return False
        if self.needed and self.path is not None and self.cause_errno == errno.ENOSPC:
            free = _free_bytes(self.path)
            if free is not None and free < self.needed:
                self.retry_at = now + FINISH_RETRY_S  # no try: the disk is looked at again
                return False
        return True

    def failed(self, job_id: str, path: Path, exc: OSError, now: float, *,
               weights: Any = None, needed: int = 0) -> None:
        why = f"{path}: {exc.strerror or exc}"
        if (job_id, why) != (self.job_id, self.why):
            room = (", and not before the disk has room for it"
                    if exc.errno == errno.ENOSPC else "")
            log.error("job %s waits: its starting model cannot be written to %s; tried "
                      "again in %g s, then at twice the last pause each time (up to %g s)%s; "
                      "the job left queued", job_id, why, FINISH_RETRY_S, DISK_WAIT_MAX_S,
                      room)
        if job_id != self.job_id:
            self.since, self.pause = now, FINISH_RETRY_S
        else:
            self.pause = min(max(self.pause, FINISH_RETRY_S) * 2, DISK_WAIT_MAX_S)
        self.job_id, self.why, self.retry_at = job_id, why, now + self.pause
        self.path, self.cause, self.cause_errno = path, exc.strerror or str(exc), exc.errno
        if weights is not None:
            self.weights, self.needed = weights, needed

    def model(self, job_id: str) -> Any:
        """The starting model built for ``job_id`` at an earlier try, or None."""
        return self.weights if job_id == self.job_id else None

    def done(self, job_id: str, path: Path, now: float) -> None:
        if job_id == self.job_id:
            log.warning("job %s: its starting model %s written after %.0f s waiting for "
                        "the disk", job_id, path, now - self.since)
        self.forget()

    def forget(self) -> None:
        """No job waits (its model written, or it is no longer the next to start)."""
        self.job_id, self.why, self.retry_at = "", "", float("-inf")
        self.path, self.cause, self.pause, self.needed, self.weights = None, "", 0.0, 0, None
        self.cause_errno = None

    def activity(self, job_id: str) -> str:
        """What STATUS= says while ``job_id`` waits ("" when it does not)."""
        if job_id != self.job_id:
            return ""
        return f"job {job_id}: its starting model waits for the disk ({self.why})"

    def reason(self) -> str:
        """Why the job waits, as jobs_list and jobs_status say it (Coordinator.
        start_wait): the cause first, which a list cut short keeps."""
        return f"{self.cause}: its starting model cannot be written to {self.path}"


def _free_bytes(path: Path) -> int | None:
    """The bytes free to this process on the disk that holds ``path`` (its nearest
    existing directory), or None when it cannot be asked."""
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    # root may use the blocks reserved for it; anyone else only f_bavail
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


async def _prepare_initial_model(coord: Coordinator, wait: _DiskWait | None = None) -> None:
    """Build the next job's starting model in a child and write its round-0 checkpoint.

    A job whose model cannot be built, or whose directory cannot be written, is
    marked failed with the reason (audited): left queued, it would be retried on
    every tick and hold up every job behind it. Except where the disk refuses the
    write for now (is_disk_error: full, read-only): the job stays queued, shown so in
    jobs_list and jobs_status (Coordinator.start_wait), and ``wait`` keeps the model
    built, says when to try again and says it once.
    """
    import subprocess

    from fedge.coordinator.initmodel import initial_weights_subprocess
    from fedge.coordinator.plan import PlanError, parse_plan

    wait = wait if wait is not None else _DiskWait()
    job = _needs_initial_model(coord)
    if job is None:
        return
    loop = asyncio.get_running_loop()
    path = ck.round_path(coord.state_dir, job.job_id, 0)
    weights = wait.model(job.job_id)
    plan_text = job.plan_toml
    try:
        plan = parse_plan(job.plan_toml)
        plan_text = plan.text
        # the job's directory first: one that cannot be made fails before torch starts
        path.parent.mkdir(parents=True, exist_ok=True)
        if weights is None:
            weights = await loop.run_in_executor(None, initial_weights_subprocess, plan)
        ck.save_checkpoint(path, ck.Checkpoint(weights=weights, round=0, plan=plan.text))
        wait.done(job.job_id, path, time.monotonic())
        coord.start_wait = None
        return
    except PlanError as exc:
        reason = str(exc)
    except subprocess.TimeoutExpired as exc:
        reason = f"building the starting model timed out after {exc.timeout:.0f} s"
    except OSError as exc:
        if is_disk_error(exc):
            # what the checkpoint takes, near enough: the weights and the plan
            needed = (weights.nbytes + len(plan_text.encode()) + CHECKPOINT_OVERHEAD
                      if weights is not None else 0)
            wait.failed(job.job_id, path, exc, time.monotonic(), weights=weights,
                        needed=needed)
            coord.start_wait = (job.job_id, wait.reason())  # jobs list and status say it
            return
        reason = f"cannot prepare the starting model {path}: {exc}"
    except ck.CheckpointError as exc:
        reason = f"cannot prepare the starting model {path}: {exc}"
    log.error("job %s failed: %s", job.job_id, reason)
    coord.store.set_job_status(job.job_id, "failed", actor="coordinator", error=reason)


# a checkpoint's header and metadata beyond its weights and plan (safetensors' JSON
# header, the digest, the metrics), rounded up
CHECKPOINT_OVERHEAD = 64 << 10


def _deaf_for(coord: Coordinator, heard_at: float, entered: float, timeout: float) -> float:
    """After ``server.recv`` returned: when the loop last took what had arrived was
    ``heard_at``; it went back to listening at ``entered`` for at most ``timeout``. Time
    away from the socket (a long tick, a long message) and time a wait overran (the
    process paused or swapped out) was the coordinator's deafness: once it reaches
    STALL_S, the sites' silence over it is not held against them (not_listening:
    heartbeats and the round's deadlines). Returns now, the new ``heard_at``."""
    now = time.monotonic()
    deaf = (entered - heard_at) + max(0.0, now - entered - timeout)
    if deaf >= STALL_S:
        log.warning("no message was taken for %.1f s (the loop did not run: paused, swapped "
                    "out or busy): the round's deadlines move %.1f s later", deaf, deaf)
        coord.not_listening(deaf)
    return now


def _handle(coord: Coordinator, site: str, frames: Any,
            address: str = "") -> DatabaseLocked | None:
    """Hand one message, from ``site``'s connection at ``address``, to the
    coordinator; the DatabaseLocked when it was handed back because the database is
    locked, to be handled again later, else None."""
    try:
        coord.handle_frames(site, frames, address)
    except DatabaseLocked as exc:
        return exc
    except sqlite3.DatabaseError as exc:
        if not isinstance(exc, sqlite3.OperationalError):
            raise  # corrupt: ends the process (fedge.coordinator.cli)
        log.error("a message from %s could not be handled (database %s refused a write): "
                  "%s; dropped", site, coord.store.path, exc)
    except Exception:  # one site's message must not end the coordinator
        log.exception("a message from %s could not be handled; dropped", site)
    return None


class _LockReport:
    """Says, once per FINISH_RETRY_S while it lasts, that another process holds the
    database's lock, naming the file; and when it is free again."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.reported_at = float("-inf")
        self.since: float | None = None

    def update(self, held: int) -> None:
        since = self.store.locked_since
        if since is not None and self.store.writable():
            since = None  # released with nothing written since
        now = time.monotonic()
        if since is not None:
            self.since = since
            if now - self.reported_at >= FINISH_RETRY_S:
                self.reported_at = now
                log.error("database %s is locked by another process (a sqlite3 shell or a "
                          "backup in a write transaction?) for %.1f s: writes wait at most "
                          "%g s, then this loop backs off %g s and tries again; %d message(s) "
                          "held until it is free, the rest wait in ZeroMQ (next report in "
                          "%g s)", self.store.path, now - since, self.store.busy_timeout_s,
                          BUSY_BACKOFF_S, held, FINISH_RETRY_S)
        elif self.since is not None:
            log.warning("database %s is writable again, after %.1f s", self.store.path,
                        now - self.since)
            self.since = None
            self.reported_at = float("-inf")


def _maybe_die(coord: Coordinator, kill_at: str) -> None:
    runner = coord.runner
    if runner is None or runner.round is None:
        return
    rnd = runner.round
    if f"{rnd.round}:{rnd.phase.value}" == kill_at:
        log.warning("%s=%s: killing myself in job %s", KILL_AT_ENV, kill_at, rnd.job_id)
        os.kill(os.getpid(), signal.SIGKILL)


def _tick_raised(coord: Coordinator, exc: Exception, reported_at: float) -> float:
    """A tick raised something that is not a write failure: fail the round in flight
    with the reason (Coordinator.fail_round_in_flight) and log it, in full once per
    FINISH_RETRY_S. Returns when it was last reported in full."""
    reason = m.clip_reason(f"the coordinator could not go on with it: "
                           f"{type(exc).__name__}: {exc}", 500)
    try:
        failed = coord.fail_round_in_flight(reason)
    except Exception:
        log.exception("failing the round after a tick error failed too")
        failed = False
    now = time.monotonic()
    if now - reported_at >= FINISH_RETRY_S or failed:
        log.error("coordinator tick failed (%s); the coordinator goes on: %s: %s",
                  "the round in flight is failed" if failed else "no round to fail",
                  type(exc).__name__, exc, exc_info=exc)
        return now
    return reported_at


CLOSE_AFTER_S = 1.0  # a refused site's connection outlives its Rejected by this much


async def _drain(coord: Coordinator, server: Any, key_of: dict[str, str], codec: Any) -> None:
    """Send the outbox. A message that cannot be encoded or sent is logged and
    skipped: the others still go, and the loop goes on."""
    from fedge.transport import NotConnected

    outbox, coord.outbox = coord.outbox, []
    for out in outbox:
        kind = type(out.body).__name__
        key = key_of.get(out.site)
        if key is None:
            try:
                key = coord.store.appliance(out.site).curve_public_z85
            except Exception as exc:  # not enrolled (any more), or the database failed
                log.warning("%s for %s not sent: its key cannot be looked up: %s: %s",
                            kind, out.site, type(exc).__name__, codec.short(str(exc), 300))
                continue
        if out.close_after:
            # the connection this goes to, by its routing id (a reconnection of the
            # same site meanwhile is another connection and stays), shut once the
            # message has had time to leave libzmq's queue
            peer = server.peer_for_key(key)
            if peer is not None:
                asyncio.get_running_loop().call_later(CLOSE_AFTER_S, server.disconnect, peer)
        try:
            frames = codec.encode(out.body, sender="coordinator", job=out.job, round=out.round)
        except Exception as exc:  # e.g. OversizeMessage: a bug here must not end serve()
            log.error("%s for %s cannot be encoded, not sent: %s: %s", kind, out.site,
                      type(exc).__name__, codec.short(str(exc), 300))
            continue
        try:
            await server.send(key, frames)
        except NotConnected:
            log.info("%s is not connected; %s not delivered", out.site, kind)
        except Exception as exc:
            log.error("%s for %s could not be sent: %s: %s", kind, out.site,
                      type(exc).__name__, codec.short(str(exc), 300))


def _silent_for(coord: Coordinator, site: str) -> float | None:
    """How long nothing has come from ``site``, by the Coordinator's clock (each message
    handled sets it); None when it has not been heard from on this connection."""
    conn = coord.conns.get(site)
    if conn is None or conn.last_seen == float("-inf"):
        return None
    return coord.clock() - conn.last_seen


def _timeout_setting(cfg: CoordinatorConfig) -> str:
    where = f" in {cfg.path}" if cfg.path is not None else ""
    return f"[heartbeat] timeout_s = {cfg.heartbeat_timeout_s:g}{where}"


def _went_silent(cfg: CoordinatorConfig, silent: float) -> str:
    """Why a site the transport lost after ``silent`` seconds without a word is gone:
    the setting it was held to, and the agent's that must be below it (a site whose
    heartbeats came less often only flapped, 'connected' then 'went silent', and
    nobody said why)."""
    return (f"went silent: nothing came from it for {silent:.1f} s, past "
            f"{_timeout_setting(cfg)}; its agent's [heartbeat] interval_s must be shorter")


FLAP_COUNT = 3  # a site that went silent this many times ...
FLAP_WINDOW_S = 600.0  # ... within this long, coming back in between, is warned of once


@dataclass
class _Flapping:
    """The sites that keep going silent and coming back (a heartbeat interval longer
    than the timeout does that): each is warned of once per process."""

    window_s: float = FLAP_WINDOW_S
    count: int = FLAP_COUNT
    silences: dict[str, collections.deque[float]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def went_silent(self, site: str, now: float) -> int | None:
        """Record that ``site`` went silent at ``now``; the number of times in the
        window when that makes it one to warn of (the first time), else None."""
        if site in self.warned:
            return None
        times = self.silences.setdefault(site, collections.deque())
        times.append(now)
        while times and times[0] < now - self.window_s:
            times.popleft()
        if len(times) < self.count:
            return None
        self.warned.add(site)
        del self.silences[site]
        return self.count


ADMIN_RESTART_S = 5.0  # a failed admin channel is started again after this, at first
ADMIN_RESTART_MAX_S = 300.0  # ... doubling for each failure in a row, up to this
ADMIN_HEALTHY_S = 60.0  # a channel that served this long ends a run of failures


@dataclass
class _AdminWatch:
    """The admin channel's restarts, kept between `_watch_admin` calls."""

    started_at: float
    failures: int = 0  # in a row
    stopped_at: float | None = None  # when the current task was seen stopped


def _watch_admin(cfg: CoordinatorConfig, coord: Coordinator,
                 task: asyncio.Task[None] | None, watch: _AdminWatch
                 ) -> asyncio.Task[None] | None:
    """An admin channel that stopped by itself (it serves until cancelled) is logged
    and started again: at least ADMIN_RESTART_S after it was started, then twice as
    long after each further failure in a row, up to ADMIN_RESTART_MAX_S (a port taken
    by another process must not fill the journal). The first failure of a run is
    logged with its traceback, the rest in one line each."""
    now = time.monotonic()
    if task is None:
        return None
    if not task.done():
        if watch.failures and now - watch.started_at >= ADMIN_HEALTHY_S:
            watch.failures = 0
        return task
    if watch.stopped_at is None:
        watch.stopped_at = now
        watch.failures += 1
    if watch.failures == 1:
        due = watch.started_at + ADMIN_RESTART_S
    else:
        due = watch.stopped_at + min(ADMIN_RESTART_S * 2 ** (watch.failures - 1),
                                     ADMIN_RESTART_MAX_S)
    if now < due:
        return task
    exc = None if task.cancelled() else task.exception()
    why = f"{type(exc).__name__}: {exc}" if exc is not None else "cancelled"
    if watch.failures == 1:
        log.error("the admin channel stopped (%s); starting it again", why, exc_info=exc)
    else:
        log.error("the admin channel stopped again (%s), %d times in a row; starting it "
                  "again, next time after %g s", why, watch.failures,
                  min(ADMIN_RESTART_S * 2 ** watch.failures, ADMIN_RESTART_MAX_S))
    watch.started_at, watch.stopped_at = now, None
    return _start_admin(cfg, coord)


def _start_admin(cfg: CoordinatorConfig, coord: Coordinator) -> asyncio.Task[None] | None:
    if not cfg.admin or cfg.admin.get("enabled") is False:  # [admin] enabled = false
        return None
    admin = _optional("fedge.coordinator.admin")
    if admin is None:
        log.warning("[admin] configured but fedge.coordinator.admin is not installed")
        return None
    endpoint = cfg.admin.get("endpoint") or cfg.provision.get("admin_endpoint")
    if not endpoint or not cfg.provision:
        log.error("[admin] needs an endpoint and a provision file (operator keys)")
        return None
    config = admin.AdminConfig.from_provision(cfg.provision, endpoint)
    updates = getattr(coord, "updates", None)
    service = admin.AdminService(coord, config.operators, updates=updates)
    coord.on_update_outcome = service.on_outcome
    coord.on_site_returned = service.on_site_returned
    coord.on_round_ended = service.on_round_ended
    if os.environ.get(KILL_AT_ENV) == KILL_ON_OUTCOME:
        def die_on_outcome(site: str, outcome: Any) -> None:
            log.warning("%s=%s: killing myself as %s reports %s", KILL_AT_ENV,
                        KILL_ON_OUTCOME, site, outcome.rollout_id)
            os.kill(os.getpid(), signal.SIGKILL)

        coord.on_update_outcome = die_on_outcome
    return asyncio.ensure_future(admin.serve_admin(coord, config, updates=updates,
                                                   service=service))


def run(cfg: CoordinatorConfig, *, coordinator: Coordinator | None = None) -> int:
    """Blocking entry point for ``fedge coordinator`` (fedge.coordinator.cli, which
    checks $FEDGE_SIMD first, before the state directory is locked or made).

    Raises: InstanceLocked: another coordinator runs on the state directory."""
    hold_state_dir(cfg)
    return asyncio.run(serve(cfg, coordinator=coordinator))
