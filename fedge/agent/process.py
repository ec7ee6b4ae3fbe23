"""The agent process: identity from the state dir, the DEALER socket, heartbeats, systemd.

Configuration (TOML)::

    state_dir = "/var/lib/fedge"    # enrolment: keys/, roster.json, enrolment.json
    workers = 1                     # training/evaluation threads
    stuck_task_grace_s = 120.0      # a task this long past its cancel or deadline: stuck
    data_load_s = 1800.0            # a data set's load before a task (its own deadline)

    [heartbeat]
    interval_s = 1.0
    timeout_s = 5.0

    [eligibility]                   # fedge.health.EligibilityPolicy.from_config
    [[datasets]]                    # fedge.train.api.DatasetSpec.from_config
    name = "fed_tcga_brca"
    kind = "fed_tcga_brca"
    path = "/data/fed_tcga_brca"
    site = 0

The state dir layout is the one ``fedge agent enrol`` writes (fedge.agent.enrol):
``keys/curve.json`` {public, secret}, ``keys/identity.key``,
``keys/coordinator.json`` {endpoint, public_key}, ``roster.json``,
``enrolment.json`` {site, roster_public_key, ...}. The two secrets may instead be
systemd credentials (``$CREDENTIALS_DIRECTORY/fedge_curve.key``, ``fedge_identity.key``),
which win over the state dir's (`load_enrolled`).

Under systemd: READY=1 once the enrolment is loaded and the client is connecting
(STATUS= "connecting to ENDPOINT", then "connected to ..."), so a coordinator or
WAN that is down at boot does not get the agent killed by TimeoutStartSec;
WATCHDOG=1 from the event loop, also while it retries, but not while a worker
thread is stuck (``fedge.agent.runtime.Agent.stuck_worker``: a task running
``stuck_task_grace_s`` past its cancel or its plan's deadline), so that systemd
restarts an agent whose training deadlocked; STATUS= with the current task; a
software update in trial is confirmed only by a heartbeat ack, i.e. a real
connection (fedge.agent.updates); STOPPING=1 on SIGTERM — the stage in
progress is abandoned (the coordinator treats the site as a dropout) and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fedge import instance_lock
from fedge.agent.guard import PrivacyPolicy, PrivacyPolicyError, RevealLog
from fedge.agent.jobstate import JobStateStore
from fedge.agent.runtime import (
    DATA_LOAD_S,
    DISK_THREAD_PREFIX,
    HEALTH_MAX_AGE_S,
    STUCK_TASK_GRACE_S,
    TASK_THREAD_PREFIX,
    Agent,
)
from fedge.text import as_user as _as_user

if TYPE_CHECKING:
    from fedge.health import EligibilityPolicy

log = logging.getLogger("fedge.agent")

TRIAL_UNCONFIRMED_EXIT = 75  # the unit's RestartForceExitStatus
# No socket to the coordinator can be made (run_agent): as a configuration error does
SOCKET_FAILED_EXIT = 2
# One of the agent's event-loop tasks (receiving the coordinator's messages, sending
# heartbeats, watching the coordinator's name, resuming a deferred trial, the watchdog
# pings) ended on an error (run_agent): the process would otherwise run on without it,
# its watchdog fed, a site that looks alive but no longer beats or hears. EX_SOFTWARE;
# the unit's Restart=on-failure restarts it after RestartSec, within its start limit.
WORKER_FAILED_EXIT = 70
# How long a stop waits for a task already running on a worker thread (training,
# evaluation, an update being staged) before the process leaves without it: well
# inside the unit's TimeoutStopSec=90s, so `systemctl stop` and an upgrade's restart
# never end in SIGKILL. Leaving mid-task loses nothing: a result is sent, and the
# ledger, cursors and update slots written, only by atomic steps already made safe
# against a kill, and the coordinator retries the round without this site.
STOP_GRACE_S = 5.0

# Fault injection for the crash tests: a comma-separated list of wire message
# types; the agent SIGKILLs itself on receiving one (e.g. "train_task" = dies at
# the start of local training, "secagg.unmask_request" = dies while unmasking);
# "train_task@2" dies only on round 2's.
KILL_ON_ENV = "FEDGE_TEST_KILL_ON"


# The link to the coordinator in the log (LinkLog): a handshake failure with the same
# cause (wrong coordinator key, appliance not enrolled) is said once, then reminded of
# with a count every LINK_REMIND_S; an outage of another kind is said at INFO, then at
# WARNING once it has lasted OUTAGE_WARN_S, again every OUTAGE_REPEAT_S, and its length
# when the link is back.
LINK_REMIND_S = 300.0
OUTAGE_WARN_S = 300.0
OUTAGE_REPEAT_S = 3600.0
# The coordinator's name, while the agent is not connected (`watch_coordinator_name`):
# looked up off the event loop every NAME_CHECK_S, each lookup given up after
# RESOLVE_TIMEOUT_S (its thread is left to end by itself; glibc bounds it).
NAME_CHECK_S = 30.0
RESOLVE_TIMEOUT_S = 10.0


def _duration(seconds: float) -> str:
    """``seconds`` for a log line: "42 s", "5 min", "2 h 5 min"."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


class LinkLog:
    """What the agent logs of its link to the coordinator: the transport's events in,
    (level, line) pairs out. Pure: the caller passes the time.

    A wrong coordinator key or an unenrolled appliance fails every attempt (every 30 s
    once backed off) for as long as nobody fixes it: the cause is logged once at ERROR,
    then once every ``remind_s`` with the count of attempts since. A coordinator that is
    down or unreachable gives one INFO line when the link goes, a WARNING once it has
    been gone ``warn_s`` and every ``repeat_s`` after (hospital IT should hear of it
    without reading INFO lines), and an INFO line saying how long it was gone when it
    is back. The outage counts from ``now`` at construction too: an agent that never
    connects is warned of.
    """

    def __init__(self, site: str, endpoint: str, retry_s: float, now: float, *,
                 remind_s: float = LINK_REMIND_S, warn_s: float = OUTAGE_WARN_S,
                 repeat_s: float = OUTAGE_REPEAT_S) -> None:
        self.site, self.endpoint, self.retry_s = site, endpoint, retry_s
        self.remind_s, self.warn_s, self.repeat_s = remind_s, warn_s, repeat_s
        self._down_since: float | None = now
        self._lost = False  # the link was up once: its return is worth a line
        self._warned_at: float | None = None  # the outage's last WARNING
        self._failure: str | None = None  # the handshake failure in force
        # what is known to keep the link down (the coordinator's name does not
        # resolve): said in the outage's WARNING
        self.cause: str | None = None
        self._failure_logged_at = 0.0
        self._failure_repeats = 0  # attempts failing so since it was last logged

    def event(self, kind: str, detail: str, now: float) -> list[tuple[int, str]]:
        """A ClientEvent's kind and detail: the lines to log."""
        if kind == "connected":
            lines = [(logging.INFO, f"{self.site}: connected {detail}")]
            if self._down_since is not None and (self._lost or self._warned_at is not None):
                lines = [(logging.INFO, f"{self.site}: connected {detail} after "
                          f"{_duration(now - self._down_since)} without a connection")]
            self._down_since = self._warned_at = self._failure = None
            self._failure_repeats = 0
            self._lost = True
            return lines
        if kind in ("disconnected", "heartbeat_timeout"):
            if self._down_since is None:
                self._down_since = now
            return [(logging.INFO, f"{self.site}: {kind} {detail}")]
        if kind == "handshake_failed":
            if self._down_since is None:
                self._down_since = now
            if detail != self._failure:
                self._failure, self._failure_logged_at = detail, now
                self._failure_repeats = 0
                return [(logging.ERROR, f"{self.site}: {detail}")]
            self._failure_repeats += 1
            if now - self._failure_logged_at < self.remind_s:
                return []
            since = now - self._failure_logged_at
            lines = [(logging.ERROR, f"{self.site}: {detail} (still so: "
                      f"{self._failure_repeats} more failed attempt(s) in the last "
                      f"{_duration(since)}; retrying every {self.retry_s:g} s)")]
            self._failure_logged_at, self._failure_repeats = now, 0
            return lines
        return []

    def tick(self, now: float) -> list[tuple[int, str]]:
        """The clock: the outage's WARNING when it is due."""
        if self._down_since is None or self._failure is not None:
            return []  # connected, or a handshake failure that has its own lines
        down = now - self._down_since
        if down < self.warn_s or (self._warned_at is not None
                                  and now - self._warned_at < self.repeat_s):
            return []
        self._warned_at = now
        cause = f" ({self.cause})" if self.cause else ""
        return [(logging.WARNING, f"{self.site}: no connection to the coordinator at "
                 f"{self.endpoint} for {_duration(down)}{cause}; still retrying every "
                 f"{self.retry_s:g} s at most")]


