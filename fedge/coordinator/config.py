"""The coordinator's configuration file (TOML), checked when it is read.

::

    state_dir = "/var/lib/fedge-coordinator"     # SQLite, checkpoints, endpoint file
    bind = "tcp://0.0.0.0:7700"                  # appliances connect here
    provision = "/etc/fedge/coordinator-provision.json"  # from `fedge console init`
    # without a provision file:
    # curve_key = "/etc/fedge/coordinator.key_secret"     # transport key file
    # roster = "/etc/fedge/roster.json"                   # console-signed roster
    # roster_public_key = "<hex Ed25519 key of the console>"
    tick_s = 0.05

    [heartbeat]
    interval_s = 1.0
    timeout_s = 5.0

    [admin]                                     # optional: the operators' channel
    endpoint = "tcp://127.0.0.1:7701"           # default: see below
    enabled = true                              # false: off, as without the table

Without ``[admin] endpoint`` the channel listens at the provision file's
``admin_endpoint`` (what the console dials) as written, when its host is an address of
this host or a name that resolves here to one (loopback included: the console runs on
this host). Otherwise -- the name the console dials does not resolve on the
coordinator, or is no address of it (split DNS, NAT) -- the channel stays off and
``admin_off`` says why, naming the line to add: ``endpoint = "tcp://0.0.0.0:PORT"``
(every interface) or the address to listen on (`admin_default`). The coordinator
serves the federation all the same (an upgrade must not stop a coordinator whose
channel could not bind before either); `fedge coordinator run` logs it as an ERROR
at start and `fedge coordinator check` warns of it. It is never widened silently.

Relative paths are relative to the configuration file's directory.

``state_dir`` defaults to ``$STATE_DIRECTORY`` (the unit's
``StateDirectory=fedge-coordinator``), else `DEFAULT_STATE_DIR`, the same directory
(the packaged coordinator.toml names it too): the admin commands run from a shell
(``fedge coordinator status --config /etc/fedge/coordinator.toml``) open the
database the service writes. Not the agent's /var/lib/fedge: on one host the two
would overwrite each other's roster.json and tuf/.

Without ``provision`` or ``curve_key`` the provision file is looked for, in order,
at (`provision_candidates`):

1. ``$CREDENTIALS_DIRECTORY/fedge_coordinator-provision.json`` (the unit's
   ``LoadCredential=fedge:/etc/fedge/credentials/coordinator``);
2. ``credentials/coordinator/coordinator-provision.json`` beside the configuration
   file: where that credential comes from, read by an admin shell running as root;
3. ``<state_dir>/coordinator-provision.json``.

The first that is there wins (`find_provision`); an explicit ``curve_key`` wins over
the last two, not over the credential, which is what the unit was given. Not every
user may look at every candidate: the second is root's (the package makes
/etc/fedge/credentials/ and credentials/coordinator/ root's, 0700), and the service
runs as user fedge, which gets it as the first. A candidate this user cannot look at
or read is passed over, as one that is not there, and named in the error only when no
candidate is usable (not a PermissionError's traceback at every start, as when each
candidate was tested whether an earlier one held a provision file or not). Where a
later one is used while an earlier one could not be looked at, outside the unit, that
is a warning: root would have used the earlier one.

`fedge coordinator check --user NAME`, run as root outside the unit, loads the
configuration as user NAME too, from a child dropped to it, and hands it the provision
file as the unit would (`unit_credential`: read by root from the credential's source,
the second candidate): what NAME cannot read, the service cannot either, and what root
alone can read reaches the service through LoadCredential=.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.text import as_user

# systemd LoadCredential= name of the console's provision file (packaging/systemd)
PROVISION_CREDENTIAL = "fedge_coordinator-provision.json"
PROVISION_FILE = "coordinator-provision.json"  # as `fedge console init` names it
# The .deb's StateDirectory=fedge-coordinator; also `fedge export`'s default.
DEFAULT_STATE_DIR = "/var/lib/fedge-coordinator"
MAX_TICK_S = 5.0
DEFAULT_BIND = "tcp://0.0.0.0:7700"
# What `fedge agent enrol` and a running agent leave in the agent's state directory
# (fedge.agent.enrol, fedge.instance_lock): never in a coordinator's.
AGENT_STATE_FILES = ("enrolment.json", "agent.lock")


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the rule."""


@dataclass(frozen=True)
class UnitCredential:
    """The provision file as the unit would hand it to the service, seen from outside
    the unit (`unit_credential`): ``source``, where LoadCredential= takes it from (the
    second of `provision_candidates`); ``text``, what it holds, read by this process
    (root), or None when there is none there (the service then gets no credential)."""

    source: Path
    text: str | None