def coordinator_name(endpoint: str) -> tuple[str, int] | None:
    """The host name and port of ``tcp://NAME:PORT``; None when the host is an IP
    address (nothing to resolve) or the endpoint is not tcp://."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if host.startswith("[") or not port.isdigit():
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        return host, int(port)


class IPv6Only(str):
    """A `resolve_name` error: the name has IPv6 addresses and no IPv4 one. The agent
    never reaches it: its socket resolves a name for IPv4 alone (ZMQ_IPV6 is on only
    for an IPv6 address in brackets: fedge.transport._sockopts.ipv6_for). The text
    follows "the coordinator's name X": "has only IPv6 addresses (A, B), and a name is
    dialled over IPv4: enrol with its address in brackets, tcp://[A]:P"."""


def _name_trouble(error: str) -> str:
    """What follows "the coordinator's name X" for a `resolve_name` error: "does not
    resolve (why)", or an `IPv6Only`'s text."""
    return str(error) if isinstance(error, IPv6Only) else f"does not resolve ({error})"


# getaddrinfo's answers for a name with no address of the family asked for (glibc:
# EAI_NONAME from /etc/hosts, EAI_NODATA from DNS); a temporary failure is not one
_NO_SUCH_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
                    getattr(socket, "EAI_ADDRFAMILY", socket.EAI_NONAME)}


def _addresses(host: str, port: int, family: socket.AddressFamily) -> list[str]:
    from fedge.transport._tcp import plain_ip

    infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    return list(dict.fromkeys(plain_ip(str(info[4][0])) for info in infos))


def _lookup(host: str, port: int) -> tuple[list[str], str | None]:
    """getaddrinfo for IPv4, as the agent's socket resolves the name it dials (libzmq
    without ZMQ_IPV6): (addresses in its order, None) or ([], why). A name with no IPv4
    address is looked up for IPv6 too, to say so when it has only those (why is then
    an `IPv6Only`): counting it resolved would hide that the agent cannot reach it."""
    try:
        addresses = _addresses(host, port, socket.AF_INET)
    except socket.gaierror as exc:
        if exc.errno not in _NO_SUCH_ADDRESS:
            return [], exc.strerror or str(exc)
        try:
            ipv6 = _addresses(host, port, socket.AF_INET6)
        except (OSError, UnicodeError):
            ipv6 = []
        if not ipv6:
            return [], exc.strerror or str(exc)
        return [], IPv6Only(
            f"has only IPv6 addresses ({', '.join(ipv6)}), and a name is dialled over "
            f"IPv4: enrol with its address in brackets, tcp://[{ipv6[0]}]:{port}")
    except (OSError, UnicodeError) as exc:
        return [], str(exc)
    return (addresses, None) if addresses else ([], "no address")


def resolve_name(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S
                 ) -> tuple[list[str], str | None]:
    """`_lookup` in a daemon thread, given up after ``timeout_s`` (a DNS server that
    does not answer): ([], "no answer within T s") then. Never raises."""
    result: list[tuple[list[str], str | None]] = []
    worker = threading.Thread(target=lambda: result.append(_lookup(host, port)),
                              name="fedge-resolve", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else ([], f"no answer within {timeout_s:g} s")


async def resolve_name_async(host: str, port: int, timeout_s: float = RESOLVE_TIMEOUT_S
                             ) -> tuple[list[str], str | None]:
    """`resolve_name` without blocking the event loop. Never raises."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[list[str], str | None]] = loop.create_future()

    def work() -> None:
        result = _lookup(host, port)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

    threading.Thread(target=work, name="fedge-resolve", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), timeout_s)
    except TimeoutError:
        return [], f"no answer within {timeout_s:g} s"


class NameLog:
    """What the agent logs of the coordinator's name: once at WARNING when it does not
    resolve (for IPv4: `_lookup`), once at INFO when it does again (or the agent
    connected). Pure."""

    def __init__(self, site: str, name: str) -> None:
        self.site, self.name = site, name
        self.failing: str | None = None  # why it does not resolve, while it does not

    def looked_up(self, addresses: list[str], error: str | None) -> list[tuple[int, str]]:
        if error is not None:
            first, self.failing = self.failing is None, error
            if not first:
                return []
            return [(logging.WARNING, f"{self.site}: the coordinator's name {self.name} "
                     f"{_name_trouble(error)}; still trying")]
        if self.failing is None:
            return []
        self.failing = None
        return [(logging.INFO, f"{self.site}: the coordinator's name {self.name} resolves "
                 f"again, to {', '.join(addresses)}")]

    def connected(self) -> list[tuple[int, str]]:
        if self.failing is None:
            return []
        self.failing = None
        return [(logging.INFO, f"{self.site}: the coordinator's name {self.name} resolves "
                 "again")]


def coordinator_endpoint_warnings(endpoint: str, *, resolve_timeout_s: float =
                                  RESOLVE_TIMEOUT_S) -> list[str]:
    """What `fedge agent check` should say of the enrolled coordinator endpoint: it is
    loopback (`fedge.agent.enrol.loopback_coordinator`), or its name does not resolve
    here for IPv4, as the agent's socket resolves it (looked up, at most
    ``resolve_timeout_s``; a name with IPv6 addresses alone is said to be one)."""
    from fedge.agent.enrol import loopback_coordinator

    loopback = loopback_coordinator(endpoint)
    found = [loopback] if loopback is not None else []
    name = coordinator_name(endpoint)
    if name is not None:
        _, error = resolve_name(*name, timeout_s=resolve_timeout_s)
        if isinstance(error, IPv6Only):
            found.append(f"the coordinator's name {name[0]} (from {endpoint}, the enrolled "
                         f"coordinator endpoint) {error}")
        elif error is not None:
            found.append(f"the coordinator's name {name[0]} (from {endpoint}, the enrolled "
                         f"coordinator endpoint) does not resolve here ({error}): the agent "
                         "cannot connect until it does (DNS, or /etc/hosts)")
    return found


class AgentConfigError(ValueError):
    """An invalid agent configuration or enrolment state; names the key or file."""


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    datasets: list[dict[str, Any]] = field(default_factory=list)
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    workers: int = 1
    eligibility: dict[str, Any] = field(default_factory=dict)
    health: bool = True
    # a software update in trial that no coordinator confirms within this is given up:
    # the agent exits 75, systemd restarts it, preflight rolls back after 3 such starts
    update_trial_s: float = 600.0
    # a software update staged while the agent works for a round restarts it once the
    # round is over, or after this whatever it does (fedge.agent.updates.RESTART_WAIT_S)
    update_restart_wait_s: float = 1800.0
    # the site's privacy floor ([privacy]): secure aggregation required by default
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # a worker task running this long past its cancel or its plan's deadline is stuck:
    # not eligible, and no more watchdog pings (fedge.agent.runtime.STUCK_TASK_GRACE_S)
    stuck_task_grace_s: float = STUCK_TASK_GRACE_S
    # a data set's load before a task (not counted against the plan's train_s/eval_s)
    # may run this long, plus stuck_task_grace_s, before the worker is stuck: a large
    # image set's first load takes long (fedge.agent.runtime.DATA_LOAD_S)
    data_load_s: float = DATA_LOAD_S

    @cached_property
    def eligibility_policy(self) -> EligibilityPolicy:
        """The [eligibility] table, parsed once for both the health probe and the
        report age limit (fedge.health is imported only where health is enabled).

        Raises:
            ValueError: the table is invalid (names the key).
        """
        from fedge.health import EligibilityPolicy

        return EligibilityPolicy.from_config(self.eligibility)


@dataclass(frozen=True)
class Enrolled:
    site: str
    curve_public: str
    curve_secret: str
    coordinator_endpoint: str
    coordinator_public_key: str
    identity: Any
    roster: Any
    roster_key: bytes = b""  # the console's roster key, trusted at enrolment
    roster_path: Path | None = None  # where a newer roster from the coordinator is kept


_KEYS = ("state_dir", "workers", "heartbeat", "eligibility", "datasets", "health",
         "update_trial_s", "update_restart_wait_s", "privacy", "stuck_task_grace_s",
         "data_load_s")


def load_config(path: str | Path) -> AgentConfig:
    """Read and check agent.toml: everything a value of it can get wrong is found here,
    before the enrolment is read or the state directory locked, and the message names
    the file, the table and the key. A UTF-8 byte-order mark (Windows Notepad's) is
    skipped.

    Raises: AgentConfigError: unreadable, bad TOML, unknown key or bad value (named).
    """
    from fedge.agent.trainer import check_dataset_tables
    from fedge.transport._sockopts import check_heartbeat

    p = Path(path)

    def refused(what: str) -> AgentConfigError:
        return AgentConfigError(f"agent config {what} (in {p})")

    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:  # binary, or UTF-16 as Windows Notepad saves it
        byte = exc.object[exc.start]
        raise AgentConfigError(f"agent config {p} is not UTF-8 text: byte 0x{byte:02x} at "
                               f"offset {exc.start} cannot be decoded; save it as UTF-8") from None
    except OSError as exc:
        raise AgentConfigError(f"cannot read agent config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"agent config {p} is not valid TOML: {exc}") from exc
    for key in raw:
        if key not in _KEYS:
            raise refused(f"key {key!r} is unknown; known: {', '.join(_KEYS)}")
    sd = raw.get("state_dir", os.environ.get("STATE_DIRECTORY", "/var/lib/fedge"))
    if not isinstance(sd, str) or not sd:
        raise refused(f"state_dir = {sd!r} must be a path")
    state_dir = Path(sd) if Path(sd).is_absolute() else p.parent / sd
    hb = raw.get("heartbeat", {})
    if not isinstance(hb, dict) or set(hb) - {"interval_s", "timeout_s"}:
        raise refused(f"[heartbeat] = {hb!r} takes interval_s, timeout_s")
    try:
        # what the sockets take, here rather than in the client's task, where a value
        # libzmq refuses left the agent never connecting, and saying nothing
        interval, timeout = check_heartbeat(hb.get("interval_s", 1.0),
                                            hb.get("timeout_s", 5.0))
    except ValueError as exc:
        raise refused(str(exc)) from None
    workers = raw.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise refused(f"workers = {workers!r} must be an integer >= 1")
    datasets = raw.get("datasets", [])
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        raise refused("datasets must be [[datasets]] tables")
    try:
        check_dataset_tables(datasets)  # before a path is read as one
    except ValueError as exc:
        raise refused(str(exc)) from None
    for d in datasets:
        if "path" in d and not Path(d["path"]).is_absolute():
            d["path"] = str(p.parent / d["path"])
    elig = raw.get("eligibility", {})
    if not isinstance(elig, dict):
        raise refused(f"[eligibility] = {elig!r} must be a table")
    health = raw.get("health", True)
    if not isinstance(health, bool):
        raise refused(f"health = {health!r} must be true or false")
    seconds = {}
    for name, default in (("update_trial_s", 600.0), ("update_restart_wait_s", 1800.0),
                          ("stuck_task_grace_s", STUCK_TASK_GRACE_S),
                          ("data_load_s", DATA_LOAD_S)):
        v = raw.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise refused(f"{name} = {v!r} must be > 0, a number of seconds like {default:g}")
        seconds[name] = v
    trial, restart_wait, stuck = (seconds["update_trial_s"], seconds["update_restart_wait_s"],
                                  seconds["stuck_task_grace_s"])
    if not trial > interval:
        # run_agent looks at the trial once a heartbeat interval, after that beat's send:
        # shorter, and no ack could ever confirm a software update, which is rolled back
        raise refused(f"update_trial_s = {trial!r} must exceed [heartbeat] interval_s = "
                      f"{interval:g}: a software update in trial is confirmed by a heartbeat "
                      "ack, and none could come in time")
    try:
        policy = PrivacyPolicy.from_config(raw.get("privacy", {}))
    except PrivacyPolicyError as exc:
        raise AgentConfigError(f"agent config {p}: {exc}") from None
    cfg = AgentConfig(state_dir, datasets, interval, timeout, workers, elig, health,
                      float(trial), float(restart_wait), policy, float(stuck),
                      float(seconds["data_load_s"]))
    try:
        cfg.eligibility_policy  # noqa: B018 - parsed (and kept) now, health on or off
    except ValueError as exc:
        raise refused(f"[eligibility] {exc}") from None
    return cfg


def load_enrolled(state_dir: Path) -> Enrolled:
    """Read the identity ``fedge agent enrol`` installed. Each secret (`SECRETS`) is
    taken from ``$CREDENTIALS_DIRECTORY`` when it is there, else from the state dir.

    Raises:
        AgentConfigError: not enrolled, or a file is missing or corrupt (named).
    """
    return _load_enrolled(Path(state_dir), _secret_file)


def check_enrolled(state_dir: Path) -> tuple[Enrolled, list[str]]:
    """`load_enrolled` for ``fedge agent check``, which runs outside the unit (no
    ``$CREDENTIALS_DIRECTORY``): each secret is also looked for where the unit's
    LoadCredential= takes it from, CREDENTIALS_SOURCE, as the next start will get it.
    Read and checked there when this user can read it (root); when it is root's
    (the documented layout: the keys moved there and shredded from ``keys/``), it is
    left unread and said in the warning returned, and the `Enrolled` returned lacks
    it (``curve_secret`` "", ``identity`` None). Returns it and those warnings.

    Raises:
        AgentConfigError: as `load_enrolled`; a secret found nowhere names every place
            looked at, the unit's source among them.
    """
    sd = Path(state_dir)
    unread: dict[str, bool] = {}  # which secret -> whether it is known to be there
    enrolled = _load_enrolled(sd, lambda sd, which: _secret_file(sd, which, unread))
    return enrolled, [_unread_secrets(sd, unread)] if unread else []


def _load_enrolled(sd: Path, secret_file: Callable[[Path, str], Path | None]) -> Enrolled:
    """`load_enrolled`, each secret found by ``secret_file`` (None: left unread)."""
    from fedge.secagg.keys import Identity, Roster

    try:
        meta = json.loads((sd / "enrolment.json").read_text())
    except FileNotFoundError as exc:
        raise AgentConfigError(f"appliance not enrolled: no {sd / 'enrolment.json'}; run "
                               "`fedge agent enrol FILE`") from exc
    except OSError as exc:  # e.g. written by root, read by the service user
        raise AgentConfigError(_unreadable(sd, exc)) from exc
    except ValueError as exc:
        raise AgentConfigError(f"{sd / 'enrolment.json'} is corrupt: {exc}") from exc
    # Each file is read on its own, so that what is wrong is named by its path: hospital
    # IT must not have to guess among the files, two of them secrets.
    try:
        site, roster_key = str(meta["site"]), bytes.fromhex(meta["roster_public_key"])
    except (KeyError, ValueError, TypeError) as exc:
        raise AgentConfigError(_corrupt(sd / "enrolment.json", exc)) from exc
    curve_file = secret_file(sd, "curve")
    curve_public, curve_secret = (_read(sd, curve_file, _curve_key, "CURVE key ")
                                  if curve_file is not None else ("", ""))
    identity_file = secret_file(sd, "identity")
    identity = (_read(sd, identity_file, Identity.load, "identity key ")
                if identity_file is not None else None)
    coord_file = sd / "keys" / "coordinator.json"

    def coordinator(path: Path) -> tuple[str, str]:
        # checked here, so that a hand-edited file is named (not found by the socket)
        from fedge.transport import check_public_key
        from fedge.transport._sockopts import check_endpoint

        doc = json.loads(path.read_text())
        return (check_endpoint(doc["endpoint"]),
                check_public_key(doc["public_key"], what="public_key"))

    endpoint, coordinator_key = _read(sd, coord_file, coordinator)
    roster_file = sd / "roster.json"
    roster = _read(sd, roster_file, lambda path: Roster.from_bytes(path.read_bytes(), roster_key))
    _say_if_not_enrolled(sd, meta, site, curve_file, curve_public, identity_file,
                         identity.public_bytes() if identity is not None else None,
                         roster.entries.get(site))
    return Enrolled(site, curve_public, curve_secret, endpoint, coordinator_key, identity,
                    roster, roster_key, roster_file)


def _say_if_not_enrolled(sd: Path, meta: dict[str, Any], site: str, curve_file: Path | None,
                         curve_public: str, identity_file: Path | None,
                         identity_public: bytes | None, roster_entry: bytes | None) -> None:
    """Warn when the keys loaded are not the ones `fedge agent enrol` installed last (a
    re-enrolment whose new keys were not moved into the credentials directory: the
    coordinator refuses the old ones once revoked), naming the key used and where the
    enrolled one is. The enrolled CURVE key is enrolment.json's ``curve_public``
    (``keys/curve.json``'s for an enrolment made before it was kept there); the
    enrolled identity is the roster's entry for this site. A key left unread (file
    None: `check_enrolled`) is not compared."""
    if curve_file is not None:
        _say_if_curve_not_enrolled(sd, meta, curve_file, curve_public)
    if (identity_file is not None and roster_entry is not None
            and roster_entry != identity_public):
        log.warning("using the identity key in %s, which is not the identity the roster "
                    "(%s) holds for site %r: secure aggregation will not accept it. If "
                    "this appliance was enrolled again, move %s into %s as well",
                    identity_file, sd / "roster.json", site, sd / SECRETS["identity"][0],
                    CREDENTIALS_SOURCE)


def _say_if_curve_not_enrolled(sd: Path, meta: dict[str, Any], curve_file: Path,
                               curve_public: str) -> None:
    enrolled, where = meta.get("curve_public"), sd / "enrolment.json"
    own = sd / SECRETS["curve"][0]
    if not isinstance(enrolled, str) and own != curve_file:
        where = own
        try:
            enrolled = json.loads(own.read_text()).get("public")
        except (OSError, ValueError, AttributeError):
            enrolled = None
    if isinstance(enrolled, str) and enrolled != curve_public:
        log.warning("using the CURVE key %s from %s, which is not the key enrolled last "
                    "(%s, in %s): the coordinator refuses a key the console revoked. If "
                    "this appliance was enrolled again, move the enrolled keys into %s "
                    "(the commands `fedge agent enrol` printed; README.Debian, "
                    "Credentials) and restart", curve_public, curve_file, enrolled, where,
                    CREDENTIALS_SOURCE)


_T = TypeVar("_T")


def _read(sd: Path, path: Path, parse: Callable[[Path], _T], what: str = "") -> _T:
    """``parse(path)``, its failures named by the file.

    Raises: AgentConfigError: the file is missing, unreadable or corrupt (names it).
    """
    try:
        return parse(path)
    except AgentConfigError:
        raise
    except FileNotFoundError as exc:
        raise AgentConfigError(f"enrolment state under {sd} is incomplete: {what}{path} is "
                               "missing; enrol again (`fedge agent enrol FILE`)") from exc
    except OSError as exc:
        raise AgentConfigError(_unreadable(sd, exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise AgentConfigError(_corrupt(path, exc, what)) from exc


def _corrupt(path: Path, exc: Exception, what: str = "") -> str:
    return f"{what}{path} is corrupt: {type(exc).__name__}: {exc}"


# The appliance's two secrets: where `fedge agent enrol` writes them under the state
# dir, and the name systemd gives them under $CREDENTIALS_DIRECTORY when IT has moved
# them to CREDENTIALS_SOURCE/<name> (LoadCredential=fedge:..., so the credential is
# fedge_<name>; firmware/README.md has the commands).
SECRETS = {"curve": ("keys/curve.json", "curve.key"),
           "identity": ("keys/identity.key", "identity.key")}
# The unit's LoadCredential= source: root's only, outside the state dir (which the
# service user owns), on an appliance on the encrypted volume (packaging/debian/postinst).
CREDENTIALS_SOURCE = "/var/lib/fedge-credentials/agent"


def _secret_file(sd: Path, which: str, unread: dict[str, bool] | None = None
                 ) -> Path | None:
    """The file holding secret `which`: the systemd credential when there is one,
    else the state dir's.

    With `unread` (``fedge agent check``, outside the unit: `check_enrolled`), as the
    next start under the unit will find it: between the two, the unit's source
    (CREDENTIALS_SOURCE, which LoadCredential= makes that credential of). There,
    a key this user cannot read is not returned: None, and ``unread[which]`` set to
    True when it is there (the unit takes it, not the state dir's), False when
    it may be (the directory cannot be searched; the state dir has none).

    Raises: AgentConfigError naming every place looked at when none holds it.
    """
    state_name, cred_name = SECRETS[which]
    looked = []
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        cred = Path(creds) / f"fedge_{cred_name}"
        if cred.exists():
            return cred
        looked.append(f"{cred} (from {CREDENTIALS_SOURCE}/{cred_name})")
    else:
        looked.append(f"$CREDENTIALS_DIRECTORY/fedge_{cred_name} (CREDENTIALS_DIRECTORY "
                      "is not set: the agent is not running under its unit)")
    in_source: bool | None = False
    if unread is not None:
        source = Path(CREDENTIALS_SOURCE) / cred_name
        try:
            os.stat(source)
            in_source = True
        except (FileNotFoundError, NotADirectoryError):
            looked.append(str(source))
        except OSError:  # the directory is root's (0700): whether it holds it is unknown
            in_source = None
        if in_source and os.access(source, os.R_OK):
            return source
        if in_source:
            unread[which] = True
            return None
    own = sd / state_name
    if own.exists():
        return own
    if unread is not None and in_source is None:
        unread[which] = False
        return None
    looked.append(str(own))
    raise AgentConfigError(f"appliance {which} key not found: looked at {' and '.join(looked)}")


def _unread_secrets(sd: Path, unread: dict[str, bool]) -> str:
    """The warning of `check_enrolled` for the secrets it left unread."""
    names = {"curve": "the CURVE secret key is", "identity": "the identity key is"}
    keys, them = (("the secret keys are", "them") if len(unread) > 1 else
                  (names[next(iter(unread))], "it"))
    source = f"{CREDENTIALS_SOURCE} (root's; the unit hands them over as credentials)"
    if all(unread.values()):
        return (f"{keys} in {source}: not read by this check; run it as root to check "
                f"{them} too")
    return (f"{keys} not in {sd / 'keys'}, so the unit must take {them} from {source}, "
            f"which this check cannot read{_as_user()}; run it as root to check {them} too")


def _curve_key(path: Path) -> tuple[str, str]:
    """(public, secret) z85 from what enrolment writes (JSON {"public", "secret"}) or a
    bare z85 secret key; the public key is always derived from the secret.

    Raises: AgentConfigError naming the file and what is wrong with it.
    """
    import zmq

    text = path.read_text().strip()
    public = None
    # z85's alphabet holds "{": a bare 40-character secret may start with one (1 in 85)
    if text.startswith("{") and not (len(text) == 40 and "\n" not in text):
        try:
            doc = json.loads(text)
            secret, public = doc["secret"], doc.get("public")
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentConfigError(f"CURVE key {path} is JSON without a \"secret\" "
                                   f"field: {type(exc).__name__}: {exc}") from exc
    else:
        secret = text
    try:
        derived = zmq.curve_public(str(secret).encode()).decode()
    except ValueError as exc:
        raise AgentConfigError(f"CURVE key {path} holds no 40-character z85 secret key "
                               "(expected that, or the JSON `fedge agent enrol` writes)") from exc
    if public is not None and public != derived:
        raise AgentConfigError(f"CURVE key {path}: its \"public\" key does not belong to "
                               "its secret key")
    return derived, str(secret)


def data_not_found(datasets: list[dict[str, Any]]) -> list[str]:
    """What is wrong with each configured data set's path that can be seen without
    reading the data: missing, not reachable, or not readable by this user. One line
    per data set, naming it and the path (which stays in the site's own journal), so
    that hospital IT hears of it when the agent starts, not when a job fails on it.
    Never raises."""
    return [line for line in _data_not_found_each(datasets) if line is not None]


def _data_not_found_each(datasets: list[dict[str, Any]]) -> list[str | None]:
    """`data_not_found`'s line for each data set in turn, None where there is none."""
    lines: list[str | None] = []
    for d in datasets:
        lines.append(None)
        name, path = d.get("name"), d.get("path")
        if not isinstance(path, str) or not path:
            continue  # a table fedge.train refuses, by name, when it loads it
        what = f"data set {name!r}: its path {path}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            lines[-1] = f"{what} does not exist"
            continue
        except OSError as exc:
            lines[-1] = f"{what} cannot be reached{_as_user()}: {exc.strerror or exc}"
            continue
        import stat

        need = os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)
        if not os.access(path, need):
            lines[-1] = f"{what} cannot be read{_as_user()}: permission denied"
    return lines


def check_data_sets(cfg: AgentConfig, config: str | Path, *, out: Any = None,
                    err: Any = None) -> int:
    """``fedge agent check``'s look at the data sets: each ``[[datasets]]`` table of
    ``cfg`` read as a task's first load of it reads it (its agent.toml table parsed by
    ``DatasetSpec.from_config`` and loaded by ``fedge.agent.trainer.read_source``, the
    trainer's own: fedge.train's loader, the table's standardise, features and split
    settings, an export being written read again), one after another, each dropped
    before the next is read. For each, "reading data set NAME (PATH)…" on ``err``
    first (a large table, an image set, takes a while), then ``ok:`` with its rows,
    splits and columns and the time taken on ``out``, or ``error:`` and why on ``err``:
    the table refused, the path missing or unreadable by this user (`data_not_found`),
    or the loader's error in full (its path, line, column, and the value it names:
    this is the site's own terminal; nothing of it goes anywhere else). What the read
    logs at WARNING (an export modified just before it was read) is said there as
    ``warning:``; so is a read that took over half of ``data_load_s``. Reads only: the
    loader writes no cache, and no trainer is made (no ledger, no job state, no state
    directory touched). Returns how many data sets cannot be used."""
    from fedge.agent.trainer import SourceChanging, describe_size, read_source
    from fedge.train.data import DatasetSpec

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err

    class Say(logging.Handler):  # the read's warnings, said where they happen
        def emit(self, record: logging.LogRecord) -> None:
            print(f"warning: {record.getMessage()}", file=err, flush=True)

    agent_log = logging.getLogger("fedge.agent")
    say = Say(logging.WARNING)
    agent_log.addHandler(say)
    propagate, agent_log.propagate = agent_log.propagate, False
    failed = 0
    try:
        found = _data_not_found_each(cfg.datasets)
        for i, (table, missing) in enumerate(zip(cfg.datasets, found, strict=True)):
            name = table.get("name", f"#{i + 1}")
            if missing is not None:
                print(f"error: {missing}; every job on it is refused until that "
                      "is fixed", file=err, flush=True)
                failed += 1
                continue
            try:
                spec = DatasetSpec.from_config(table)
            except (ValueError, TypeError) as exc:
                print(f"error: data set {name!r} in {config} is left out, its tasks refused "
                      f"until the table is fixed: {exc}", file=err, flush=True)
                failed += 1
                continue
            print(f"reading data set {spec.name!r} ({spec.path})…", file=err, flush=True)
            started = time.monotonic()
            try:
                data = read_source(spec).data
            except SourceChanging as exc:
                why = str(exc) if exc.error is None else f"{exc.error}; {exc}"
            except Exception as exc:  # the loader's error, whatever it is
                why = str(exc) if isinstance(exc, OSError | ValueError) else \
                    f"{type(exc).__name__}: {exc}"
            else:
                took = time.monotonic() - started
                x = data.train.x
                columns = (f"{x.shape[1]} feature column{'s' if x.shape[1] != 1 else ''}"
                           if x.ndim == 2 else "each " + "x".join(map(str, x.shape[1:])))
                print(f"data set {spec.name!r}: ok: {describe_size(data)}, {columns}; "
                      f"read in {took:.1f} s", file=out, flush=True)
                del data, x
                if took > cfg.data_load_s / 2:
                    print(f"warning: data set {spec.name!r} took {took:.0f} s to read, over "
                          f"half of data_load_s = {cfg.data_load_s:g} s (agent.toml): a "
                          "task's load past it counts the agent stuck, and it is restarted, "
                          "the load lost; raise data_load_s", file=err, flush=True)
                continue
            print(f"error: data set {spec.name!r} cannot be loaded: {why}",
                  file=err, flush=True)
            failed += 1
    finally:
        agent_log.removeHandler(say)
        agent_log.propagate = propagate
    return failed


def _unreadable(sd: Path, exc: OSError) -> str:
    return (f"enrolment state under {sd} cannot be read{_as_user()}: {exc.strerror or exc}: "
            f"{exc.filename or ''}; the files must belong to the user the agent runs as "
            f"(e.g. chown -R fedge: {sd})")


# What the agent writes under its state directory once it runs: its lock, the job
# state of a task (resumed after a restart), the secure-aggregation reveal log, the
# privacy ledger (each job's ε), installed models, the signed updates' TUF metadata and
# their records; each directory as it exists (made by the agent where it does not)
STATE_WRITTEN = ("jobs", "secagg", "privacy", "models", "tuf", "updates")
STATE_FILES_WRITTEN = ("agent.lock", "roster.json", "privacy/ledger.json",
                       "secagg/revealed.jsonl")


def state_dir_problems(state_dir: Path) -> tuple[list[str], list[str]]:
    """What of the agent's state directory this user (the service user, running
    ``fedge agent check``) cannot write as the agent writes it, looked at without
    writing (``os.access``: mode bits, ACLs, a read-only mount), each naming the path,
    its mode and owner, and the user: first what stops ``fedge agent run`` at start
    (its lock, ``agent.lock``, cannot be opened or made: fedge.instance_lock), then
    what it starts with, and each job or update then fails on: the directory itself,
    `STATE_WRITTEN`'s directories, `STATE_FILES_WRITTEN`'s files."""
    from fedge.access import cannot_write

    sd = Path(state_dir)
    user = _as_user() or " as this user"

    fix = f"give the agent's user the directory (e.g. chown -R fedge: {sd})"
    lock = sd / "agent.lock"
    dir_said = cannot_write(sd, "state_dir", os.R_OK | os.W_OK | os.X_OK, user)
    lock_said = (cannot_write(lock, "its lock", os.R_OK | os.W_OK, user)
                 if os.path.lexists(lock) else dir_said)
    if lock_said:  # instance_lock.hold opens it O_RDWR | O_CREAT
        return [f"{lock_said}: `fedge agent run`{user} would stop at start (it cannot "
                f"take its lock there); {fix}"], []
    said = [dir_said] if dir_said else []
    for name in STATE_WRITTEN:
        path = sd / name
        if os.path.isdir(path):
            said.append(cannot_write(path, "its directory", os.R_OK | os.W_OK | os.X_OK,
                                     user))
    for name in STATE_FILES_WRITTEN[1:]:
        path = sd / name
        if os.path.lexists(path):
            said.append(cannot_write(path, "its file", os.R_OK | os.W_OK, user))
    return [], [f"{line}: the agent starts, but a job's state, the privacy ledger, the "
                f"reveal log and signed updates cannot be written there: each job or "
                f"update on it fails; {fix}" for line in said if line]


def health_probe(cfg: AgentConfig, xid_monitor: Any = None) -> Any:
    """(report dict, eligible, reason) from fedge.health, or a constant when disabled.
    ``xid_monitor`` (a started ``fedge.health.XidMonitor``) adds the GPUs' XID events,
    which the eligibility policy weighs."""
    if not cfg.health:
        return lambda: ({}, True, "")
    from fedge.health import collect

    policy = cfg.eligibility_policy

    def probe() -> tuple[dict[str, Any], bool, str]:
        report = collect(cfg.state_dir, xid_monitor=xid_monitor)
        decision = policy.decide(report)
        return report.to_dict(), bool(decision.eligible), str(decision.reason)

    return probe


def health_max_age_s(cfg: AgentConfig) -> float:
    """How long a health verdict stands in the agent's heartbeats: the site's
    ``[eligibility] max_report_age_s``. The probe decides as soon as it has collected,
    so the policy never sees an old report; the agent (``Agent.max_report_age_s``)
    applies the limit to the report it keeps and to a probe that does not return.
    With health disabled the constant probe is always eligible and the agent's
    default stands.

    Raises:
        ValueError: the [eligibility] table is invalid (as ``health_probe``).
    """
    if not cfg.health:
        return HEALTH_MAX_AGE_S
    return cfg.eligibility_policy.max_report_age_s


async def run_agent(agent: Agent, enrolled: Enrolled, *, interval_s: float, timeout_s: float,
                    stop: asyncio.Event, notifier: Any = None,
                    connect_timeout_s: float | None = None,
                    trial_confirm_s: float = 600.0) -> int:
    """Connect, heartbeat and serve tasks until ``stop``; returns the exit code.

    Returns 3 when the coordinator is an impostor (wrong key) or refuses this
    appliance and ``connect_timeout_s`` passes without a connection; 75 when this
    start runs a software update in trial and no heartbeat ack confirms it within
    ``trial_confirm_s`` (not while the launcher deferred the trial, running the version
    before it: this process then leaves with 75, through the update client's restart,
    once the slot root can be written again and no round is in hand:
    `fedge.agent.updates.AgentUpdateClient.resume_deferred_trial`); 2
    (`SOCKET_FAILED_EXIT`) when no socket to the coordinator
    can be made any more (libzmq refused the endpoint or an option, or no file
    descriptor was left): said in one ERROR line, where it had left an agent running
    without a connection and logging only, minutes later, "still retrying"; 70
    (`WORKER_FAILED_EXIT`) when one of its own tasks on the loop (receiving, the
    heartbeats, the name watch, a deferred trial's resumption, the watchdog pings) ends
    on an error: logged at ERROR naming the task, with its traceback, and no watchdog
    ping goes after it (the exception was kept until the stop, where it was dropped,
    and a dead heartbeat task left a process that looked alive).
    """
    from fedge.transport import (
        Backoff,
        ClientSocket,
        CurveKeyPair,
        HandshakeFailed,
        NotConnected,
    )
    from fedge.transport import HeartbeatConfig as TransportHeartbeat

    endpoint = enrolled.coordinator_endpoint
    status = AgentStatus(f"connecting to {endpoint}")

    def say(text: str) -> None:
        if notifier is not None:
            with contextlib.suppress(ValueError):
                notifier.status(text)

    def show_link(text: str) -> None:
        say(status.link(text))

    retry_s = min(30.0, 10 * timeout_s)
    link_log = LinkLog(agent.site, endpoint, retry_s, time.monotonic(),
                       remind_s=LINK_REMIND_S, warn_s=OUTAGE_WARN_S, repeat_s=OUTAGE_REPEAT_S)

    def say_link(lines: list[tuple[int, str]]) -> None:
        for level, text in lines:
            log.log(level, "%s", text)

    name = coordinator_name(endpoint)
    name_log = NameLog(agent.site, name[0]) if name is not None else None

    def on_event(ev: Any) -> None:
        detail = ev.detail
        if ev.kind == "connected" and name_log is not None:
            say_link(name_log.connected())
            link_log.cause = None
            if client.peer_address:  # which of the name's addresses was reached
                detail = f"{detail} ({client.peer_address})"
        say_link(link_log.event(ev.kind, detail, time.monotonic()))
        if ev.kind == "handshake_failed":
            show_link(f"connecting to {endpoint}: handshake failed, retrying")
        elif ev.kind in ("connected", "disconnected", "heartbeat_timeout"):
            show_link(f"connected to {endpoint}" if ev.kind == "connected"
                      else f"connecting to {endpoint} ({ev.kind.replace('_', ' ')})")

    exit_code: list[int] = []

    def on_failure(exc: BaseException) -> None:
        log.error("%s: no connection to the coordinator at %s can be made: %s: %s; the "
                  "agent stops (exit %d)", agent.site, endpoint, type(exc).__name__, exc,
                  SOCKET_FAILED_EXIT)
        exit_code.append(SOCKET_FAILED_EXIT)
        stop.set()

    client = ClientSocket(
        CurveKeyPair(enrolled.curve_public, enrolled.curve_secret),
        enrolled.coordinator_public_key, enrolled.coordinator_endpoint,
        heartbeat=TransportHeartbeat(interval_s, timeout_s),
        backoff=Backoff(0.1, retry_s), on_event=on_event, on_failure=on_failure,
        max_message_bytes=agent.max_message_bytes)
    client.start()
    agent.send_frames = client.send
    # "type" dies on any such message, "type@r" only on one for round r
    kill_on = {t for t in os.environ.get(KILL_ON_ENV, "").split(",") if t}
    if kill_on:
        def maybe_die(env: Any) -> None:
            if {env.header.type, f"{env.header.type}@{env.header.round}"} & kill_on:
                log.warning("%s: %s=%s: killing myself on %s of round %d", agent.site,
                            KILL_ON_ENV, ",".join(sorted(kill_on)), env.header.type,
                            env.header.round)
                os.kill(os.getpid(), signal.SIGKILL)
        agent.before_handle = maybe_die
    if notifier is not None:
        agent.on_status = lambda text: say(status.task(text))
        # READY once the state is loaded and the client is connecting, not once
        # connected: with the coordinator or the WAN down at boot, TimeoutStartSec
        # would otherwise kill and restart the agent every two minutes. Health for a
        # software update is a heartbeat ack (a real connection, `on_heartbeat_ack`
        # confirms the trial), not READY.
        notifier.ready(f"connecting to {endpoint}")
    tasks: set[asyncio.Task[Any]] = set()

    async def receive() -> None:
        while True:
            frames = await client.recv()
            t = asyncio.ensure_future(agent.handle_frames(list(frames)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    updates = getattr(agent, "update_client", None)
    self_update = updates.self_update if updates is not None else None
    trial = self_update.pending() if self_update is not None else None
    deferred = self_update.deferred_trial() if trial is not None else None
    if deferred is not None:
        # The launcher runs the version before the trial (its start could not be
        # counted: the slot root cannot be written). No ack confirms the trial here,
        # so its timer would only restart this version every trial_confirm_s; the
        # trial is resumed, by a restart, once the slot root can be written again.
        trial = None
    started = time.monotonic()

    async def beat() -> None:
        while True:
            say_link(link_log.tick(time.monotonic()))
            if client.state == "connected":
                try:
                    await asyncio.wait_for(agent.heartbeat(), timeout_s)
                except TimeoutError:
                    log.warning("%s: a heartbeat took over %g s to send", agent.site,
                                timeout_s)
                except Exception:  # the next beat tries again; this one is logged
                    log.exception("%s: heartbeat not sent", agent.site)
            if (trial is not None and not updates.confirmed
                    and time.monotonic() - started > trial_confirm_s):
                # a version that cannot reach the coordinator is not known to work:
                # exit 75 (RestartForceExitStatus), preflight counts the start and rolls
                # back after its max_attempts
                log.error("%s: software %s in trial: no heartbeat ack from the coordinator "
                          "in %.0f s; exiting so the unit restarts (rolled back after "
                          "repeated starts)", agent.site, trial.get("version"),
                          trial_confirm_s)
                exit_code.append(TRIAL_UNCONFIRMED_EXIT)
                stop.set()
                return
            await asyncio.sleep(interval_s)

    async def watch_coordinator_name() -> None:
        """While not connected, look the coordinator's name up now and then: libzmq
        says nothing of a name that does not resolve (it only retries)."""
        assert name is not None and name_log is not None
        while True:
            if client.state != "connected":
                addresses, error = await resolve_name_async(*name,
                                                            timeout_s=RESOLVE_TIMEOUT_S)
                if client.state != "connected":
                    was_failing = name_log.failing is not None
                    say_link(name_log.looked_up(addresses, error))
                    if isinstance(error, IPv6Only):
                        link_log.cause = f"its name {name[0]} {error}"
                        show_link(f"connecting to {endpoint}: the name {name[0]} has only "
                                  "IPv6 addresses")
                    elif error is not None:
                        link_log.cause = f"its name {name[0]} does not resolve: {error}"
                        show_link(f"connecting to {endpoint}: the name {name[0]} does not "
                                  "resolve")
                    elif was_failing:
                        link_log.cause = None
                        show_link(f"connecting to {endpoint}")
            await asyncio.sleep(NAME_CHECK_S)

    dead: list[str] = []  # the tasks that ended on an error

    def worker_done(task: asyncio.Future[Any]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        what = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.error("%s: %s stopped on an error: %s: %s; the agent stops (exit %d) so that "
                  "systemd restarts it", agent.site, what, type(exc).__name__, exc,
                  WORKER_FAILED_EXIT, exc_info=exc)
        dead.append(what)
        exit_code.append(WORKER_FAILED_EXIT)
        stop.set()

    loop = asyncio.get_running_loop()
    workers: list[asyncio.Future[Any]] = [
        loop.create_task(receive(), name="receiving the coordinator's messages"),
        loop.create_task(beat(), name="sending heartbeats")]
    if deferred is not None:
        workers.append(loop.create_task(updates.resume_deferred_trial(deferred),
                                        name=f"resuming software {deferred}'s trial"))
    if name is not None:
        workers.append(loop.create_task(watch_coordinator_name(),
                                        name=f"watching the coordinator's name {name[0]}"))
    if notifier is not None:
        # WATCHDOG=1 from this loop at half of WatchdogSec, whatever heartbeat.interval_s
        # is (a slow heartbeat once meant a watchdog restart loop), and while the
        # coordinator is unreachable too: the pings say the loop runs.
        from fedge.systemd import UNSUPERVISED_PING_S, start_watchdog

        withheld: list[str] = []

        def alive() -> bool:
            if dead:  # a task of the loop failed: stopping (worker_done), no more pings
                return False
            # a worker thread that never returns (a deadlocked training) leaves the loop
            # running and the agent useless: no pings, so systemd restarts it
            stuck = agent.stuck_worker()
            if stuck and not withheld:
                log.error("%s: no more watchdog pings while the worker is stuck; systemd "
                          "restarts the agent once WatchdogSec passes", agent.site)
                say(f"worker stuck: {stuck}")
            withheld[:] = [stuck] if stuck else []
            return not stuck

        pinger = start_watchdog(notifier, unsupervised_s=UNSUPERVISED_PING_S, alive=alive)
        if pinger is not None:
            pinger.set_name("pinging systemd's watchdog")
            workers.append(pinger)
    for worker in workers:
        worker.add_done_callback(worker_done)
    code = 0
    try:
        if connect_timeout_s is not None:
            try:
                await client.wait_connected(connect_timeout_s)
            except (HandshakeFailed, TimeoutError, NotConnected) as exc:
                if client.failure is not None:  # said by on_failure
                    code = SOCKET_FAILED_EXIT
                    return code
                log.error("%s: no connection to the coordinator: %s", agent.site, exc)
                code = 3
                return code
        await stop.wait()
        code = exit_code[0] if exit_code else 0
    finally:
        if notifier is not None:
            with contextlib.suppress(ValueError):
                notifier.stopping(status.stopping(exit_code[0] if exit_code else code))
        for t in [*workers, *tasks]:
            t.cancel()
        for t in [*workers, *tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await client.close()
    return code


class AgentStatus:
    """The agent's one-line STATUS=: what it does (a task, the last refusal, or idle)
    and its link to the coordinator, each replaced on its own change, so that a
    reconnect in mid-training still shows the training."""

    def __init__(self, link: str) -> None:
        self._link = link
        self._task = ""

    @property
    def text(self) -> str:
        return f"{self._task} ({self._link})" if self._task else self._link

    def link(self, text: str) -> str:
        """The link's state changed; returns the line to show."""
        self._link = _one_line(text)
        return self.text

    def task(self, text: str) -> str:
        """What the agent does changed ("idle": nothing); returns the line to show."""
        self._task = "" if text == "idle" else _one_line(text)
        return self.text

    def stopping(self, code: int) -> str:
        """The line sent with STOPPING=1."""
        return "stopping" + (f" (exit {code})" if code else "") + (
            f": abandoning {self._task}" if self._task else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())  # STATUS= takes one line (fedge.systemd._status_line)


RELOAD_REFUSED = ("SIGHUP received: reload is not supported; use systemctl restart "
                  "fedge-agent (the configuration is read at start). Still running")


def _reload_refused() -> None:
    log.warning(RELOAD_REFUSED)


def make_trainer(cfg: AgentConfig) -> Any:
    """The site's TorchTrainer for ``cfg``: its data sets, state directory, and the
    ``[privacy] max_colluders`` its DP-FedAvg noise share is sized for (each honest
    share carries (zS)^2 / (K - f), so the K - f honest sites alone hold the noise
    the plan's epsilon assumes)."""
    from fedge.agent.trainer import TorchTrainer

    return TorchTrainer(cfg.datasets, state_dir=cfg.state_dir,
                        max_colluders=cfg.policy.max_colluders)


def run(cfg: AgentConfig, *, connect_timeout_s: float | None = None) -> int:
    """Blocking entry point for ``fedge agent``. SIGTERM and SIGINT stop it; SIGHUP is
    logged (RELOAD_REFUSED) and otherwise ignored.

    Raises: AgentConfigError: not enrolled (fedge.agent.process.load_enrolled),
        another agent runs on the state directory (its pid named), or $FEDGE_SIMD
        names no usable path (every secure aggregation would fail: the site would
        only drop out of each round)."""
    from fedge.core import check_simd
    from fedge.systemd import Notifier

    try:
        check_simd()
    except ValueError as exc:
        raise AgentConfigError(str(exc)) from None
    for line in data_not_found(cfg.datasets):
        log.warning("%s; every job on it is refused until that is fixed (the data sets' "
                    "paths are checked when the agent starts, and by each job)", line)
    enrolled = load_enrolled(cfg.state_dir)  # reads only: the directory is an appliance's
    try:
        # one agent per state directory (fedge.instance_lock): two took turns
        # superseding each other's connection and shared one privacy ledger
        instance_lock.hold(cfg.state_dir, "agent")
    except instance_lock.InstanceLocked as exc:
        raise AgentConfigError(str(exc)) from None
    remove_stale_temps_of(cfg.state_dir, health=cfg.health)
    trainer = make_trainer(cfg)
    executor: Executor = ThreadPoolExecutor(cfg.workers, thread_name_prefix=TASK_THREAD_PREFIX)
    # the ledger, reveal log and job state writes: off the event loop, and not behind
    # a training on the task workers (fedge.agent.runtime's module doc)
    disk: Executor = ThreadPoolExecutor(1, thread_name_prefix=DISK_THREAD_PREFIX)
    xids = start_xid_monitor() if cfg.health else None
    agent = Agent(enrolled.site, trainer, identity=enrolled.identity, roster=enrolled.roster,
                  roster_key=enrolled.roster_key, roster_path=enrolled.roster_path,
                  executor=executor, disk_executor=disk, health=health_probe(cfg, xids),
                  stuck_grace_s=cfg.stuck_task_grace_s, data_load_s=cfg.data_load_s,
                  max_report_age_s=health_max_age_s(cfg),
                  job_state=JobStateStore(cfg.state_dir / "jobs"), policy=cfg.policy,
                  reveal_log=RevealLog(cfg.state_dir / "secagg" / "revealed.jsonl",
                                       legacy=cfg.state_dir / "secagg" / "revealed.json"))
    # Signed updates (console/updates engineer): UpdateAvailable / fetch replies go to
    # the TUF client; models install into <state_dir>/models for `fedge serve`.
    from fedge.agent.updates import SiteModels, attach_update_client
    from fedge.serve.repository import ModelRepository

    models = SiteModels(ModelRepository(cfg.state_dir / "models"), trainer.standardisation,
                        site=enrolled.site, classes=trainer.class_names)
    try:
        attach_update_client(agent, cfg.state_dir, models=models,
                             restart_wait_s=cfg.update_restart_wait_s)
    except FileNotFoundError as exc:  # enrolled without a TUF root: no signed updates
        log.warning("signed updates disabled: %s", exc)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        # SIGHUP's default ends the process without a word, and systemd counts a death
        # by SIGHUP as clean (Restart=on-failure does not restart it): an operator's
        # habitual `kill -HUP` to "reload" left the appliance out of the federation
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, _reload_refused)
        return await run_agent(agent, enrolled, interval_s=cfg.heartbeat_interval_s,
                               timeout_s=cfg.heartbeat_timeout_s, stop=stop,
                               notifier=Notifier(), connect_timeout_s=connect_timeout_s,
                               trial_confirm_s=cfg.update_trial_s)

    code = 1  # unless main() returns one
    try:
        code = asyncio.run(main())
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        disk.shutdown(wait=False)  # a write queued goes on; wait_for_tasks bounds it
        if xids is not None:
            xids.stop()
        if not wait_for_tasks(STOP_GRACE_S):
            # Python would join the worker at exit, however long its task runs, on an
            # error as on a stop; leaving here, the error is logged or it is lost
            error = sys.exc_info()[1]
            if error is not None:
                log.error("%s: the agent stopped on an error", enrolled.site,
                          exc_info=error)
            log.warning("%s: stopping without the task still running (after %g s); "
                        "its result is not sent", enrolled.site, STOP_GRACE_S)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def remove_stale_temps_of(state_dir: Path, *, health: bool = True) -> list[Path]:
    """Remove what writes killed mid-way (SIGKILL, power cut) left in the agent's state
    directory and its ``secagg/``: the temporaries of ``write_atomic`` (a roster update,
    the reveal log's first line or compaction) that no live writer holds, and the health
    probe's files of processes gone; and in ``keys/`` what an enrolment killed mid-write
    left, overwritten first (secret keys: `fedge.agent.enrol.remove_stale_key_temps`).
    ``jobs/`` and ``privacy/`` are the trainer's
    (TorchTrainer sweeps them); the software slots are ``fedge.update.ab``'s. Called
    with the instance lock held, so no other agent writes here; a temporary younger
    than ``fedge.update.files.TEMP_GRACE_S`` is left (`fedge agent enrol` may be
    writing). Returns the paths removed."""
    from fedge.agent.enrol import remove_stale_key_temps
    from fedge.update.files import remove_stale_temps

    removed = remove_stale_temps(state_dir) + remove_stale_temps(Path(state_dir) / "secagg")
    removed += remove_stale_key_temps(Path(state_dir) / "keys")
    if health:
        from fedge.health.collect import remove_stale_probes

        removed += remove_stale_probes(state_dir)
    return removed


def wait_for_tasks(grace_s: float) -> bool:
    """Wait up to ``grace_s`` for the task threads still running; whether none is left."""
    deadline = time.monotonic() + grace_s
    for t in threading.enumerate():
        if t.name.startswith(TASK_THREAD_PREFIX) and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
    return not any(t.name.startswith(TASK_THREAD_PREFIX) and t.is_alive()
                   for t in threading.enumerate())


def start_xid_monitor() -> Any:
    """A started XID monitor (its events reach every heartbeat's health report), or
    None where NVML or its event API is missing; the reason is logged either way."""
    from fedge.health import XidMonitor

    monitor = XidMonitor()
    if monitor.start():
        log.info("watching GPUs %s for XID errors", monitor.registered)
        return monitor
    log.info("no XID monitor: %s", monitor.reason)
    return None