@dataclass(frozen=True)
class CoordinatorConfig:
    state_dir: Path
    bind: str
    curve_public: str
    curve_secret: str
    roster: bytes
    roster_public_key: bytes
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    tick_s: float = 0.05
    admin: dict[str, Any] = field(default_factory=dict)
    provision: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # what is allowed but probably wrong (`endpoint_warnings`): logged at start, printed
    # by `fedge coordinator check`
    warnings: tuple[str, ...] = ()
    # why [admin] asks for a channel this host cannot listen at (`admin_default`), which
    # therefore stays off ("" when none): an ERROR at start, a warning of check's
    admin_off: str = ""
    # where the provision file was read (None: curve_key); with a `UnitCredential`, its
    # source
    provision_file: Path | None = None


_KEYS = ("state_dir", "bind", "provision", "curve_key", "roster", "roster_public_key",
         "tick_s", "heartbeat", "admin")


def load_config(path: str | Path, *, admin_lookup: bool = True,
                credential: UnitCredential | None = None) -> CoordinatorConfig:
    """Read and check a coordinator configuration.

    What is allowed but probably wrong is in the result's ``warnings``
    (`endpoint_warnings`); an admin channel that cannot listen where [admin] asks, in
    ``admin_off`` (`admin_default`). ``admin_lookup=False`` skips that look-up (up to
    NAME_LOOKUP_S of DNS) for the commands that do not serve the channel (status,
    audit, submit, enrol): the provision file's admin_endpoint is then taken unchecked.

    ``credential`` (`unit_credential`; check --user, outside the unit): the provision
    file the unit would hand over as ``$CREDENTIALS_DIRECTORY``'s, taken as that.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key, missing keys, bad values
            (an endpoint out of range, heartbeats libzmq cannot hold, a bad [admin]
            table), unreadable key/roster/provision files, no provision file this user
            may read where one is looked for by default (those it may not look at
            named), a state_dir that is an agent's; each message names this file, then
            the key and the rule.
    """
    p = Path(path)
    try:
        # utf-8-sig: a byte-order mark, as Windows editors save UTF-8, is dropped (it
        # was "Invalid statement (at line 1, column 1)")
        raw = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:  # binary, or UTF-16 as Windows Notepad saves it
        byte = exc.object[exc.start]
        raise ConfigError(f"coordinator config {p} is not UTF-8 text: byte 0x{byte:02x} at "
                          f"offset {exc.start} cannot be decoded; save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read coordinator config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"coordinator config {p} is not valid TOML: {exc}") from exc

    def bad(rule: str) -> ConfigError:
        """An error naming this file, then the key and the rule."""
        return ConfigError(f"coordinator config {p}: {rule}")

    for key in raw:
        if key not in _KEYS:
            raise bad(f"key {key!r} is unknown; known: {', '.join(_KEYS)}")
    base = p.parent

    def rel(v: Any, key: str) -> Path:
        if not isinstance(v, str) or not v:
            raise bad(f"{key} = {v!r} must be a non-empty path")
        q = Path(v)
        return q if q.is_absolute() else base / q

    state_dir = rel(raw.get("state_dir", os.environ.get("STATE_DIRECTORY",
                                                        DEFAULT_STATE_DIR)),
                    "state_dir")
    # a state_dir this user cannot reach is start_check's to say (it was a traceback)
    agents = [name for name in AGENT_STATE_FILES if _lexists(state_dir / name)]
    if agents:  # it started half-configured there ("update relay disabled: no TUF ...")
        raise bad(f"state_dir = {str(state_dir)!r} is an appliance agent's state directory "
                  f"(it holds {' and '.join(agents)}): the coordinator needs its own "
                  f"({DEFAULT_STATE_DIR} by default); in one directory the two would "
                  "overwrite each other's roster.json and tuf/")
    candidates = provision_candidates(p, state_dir)
    found = FoundProvision(None, False, (), ())
    given: str | None = None  # the text of `credential`, where it is the one taken
    late = ""  # a provision file used while an earlier candidate could not be looked at
    if "provision" not in raw:
        found = find_provision(candidates, credential)
        # Explicit keys (curve_key) win over a provision file found by default,
        # except the systemd credential, which is what the unit was given.
        if found.path is not None and ("curve_key" not in raw or found.credential):
            raw["provision"] = str(found.path.absolute())  # not relative to `base` again
            if credential is not None and found.path == credential.source:
                given = credential.text
            if found.passed_over and not os.environ.get("CREDENTIALS_DIRECTORY"):
                late = (f"provision file {found.path} is used, but {found.unusable()}, "
                        "and comes first: where it holds one, root (and the service, as "
                        "its credential) would use that one instead")
    bind = _bind_endpoint(raw.get("bind", DEFAULT_BIND), "bind", bad)
    hb = raw.get("heartbeat", {})
    if not isinstance(hb, dict) or set(hb) - {"interval_s", "timeout_s"}:
        raise bad(f"[heartbeat] = {hb!r} takes interval_s, timeout_s")
    from fedge.transport._sockopts import check_heartbeat

    try:  # what libzmq refuses too: a TTL over 6553.599 s failed at bind, naming no key
        interval, timeout = check_heartbeat(hb.get("interval_s", 1.0),
                                            hb.get("timeout_s", 5.0))
    except ValueError as exc:
        raise bad(str(exc)) from None
    tick_s = _pos(raw.get("tick_s", 0.05), "tick_s", bad)
    if tick_s > MAX_TICK_S:  # a loop turn waits tick_s: SIGTERM would wait that long too
        raise bad(f"tick_s = {tick_s!r} must be at most {MAX_TICK_S:g} (each loop turn waits "
                  "that long; a stop would too, past systemd's TimeoutStopSec)")
    provision: dict[str, Any] = {}
    provision_file: Path | None = None
    if "provision" in raw:
        pp = provision_file = rel(raw["provision"], "provision")
        try:
            provision = json.loads(given if given is not None else pp.read_text())
            curve_public, curve_secret = provision["curve_public"], provision["curve_secret"]
            roster = provision.get("roster", "").encode()
            roster_pk = bytes.fromhex(provision["roster_public_key"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise bad(f"provision file {pp} is unreadable or lacks a field: {exc}") from exc
        from fedge.transport import CurveKeyPair, KeyFileError

        try:  # here, not as a traceback from the socket at start
            CurveKeyPair(curve_public, curve_secret)
        except KeyFileError as exc:
            raise bad(f"provision file {pp}: its curve_public and curve_secret must be the "
                      f"coordinator's CURVE key pair, as `fedge console init` wrote them: "
                      f"{exc}") from None
    else:
        for key in ("curve_key", "roster_public_key"):
            if key not in raw:
                raise ConfigError(f"coordinator config {p} needs {key!r} (or a "
                                  f"'provision' file); {found.none_usable(p)}")
        from fedge.transport import KeyFileError, load_keypair

        try:
            kp = load_keypair(rel(raw["curve_key"], "curve_key"))
        except (KeyFileError, OSError) as exc:
            raise bad(f"curve_key: {exc}") from exc
        curve_public, curve_secret = kp.public, kp.secret or ""
        try:
            roster_pk = bytes.fromhex(raw["roster_public_key"])
        except (ValueError, TypeError) as exc:
            raise bad(f"roster_public_key = {raw['roster_public_key']!r} must be "
                      "hex") from exc
        roster = b""
        if "roster" in raw:
            try:
                roster = rel(raw["roster"], "roster").read_bytes()
            except OSError as exc:
                raise bad(f"roster: {exc}") from exc
    if len(roster_pk) != 32:
        raise bad(f"the roster public key has {len(roster_pk)} bytes, must have 32")
    admin, admin_warnings, admin_off = _admin(raw, provision, provision_file, bind, bad,
                                              lookup=admin_lookup)
    return CoordinatorConfig(
        state_dir=state_dir, bind=bind, curve_public=curve_public, curve_secret=curve_secret,
        roster=roster, roster_public_key=roster_pk, heartbeat_interval_s=interval,
        heartbeat_timeout_s=timeout, tick_s=tick_s,
        admin=admin, provision=provision, path=p,
        warnings=(*([late] if late else []),
                  *endpoint_warnings(p, bind, "bind" in raw, admin, provision,
                                     provision_file), *admin_warnings),
        admin_off=admin_off, provision_file=provision_file,
    )


def _lexists(path: Path) -> bool:
    """Whether ``path`` is there; False where this user cannot look (Path.exists
    raises PermissionError for that on Python 3.11)."""
    try:
        os.lstat(path)
    except OSError:
        return False
    return True


def provision_candidates(config: Path, state_dir: Path) -> list[Path]:
    """Where a configuration without ``provision`` finds one, first match wins
    (`find_provision`)."""
    found = []
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        found.append(Path(creds) / PROVISION_CREDENTIAL)
    found.append(credential_source(config))
    found.append(state_dir / PROVISION_FILE)
    return found


def credential_source(config: str | Path) -> Path:
    """Where the unit's LoadCredential= takes the provision file from: credentials/
    coordinator/ beside the configuration file (the unit's
    /etc/fedge/credentials/coordinator, beside /etc/fedge/coordinator.toml)."""
    return Path(config).parent / "credentials" / "coordinator" / PROVISION_FILE


@dataclass(frozen=True)
class FoundProvision:
    """What `find_provision` found: ``path``, the first usable candidate (None: none
    is); ``credential``, whether it is the unit's credential (real, or a
    `UnitCredential`); ``passed_over``, each candidate before it (every one, where none
    is usable) this user could not look at or read, with why (strerror); ``looked``,
    every candidate looked at; ``known_absent``: the `UnitCredential` source, which
    root saw holds none."""

    path: Path | None
    credential: bool
    passed_over: tuple[tuple[Path, str], ...]
    looked: tuple[Path, ...]
    known_absent: Path | None = None

    def unusable(self) -> str:
        """Those passed over, and why: "X cannot be read as user fedge (permission
        denied)"."""
        return "; ".join(f"{path} cannot be read{as_user()} ({why.lower()})"
                         for path, why in self.passed_over)

    def none_usable(self, config: Path) -> str:
        """Why no candidate is usable, naming each: the error's end."""
        absent = [str(c) for c in self.looked if c not in {p for p, _ in self.passed_over}]
        said = f"no provision file at {', '.join(absent)}" if absent else ""
        if not self.passed_over:
            return said
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds:
            where = (f"which holds no {PROVISION_CREDENTIAL} (the unit's LoadCredential= "
                     "source holds no provision file, or is another directory)")
        else:
            where = ("which is not set here (not under the unit): check it as root, as the "
                     f"service user: `sudo fedge coordinator check --config {config} "
                     f"--user {_user_name()}`")
        return ((said + "; " if said else "") + f"{self.unusable()}: the service takes "
                f"the provision file from $CREDENTIALS_DIRECTORY ({PROVISION_CREDENTIAL}, "
                f"the unit's LoadCredential=fedge:{credential_source(config).parent}), "
                + where)


def find_provision(candidates: list[Path], credential: UnitCredential | None = None
                   ) -> FoundProvision:
    """The first of ``candidates`` (`provision_candidates`) that is a file this user
    may read. One it cannot look at (a directory on the way it may not search: the
    root-only credentials/coordinator/ as user fedge) or read is passed over, as one
    that is not there, and said (`FoundProvision`). ``credential``: outside the unit,
    the provision file the unit would hand over, taken first as the unit's credential
    is; where it has none, its source is known to hold none."""
    import stat

    passed: list[tuple[Path, str]] = []
    looked: list[Path] = []
    if credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
        if credential.text is not None:
            return FoundProvision(credential.source, True, (), (credential.source,))
    else:
        credential = None
    for c in candidates:
        looked.append(c)
        if credential is not None and c == credential.source:
            continue  # root saw none there
        try:
            st = os.stat(c)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            passed.append((c, exc.strerror or str(exc)))
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # as Path.is_file: not a provision file
        if not os.access(c, os.R_OK):
            passed.append((c, os.strerror(13)))  # EACCES: "Permission denied"
            continue
        return FoundProvision(c, c.name == PROVISION_CREDENTIAL, tuple(passed), tuple(looked))
    return FoundProvision(None, False, tuple(passed), tuple(looked),
                          credential.source if credential is not None else None)


def unit_credential(config: str | Path) -> UnitCredential | None:
    """The provision file the unit would hand the service as
    ``$CREDENTIALS_DIRECTORY/fedge_coordinator-provision.json``, read from its source
    (`credential_source`) by this process: for `fedge coordinator check --user`, run
    as root outside the unit, so that the service user's view of the configuration
    (loaded in a child dropped to that user) has it as the service has it. None under
    the unit (``$CREDENTIALS_DIRECTORY`` set: that one is used) and where this user
    cannot tell (the source cannot be looked at or read: not root); its ``text`` None
    where the source holds none (the service gets no credential)."""
    import stat

    if os.environ.get("CREDENTIALS_DIRECTORY"):
        return None
    source = credential_source(config)
    try:
        if not stat.S_ISREG(os.stat(source).st_mode):
            return UnitCredential(source, None)  # systemd hands over regular files
        return UnitCredential(source, source.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return UnitCredential(source, None)
    except (OSError, ValueError):  # not this user's to read; or not text: said later
        return None


_ADMIN_KEYS = ("endpoint", "enabled")


def _admin(raw: dict[str, Any], provision: dict[str, Any], provision_file: Path | None,
           bind: str, bad: Callable[[str], ConfigError], *, lookup: bool = True
           ) -> tuple[dict[str, Any], tuple[str, ...], str]:
    """The ``[admin]`` table as `CoordinatorConfig.admin`: empty when the channel is off
    (no table, ``enabled = false``, or a provision file's ``admin_endpoint`` this host
    cannot listen at), else ``enabled`` and the endpoint it binds (its own, else the
    provision file's ``admin_endpoint``: `admin_default`, unless not ``lookup``) when
    there is one; the warnings of `admin_default`; and why the channel is off although
    [admin] asks for it ("" when it is not: `CoordinatorConfig.admin_off`).

    Raises: ConfigError: not a table, an unknown key (a misspelt ``endpiont`` bound the
        provision file's endpoint instead), a value of the wrong type, no provision file
        (its operators' keys are the channel's allow-list), or the endpoint ``bind``
        takes (each named)."""
    if "admin" not in raw:
        return {}, (), ""
    table = raw["admin"]
    if not isinstance(table, dict):
        raise bad(f"[admin] = {table!r} must be a table")
    for key in table:
        if key not in _ADMIN_KEYS:
            raise bad(f"[admin] key {key!r} is unknown; known: {', '.join(_ADMIN_KEYS)}")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise bad(f"[admin] enabled = {enabled!r} must be true or false")
    if not enabled:
        return {}, (), ""
    admin: dict[str, Any] = {"enabled": True}
    warnings: tuple[str, ...] = ()
    if provision_file is None:
        raise bad("[admin] needs a provision file (the console's coordinator-provision.json: "
                  "its operators' keys are who may use the channel); set provision, or "
                  "remove [admin]")
    if not isinstance(provision.get("operators"), dict):
        raise bad(f"[admin]: provision file {provision_file} has no operators table")
    if "endpoint" in table:
        endpoint = _bind_endpoint(table["endpoint"], "[admin] endpoint", bad)
    elif "admin_endpoint" in provision:
        endpoint = _bind_endpoint(provision["admin_endpoint"],
                                  f"admin_endpoint in provision file {provision_file} (for "
                                  "[admin], which names no endpoint)", bad)
    else:
        return admin, (), ""  # the process says there is none (an older provision file)
    if _same_port(endpoint, bind):
        raise bad(f"[admin] endpoint {endpoint} takes the port of bind = {bind!r}: the "
                  "admin channel needs a port of its own (console init: bind's port + 1)")
    if "endpoint" not in table and lookup:
        try:
            warnings = admin_default(endpoint, provision_file)
        except ValueError as exc:
            # not refused: at ca3e257 such a coordinator served the federation while the
            # channel failed to bind; refusing made an upgrade stop every site's training
            return {}, (), (f"{bad(str(exc))}. The admin channel is off: the console "
                            "cannot reach this coordinator until it is fixed")
    admin["endpoint"] = endpoint
    return admin, warnings, ""


def admin_default(told: str, provision_file: Path | None) -> tuple[str, ...]:
    """Whether the admin channel may listen at ``told``, the provision file's
    ``admin_endpoint``, when ``[admin]`` names no endpoint of its own: ``told``'s host
    must be an address of this host, or a name that resolves here (bounded lookup) to
    one, as libzmq will bind it (`fedge.transport._sockopts.listen_address`). That
    name is what the console dials: on the coordinator it may not resolve, or be no
    address of it (split DNS, NAT); the channel then failed to bind and restarted every
    20 s while `fedge coordinator check` said ok. It is not widened to every interface
    instead (a976330 did): an upgrade would have moved a channel from one address to
    all of them unasked. Returns a warning when a name that is not loopback's resolves
    to a loopback address (Debian's /etc/hosts gives the host's own name 127.0.1.1):
    only this host reaches the channel then.

    Raises: ValueError: one line naming ``told``, why, and the line to add to [admin].
    """
    from fedge.transport._sockopts import is_loopback_host, listen_address

    if not told.startswith("tcp://"):
        return ()
    host, _, port = told[len("tcp://"):].rpartition(":")
    add = (f'endpoint = "tcp://0.0.0.0:{port}" (every interface) or endpoint = '
           f'"tcp://ADDRESS:{port}" with the address of this host to listen at')
    try:
        address = listen_address(told)
    except ValueError as exc:
        raise ValueError(
            f"[admin] names no endpoint, and this host cannot listen at the provision "
            f"file's admin_endpoint {told} (what the console dials; provision file "
            f"{provision_file}): {exc}. Add under [admin]: {add}") from None
    if address is None or is_loopback_host(host) or not is_loopback_host(address):
        return ()
    return (f"[admin] names no endpoint, so the admin channel listens at the provision "
            f"file's admin_endpoint {told} (provision file {provision_file}), and {host} "
            f"resolves here to {address}, a loopback address: only this host reaches it. "
            f"Where the console runs on another host, add under [admin]: {add}",)


def endpoint_warnings(path: Path, bind: str, bind_set: bool, admin: dict[str, Any],
                      provision: dict[str, Any], provision_file: Path | None) -> tuple[str, ...]:
    """The endpoints bound on a port other than the one the provision file tells the
    appliances (``endpoint``: what `fedge console enrol` gave them to connect to) or the
    console (``admin_endpoint``). Warnings, not refusals: behind NAT or a port forward
    the port dialled may differ from the one bound. The packaged coordinator.toml leaves
    bind at its default, port 7700, whatever port the console was initialised with."""
    found = []
    for key, bound, told, whom, how in (
            ("bind", bind, provision.get("endpoint"), "the appliances",
             "were enrolled to connect to"),
            ("[admin] endpoint", admin.get("endpoint"), provision.get("admin_endpoint"),
             "the console", "connects to")):
        port, told_port = _port(bound), _port(told)
        if port is None or told_port is None or port in ("0", "*") or port == told_port:
            continue
        what = (f"bind is not set in {path}, so it is {DEFAULT_BIND}"
                if key == "bind" and not bind_set else f"{key} = {bound!r} in {path}")
        suggested = f"{bound.rpartition(':')[0]}:{told_port}"
        found.append(f"{what}, port {port}; but {told}, the endpoint {whom} {how} "
                     f"(provision file {provision_file}), has port {told_port}. Unless a NAT "
                     f"or port forward maps port {told_port} to {port}, {whom} will not reach "
                     f"it: set {key} = {suggested!r}")
    return tuple(found)


def _port(endpoint: object) -> str | None:
    """The port of a tcp:// endpoint, else None."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        return None
    _, sep, port = endpoint.rpartition(":")
    return port if sep else None


def _same_port(a: str, b: str) -> bool:
    """Whether two tcp:// endpoints would bind one port of one address (a wildcard
    host takes the port on every address); port 0 or * is any free port."""
    if not (a.startswith("tcp://") and b.startswith("tcp://")):
        return a == b
    host_a, _, port_a = a[len("tcp://"):].rpartition(":")
    host_b, _, port_b = b[len("tcp://"):].rpartition(":")
    wild = {"*", "0.0.0.0", "[::]", "::"}
    return (port_a == port_b and port_a not in ("0", "*")
            and (host_a == host_b or host_a in wild or host_b in wild))


def _bind_endpoint(value: Any, key: str, bad: Callable[[str], ConfigError]) -> str:
    """An endpoint to bind: what a client may connect to (``tcp://HOST:PORT``, PORT in
    1..65535, or ``ipc://PATH``), or port 0 or ``*``: any free port (the coordinator
    writes the one it got to ``<state_dir>/endpoint``), or HOST ``*``: every address,
    IPv6 and IPv4 (`fedge.transport._sockopts.check_endpoint`, ``bind=True``). libzmq
    took a port out of range modulo 65536 (``:99999`` listened on 34463, ``:-1`` on
    65535); an IPv6 address is written in brackets (``tcp://[::1]:7700``).

    Raises: ConfigError naming ``key`` and the rule."""
    from fedge.transport._sockopts import check_endpoint, host_problem

    try:
        return check_endpoint(value, bind=True)
    except ValueError:
        pass
    problem = None
    if isinstance(value, str) and value.startswith("tcp://"):
        host = value[len("tcp://"):].rpartition(":")[0]
        problem = host_problem(host, bind=True) if host else None
    raise bad(f"{key} = {value!r} must be a ZeroMQ endpoint like {DEFAULT_BIND}: "
              "tcp://HOST:PORT with PORT in 1..65535 (0 or * for any free port), or "
              "ipc://PATH" + (f"; {problem}" if problem else ""))


def _pos(v: Any, key: str, bad: Callable[[str], ConfigError]) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise bad(f"{key} = {v!r} must be a number > 0")
    return float(v)


# ---------------------------------------------------------------- what check sees too

@dataclass(frozen=True)
class StartCheck:
    """What `fedge coordinator run` would meet at start beyond the file itself
    (`start_check`), each a line naming the key, the path or port, and why:

    ``refused``: run would stop (exit 2 from check): the endpoint ``bind`` names
    cannot be listened at (the port is another process's, the host is no address of
    this host, a port below 1024 without the privilege), or the state directory, its
    lock, its database or its endpoint file cannot be written by this user.
    ``jobs``: run starts, but no job's checkpoints or outputs can be written (the
    state directory's ``jobs/``, exit 1). ``warnings``: run serves the federation, but
    the admin channel cannot listen where it is told (it is retried, with a log line
    each time). ``notes``: a port held by the running coordinator of this state
    directory: what a restart frees, no problem."""

    refused: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


def start_check(cfg: CoordinatorConfig, *, owner: tuple[int, int] | None = None,
                groups_of: str | None = None) -> StartCheck:
    """What run would meet at start that the configuration does not say by itself, seen
    without starting, locking or writing anything: the listen endpoints (``bind``, and
    the admin channel's where it is on), each tried as libzmq binds it
    (`try_listen`: a socket bound and closed at once, never listening), and the state
    directory as this user may use it (`state_dir_problems`). Check runs beside the
    running coordinator: a port held by the process holding this state directory's
    lock (fedge.instance_lock.lock_holder, tested without taking it) is a note, not a problem.

    ``owner`` (uid, gid): the state directory is looked at as that user, from a child
    process dropped to it (fedge.as_owner.run_as; this process must be root): the
    service user, where check runs as root to read the provision file. ``groups_of``:
    that user's name, whose supplementary groups the child takes, as systemd's ``User=``
    gives them to the service: a state directory it may write through a group is not
    reported as denied.

    Raises: OSError: the child could not be run as ``owner`` (named)."""
    import importlib

    from fedge.as_owner import run_as
    from fedge.instance_lock import lock_holder

    for module in ("pwd", "stat", "fedge.access", "fedge.coordinator.store", "fedge.text"):
        importlib.import_module(module)  # here: the child may not read the modules

    # first, before a name's lookup may leave a thread behind (run_as forks)
    stops, jobs = run_as(owner, lambda: state_dir_problems(Path(cfg.state_dir)),
                         what=f"looking at state_dir {cfg.state_dir}", umask=None,
                         groups_of=groups_of)
    holder = lock_holder(Path(cfg.state_dir))
    refused: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    where = f" in {cfg.path}" if cfg.path is not None else ""
    endpoints = [(f"bind = {cfg.bind!r}{where}", cfg.bind, refused,
                  "the coordinator cannot listen for the appliances there and stops")]
    admin = cfg.admin.get("endpoint")
    if admin:
        endpoints.append((f"the admin channel's endpoint {admin}{where}", admin, warnings,
                          "the coordinator serves the federation, but the admin channel "
                          "fails to start (retried, and logged as an ERROR each time): the "
                          "console cannot reach it"))
    for what, endpoint, found, then in endpoints:
        trouble, note = listen_problem(endpoint, cfg.state_dir, holder)
        if trouble:
            found.append(f"{what}: {trouble}: {then}")
        if note:
            notes.append(f"{what}: {note}")
    return StartCheck(tuple(refused + stops), tuple(jobs), tuple(warnings), tuple(notes))


def listen_problem(endpoint: str, state_dir: Path, holder: int | None
                   ) -> tuple[str, str]:
    """Why run cannot listen at ``endpoint`` ("" when it can), and a note when its port
    is held by the running coordinator ``holder`` (`lock_holder` of ``state_dir``):
    a restart frees it. A port the process holding it does not tell this user (its
    /proc/PID/fd unreadable: another user's) is taken as the coordinator's when one
    holds the lock, else named as held by an unknown process."""
    import errno

    if endpoint.startswith("ipc://"):
        parent = Path(endpoint[len("ipc://"):]).parent
        if not os.access(parent, os.W_OK | os.X_OK):
            return (f"the socket's directory {parent} does not exist or cannot be written"
                    f"{as_user()}"), ""
        return "", ""
    from fedge.transport._sockopts import listen_address

    try:
        address = listen_address(endpoint)  # None for '*'
    except ValueError as exc:
        return f"this host cannot listen there: {exc}", ""
    port = endpoint.rpartition(":")[2]
    if port in ("0", "*"):
        return "", ""  # any free port: the one got is written to <state_dir>/endpoint
    error = try_listen(address, int(port))
    if error is None:
        return "", ""
    if error.errno == errno.EADDRINUSE:
        holders, complete = port_holders(int(port))
        lock = f"it holds {state_dir}'s lock"
        if holder is not None and (holder in holders or (not holders and not complete)):
            pid = f" (pid {holder})" if holder else ""
            return "", f"port {port} is in use by the running coordinator{pid}; {lock}"
        if holders:
            who = "; ".join(f"pid {pid} ({what})" for pid, what in sorted(holders.items()))
            return f"port {port} is in use by another process: {who}", ""
        unseen = "" if complete else f" (which one is not shown{as_user()}: run check as root)"
        return f"port {port} is in use by another process{unseen}", ""
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{address} is not an address of this host", ""
    if error.errno == errno.EACCES:
        return (f"port {port} is below 1024, which only a privileged process may listen at"
                f" (refused{as_user()}); use a port of 1024 or above"), ""
    return f"cannot listen at port {port}: {error.strerror or error}", ""


def try_listen(address: str | None, port: int) -> OSError | None:
    """Bind (``address``, ``port``) as libzmq binds a tcp:// listener, then close at
    once, never listening (no connection can come in): SO_REUSEADDR on, as libzmq sets
    it, so a port left in TIME_WAIT is free, as it is to libzmq; an IPv6 socket with
    IPV6_V6ONLY off (``address`` None, host ``*``: every address, IPv6 and IPv4; an
    IPv4 one on a kernel without IPv6, as libzmq falls back). Linux refuses the bind
    when any socket listens on the port at that address or the wildcard. The error,
    or None when it binds."""
    import socket

    if address is None:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        candidates = [(socket.AF_INET6 if ":" in address else socket.AF_INET, address)]
    for family, host in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            if family == socket.AF_INET6 and address is None:
                continue  # no IPv6 here: libzmq listens on IPv4 alone
            raise
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError as exc:
                return exc
        return None
    return None


def port_holders(port: int) -> tuple[dict[int, str], bool]:
    """The processes with a socket listening on TCP ``port`` (any address, IPv4 or
    IPv6: /proc/net/tcp, tcp6), each pid with its command line, shortened; and whether
    every process could be looked at (another user's /proc/PID/fd is root's to read).
    Empty, False where /proc says nothing (not Linux)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address HEX:PORT, state 0A: LISTEN, inode
            if len(fields) > 9 and fields[3] == "0A" and \
                    int(fields[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return {}, False
    found: dict[int, str] = {}
    complete = True
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}, False
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue  # ended meanwhile
        except OSError:
            complete = False
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inodes:
                found[pid] = _command_of(pid)
                break
    return found, complete


def _command_of(pid: int) -> str:
    """PID's command line, shortened, printable (a process's own text: fedge.text)."""
    from fedge.text import printable

    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        text = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    except OSError:
        text = ""
    if not text:
        try:
            text = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            text = "?"
    text = printable(text)
    return text if len(text) <= 100 else text[:97] + "..."


def state_dir_problems(state_dir: Path) -> tuple[list[str], list[str]]:
    """What of the state directory this user (the service user, running check) cannot
    use as run uses it, looked at without writing (``os.access``: mode bits, ACLs, a
    read-only mount): first what stops run at start -- the directory itself (or, where
    it does not exist yet, the directory it is made in), its lock (coordinator.lock),
    the database and its -wal and -shm files, the endpoint file written once it
    listens; then ``jobs/``, where every job's checkpoints and outputs go (run starts,
    and each job fails)."""
    from fedge.access import cannot_write
    from fedge.coordinator.store import DB_NAME

    user = as_user() or " as this user"
    why = (f"`fedge coordinator run`{user} would stop at start; give the service user the "
           "directory (chown -R), or point state_dir at one it owns")

    import stat

    def unreachable(path: Path, exc: OSError) -> list[str]:
        return [f"state_dir {state_dir} cannot be reached{user}: {exc.strerror or exc}: "
                f"{path}: {why}"]

    try:
        top = os.stat(state_dir)
    except FileNotFoundError:
        parent = state_dir.parent  # run makes it, and the directories on the way
        while True:
            try:
                top = os.stat(parent)
                break
            except FileNotFoundError:
                if parent == parent.parent:
                    raise
                parent = parent.parent
            except OSError as exc:
                return unreachable(parent, exc), []
        if not stat.S_ISDIR(top.st_mode):
            return [f"state_dir {state_dir} cannot be made: {parent} is not a directory"], []
        said = cannot_write(parent, f"state_dir {state_dir} does not exist, and the "
                            "directory it would be made in,", os.W_OK | os.X_OK, user)
        return ([f"{said}: {why}"] if said else []), []
    except OSError as exc:  # a directory on the way this user cannot search
        return unreachable(state_dir, exc), []
    if not stat.S_ISDIR(top.st_mode):
        return [f"state_dir {state_dir} is not a directory"], []
    stops: list[str] = []
    said = cannot_write(state_dir, "state_dir", os.R_OK | os.W_OK | os.X_OK, user)
    if said:  # what is in it is the same user's to fix, and may not be seen
        return [f"{said}: {why}"], []
    for name in ("coordinator.lock", DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "endpoint"):
        path = state_dir / name
        if os.path.lexists(path):
            said = cannot_write(path, "its file", os.R_OK | os.W_OK, user)
            if said:
                stops.append(f"{said}: {why}")
    jobs = state_dir / "jobs"
    found: list[str] = []
    if os.path.isdir(jobs):
        said = cannot_write(jobs, "the job directory", os.R_OK | os.W_OK | os.X_OK,
                            user)
        if said:
            found.append(f"{said}: `fedge coordinator run` starts, but no job's checkpoints "
                         "and outputs can be written: each job fails")
    return stops, found


def _user_name() -> str:
    """This process's user's name (the service user's, as packaged, where unknown)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return "fedge"
