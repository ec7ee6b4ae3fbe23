"""The console's key store: the operator's root of trust.

``fedge console init --home DIR`` creates (every file 0600, DIR 0700)::

    console.json                    console id, coordinator endpoint+key, operators, sites
    keys/roster.key                 Ed25519 roster-signing key (secagg Identity, 32 raw bytes)
    keys/tuf-root.pem, tuf-targets.pem         offline TUF keys: never leave DIR
    keys/tuf-snapshot.pem, tuf-timestamp.pem   online TUF keys: exported to the coordinator
    keys/coordinator.curve.json     the coordinator's CURVE key pair
    keys/operator-<name>.curve.json an operator's CURVE key pair and role
    tuf/<N>.root.json, tuf/targets.json        signed TUF metadata (console's copy)
    coordinator-provision.json      everything the coordinator needs, in one file
    pending-rotation.json           a key rotation sent and not yet stored (its new
                                    private keys): finished by running it again

Enrolment (`enrol`) creates an appliance's CURVE key pair and Ed25519 identity,
enters the identity into the console-signed roster and writes one enrolment
file for the site (see `fedge.console.enrolment`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import TargetFile

from fedge.secagg.keys import Identity, Roster, case_twin, check_client_id
from fedge.update import tuf_repo
from fedge.update.files import (
    curve_keypair,
    ed25519_pem,
    load_ed25519,
    remove_stale_temps,
    write_atomic,
    write_json,
)

FORMAT = "fedge-console/1"
PROVISION_FORMAT = "fedge-coordinator-provision/1"
ROLES: tuple[str, ...] = ("admin", "viewer")
DEFAULT_OPERATORS: tuple[tuple[str, str], ...] = (("admin", "admin"), ("viewer", "viewer"))
# A push renews root (same keys, version N+1) once it expires within this: root
# expires a year after it is signed, and an appliance refuses every update under an
# expired root.
ROOT_RENEW_BEFORE = timedelta(days=30)


class ConsoleError(ValueError):
    """A console operation was refused; the message names what and why."""


def _admin_endpoint(coordinator_endpoint: str, admin_endpoint: str | None) -> str:
    """The admin endpoint `init` records: as given, else the coordinator's next port.

    Raises: ConsoleError for an endpoint that is not tcp://HOST:PORT (or ipc://)."""
    if not (isinstance(coordinator_endpoint, str)
            and coordinator_endpoint.startswith(("tcp://", "ipc://"))):
        raise ConsoleError(f"coordinator endpoint {coordinator_endpoint!r} must look like "
                           "tcp://HOST:PORT")
    if admin_endpoint is not None:
        return admin_endpoint
    host, _, port = coordinator_endpoint.rpartition(":")
    if not port.isdigit():
        raise ConsoleError(f"coordinator endpoint {coordinator_endpoint!r} has no port; "
                           "give the admin endpoint explicitly")
    return f"{host}:{int(port) + 1}"


def _check_operators(operators: Sequence[tuple[str, str]]) -> None:
    """Raises: ConsoleError for a bad operator name or role, or a name given twice."""
    seen = set()
    for name, role in operators:
        _check_name(name, what="operator name")
        if role not in ROLES:
            raise ConsoleError(f"operator {name!r} role {role!r} must be one of "
                               f"{', '.join(ROLES)}")
        if name in seen:
            raise ConsoleError(f"operator name {name!r} given twice")
        seen.add(name)


def _write(path: Path, data: bytes) -> None:
    """`write_atomic`, 0600. Raises: OSError naming `path` (a write's ENOSPC names no
    file of itself)."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _write_json(path: Path, obj: object) -> None:
    """`write_json`, 0600. Raises: OSError naming `path`, TypeError."""
    _write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class ConsoleStore:
    """An initialised console home. Open with `ConsoleStore(home)`, create with `init`."""

    def __init__(self, home: Path, *, clock: tuf_repo.Clock = tuf_repo.utcnow) -> None:
        """Open the store at `home`.

        Raises:
            FileNotFoundError: `home` was never initialised (says to run init).
            ConsoleError: console.json is corrupt or of another format.
        """
        self.home = Path(home)
        self.clock = clock
        path = self.home / "console.json"
        if not path.exists():
            raise FileNotFoundError(f"no console at {self.home}: run "
                                    f"`fedge console --home {self.home} init --coordinator "
                                    "tcp://HOST:PORT` first")
        try:
            self.state = json.loads(path.read_text())
        except ValueError as exc:
            raise ConsoleError(f"{path} is corrupt: {exc}") from exc
        if self.state.get("format") != FORMAT:
            raise ConsoleError(f"{path} has format {self.state.get('format')!r}, "
                               f"expected {FORMAT!r}")

    # -- creation ------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        home: Path,
        *,
        coordinator_endpoint: str,
        admin_endpoint: str | None = None,
        operators: Sequence[tuple[str, str]] = DEFAULT_OPERATORS,
        clock: tuf_repo.Clock = tuf_repo.utcnow,
    ) -> ConsoleStore:
        """Create every key and the first TUF metadata.

        console.json is written last, once everything else (the provision file too) is
        on disk: a home without it holds no console, whatever an init cut short (a
        full disk) left there, and init starts afresh in it. A console.json left
        without its coordinator-provision.json (an init cut short by a release that
        wrote console.json first) is finished: the provision file is written from it,
        when the console was never used (no site enrolled, no key rotated) and the
        endpoints and operators asked for are its own.

        Raises:
            ConsoleError: `home` already holds a console, the endpoint is not
                tcp://host:port, an operator name/role is invalid, or a file cannot be
                written (named, with the error; rerunning init after freeing space
                starts afresh).
        """
        home = Path(home)
        if (home / "console.json").exists():
            return cls._finish_init(home, coordinator_endpoint, admin_endpoint, operators,
                                    clock)
        admin_endpoint = _admin_endpoint(coordinator_endpoint, admin_endpoint)
        _check_operators(operators)
        try:
            return cls._init(home, coordinator_endpoint, admin_endpoint, operators, clock)
        except OSError as exc:
            raise ConsoleError(f"console init in {home} did not finish: cannot write "
                               f"{exc.filename or home}: "
                               f"{exc.strerror or exc}. Nothing in {home} is in use yet: free "
                               "space (or mend the permissions) and run init again, which "
                               "starts afresh") from exc

    @classmethod
    def _init(cls, home: Path, coordinator_endpoint: str, admin_endpoint: str,
              operators: Sequence[tuple[str, str]], clock: tuf_repo.Clock) -> ConsoleStore:
        """`init`'s writes, console.json last. Raises: OSError naming the file."""
        home.mkdir(parents=True, exist_ok=True)
        os.chmod(home, 0o700)
        keys = home / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        for directory in (home, keys, home / "tuf"):  # what an init cut short left
            remove_stale_temps(directory)
        roster = Identity.generate()
        _write(keys / "roster.key", roster.private_bytes())
        tuf_keys = {role: Ed25519PrivateKey.generate() for role in tuf_repo.ROLE_NAMES}
        for role, key in tuf_keys.items():
            _write(keys / f"tuf-{role}.pem", ed25519_pem(key))
        coord_pub, coord_sec = curve_keypair()
        _write_json(keys / "coordinator.curve.json", {"public": coord_pub, "secret": coord_sec})
        ops = {}
        for name, role in operators:
            pub, sec = curve_keypair()
            _write_json(keys / f"operator-{name}.curve.json",
                        {"name": name, "role": role, "public": pub, "secret": sec})
            ops[name] = {"role": role, "public_key": pub}
        now = clock()
        root = tuf_repo.create_root(tuf_keys["root"], tuf_keys["targets"], tuf_keys["snapshot"],
                                    tuf_keys["timestamp"], now=now)
        targets = tuf_repo.create_targets(tuf_keys["targets"], {}, version=1, now=now)
        _write(home / "tuf" / "1.root.json", tuf_repo.to_bytes(root))
        _write(home / "tuf" / "targets.json", tuf_repo.to_bytes(targets))
        store = cls.__new__(cls)
        store.home, store.clock = home, clock
        store.state = {
            "format": FORMAT,
            "console_id": secrets.token_hex(8),
            "created": now.isoformat(),
            "coordinator": {"endpoint": coordinator_endpoint, "admin_endpoint": admin_endpoint,
                            "public_key": coord_pub},
            "operators": ops,
            "sites": {},
            "root_version": 1,
        }
        _write_json(home / "coordinator-provision.json", store.provision())
        _write_json(home / "console.json", store.state)  # the console exists from here
        return cls(home, clock=clock)

    @classmethod
    def _finish_init(cls, home: Path, coordinator_endpoint: str, admin_endpoint: str | None,
                     operators: Sequence[tuple[str, str]],
                     clock: tuf_repo.Clock) -> ConsoleStore:
        """`init` on a home that holds console.json: see there. Raises: ConsoleError."""
        refused = f"{home} already holds a console; refusing to overwrite its keys"
        provision = home / "coordinator-provision.json"
        if provision.exists():
            raise ConsoleError(refused)
        store = cls(home, clock=clock)
        if store.state["sites"] or store.state.get("root_version") != 1 \
                or store.pending_rotation_path.exists():
            raise ConsoleError(f"{refused} (its {provision.name} is not there, but sites "
                               "were enrolled or keys rotated since its init: it is in use)")
        cut_short = (f"{home} holds a console whose init did not finish: console.json, but "
                     f"no {provision.name}")
        try:
            asked = (coordinator_endpoint, _admin_endpoint(coordinator_endpoint,
                                                           admin_endpoint))
        except ConsoleError as exc:
            raise ConsoleError(f"{cut_short}; {exc}") from None
        own = (store.coordinator_endpoint, store.admin_endpoint)
        own_ops = sorted((n, str(o["role"])) for n, o in store.state["operators"].items())
        if asked != own or sorted(operators) != own_ops:
            raise ConsoleError(
                f"{cut_short}, for coordinator {own[0]} (admin {own[1]}, operators "
                f"{', '.join(f'{n}:{r}' for n, r in own_ops)}). It was never used: run "
                f"init again with those to finish it, or remove {home} to start afresh")
        try:
            store.write_provision_file()
        except OSError as exc:
            raise ConsoleError(f"{cut_short}; finishing it: cannot write {provision}: "
                               f"{exc.strerror or exc}") from exc
        return store

    # -- keys and metadata -----------------------------------------------------------------
    @property
    def console_id(self) -> str:
        return str(self.state["console_id"])

    @property
    def coordinator_endpoint(self) -> str:
        return str(self.state["coordinator"]["endpoint"])

    @property
    def admin_endpoint(self) -> str:
        return str(self.state["coordinator"]["admin_endpoint"])

    @property
    def coordinator_public_key(self) -> str:
        return str(self.state["coordinator"]["public_key"])

    def roster_identity(self) -> Identity:
        return Identity.load(self.home / "keys" / "roster.key")

    def roster_public_key(self) -> bytes:
        return self.roster_identity().public_bytes()

    def tuf_key(self, role: str) -> Ed25519PrivateKey:
        return load_ed25519(self.home / "keys" / f"tuf-{role}.pem")

    def root_bytes(self) -> bytes:
        return (self.home / "tuf" / f"{self.state['root_version']}.root.json").read_bytes()

    def targets_bytes(self) -> bytes:
        return (self.home / "tuf" / "targets.json").read_bytes()

    def operator_keys(self, name: str) -> dict[str, str]:
        """The operator's CURVE key pair and role.

        Raises: ConsoleError if there is no such operator.
        """
        path = self.home / "keys" / f"operator-{name}.curve.json"
        if name not in self.state["operators"] or not path.exists():
            raise ConsoleError(f"no operator {name!r} in this console "
                               f"(known: {', '.join(sorted(self.state['operators']))})")
        return json.loads(path.read_text())

    def provision(self) -> dict[str, object]:
        """What the coordinator needs: CURVE secret, operators, roster key, TUF online keys."""
        coord = json.loads((self.home / "keys" / "coordinator.curve.json").read_text())
        online = {role: base64.b64encode((self.home / "keys" / f"tuf-{role}.pem").read_bytes())
                  .decode() for role in ("snapshot", "timestamp")}
        return {
            "format": PROVISION_FORMAT,
            "console_id": self.console_id,
            "endpoint": self.coordinator_endpoint,
            "admin_endpoint": self.admin_endpoint,
            "curve_public": coord["public"],
            "curve_secret": coord["secret"],
            "operators": {op["public_key"]: {"name": name, "role": op["role"]}
                          for name, op in self.state["operators"].items()},
            "roster_public_key": self.roster_public_key().hex(),
            "roster": self.roster().to_bytes().decode(),
            "tuf_online_keys": online,
            "tuf_root": self.root_bytes().decode(),
            "tuf_targets": self.targets_bytes().decode(),
        }

    def write_provision_file(self) -> Path:
        path = self.home / "coordinator-provision.json"
        write_json(path, self.provision())
        return path

    # -- sites ---------------------------------------------------------------------------
    def sites(self) -> dict[str, dict[str, object]]:
        return dict(self.state["sites"])

    def active_sites(self) -> list[str]:
        return sorted(s for s, info in self.state["sites"].items() if not info.get("revoked"))

    def roster(self) -> Roster:
        """The console-signed roster of every enrolled, unrevoked site."""
        entries = {s: bytes.fromhex(self.state["sites"][s]["ed25519_public"])
                   for s in self.active_sites()}
        return Roster.build(entries, self.roster_identity(), serial=self.roster_serial)

    @property
    def roster_serial(self) -> int:
        """Grows with every enrolment and revocation (the roster's version). A console
        from before serials counts its history: one per site, one per revocation."""
        default = len(self.state["sites"]) + sum(
            1 for v in self.state["sites"].values() if v.get("revoked"))
        return int(self.state.get("roster_serial", default))

    def _roster_changed(self) -> None:
        self.state["roster_serial"] = self.roster_serial + 1

    def add_site(self, site: str, curve_public: str, ed25519_public: bytes) -> None:
        """Record an enrolled site.

        Raises: ConsoleError if the name breaks the site-name rule, the site is already
        enrolled and not revoked, or an enrolled site has the same name except for case.
        """
        _check_name(site, what="site")
        existing = self.state["sites"].get(site)
        if existing and not existing.get("revoked"):
            raise ConsoleError(f"site {site!r} is already enrolled; revoke it first to "
                               "issue a new identity (if the coordinator never took it, "
                               "`fedge console sync` sends it)")
        twin = case_twin(site, self.active_sites())
        if twin is not None:
            raise ConsoleError(f"site {site!r} differs from the enrolled site {twin!r} only "
                               "in case; site names must differ in more than case (revoke "
                               f"{twin!r} first if this is a rename)")
        self._roster_changed()
        self.state["sites"][site] = {
            "curve_public": curve_public,
            "ed25519_public": ed25519_public.hex(),
            "enrolled": self.clock().isoformat(),
            "revoked": False,
        }
        self._save()

    def enrol_request(self, site: str) -> tuple[dict[str, str], dict[str, bytes]]:
        """The admin ``enrol`` op's arguments and blobs for `site`: its keys, the
        current signed roster and the site's enrolment grant (`enrol_grant`). The
        coordinator takes a site's keys only with both, so an operator key alone
        cannot put a key on its allow-list.

        Raises: ConsoleError if the site is not enrolled, or is revoked."""
        info = self.state["sites"].get(site)
        if info is None or info.get("revoked"):
            raise ConsoleError(f"site {site!r} is not an enrolled, unrevoked site of this "
                               "console")
        args = {"site": site, "curve_public": str(info["curve_public"]),
                "ed25519_public": str(info["ed25519_public"])}
        return args, {"roster": self.roster().to_bytes(), ENROL_GRANT: self.enrol_grant(site)}

    def enrol_grant(self, site: str) -> bytes:
        """`site`'s CURVE key and identity, signed with the roster key: what binds the
        key the coordinator lets in to the console (the signed roster names only the
        identity). Checked by `check_enrol_grant`."""
        info = self.state["sites"][site]
        payload = json.dumps({"format": GRANT_FORMAT, "site": site,
                              "curve_public": info["curve_public"],
                              "ed25519_public": info["ed25519_public"]},
                             sort_keys=True).encode()
        signature = self.roster_identity().sign(payload)
        return json.dumps({"payload": base64.b64encode(payload).decode(),
                           "signature": signature.hex()}, sort_keys=True).encode()

    def revoke_site(self, site: str) -> dict[str, object]:
        """Mark `site` revoked; returns its record. A site already revoked is left as
        it was (its revocation time, the roster serial): revoking it again only tells
        the coordinator again, e.g. one that was unreachable the first time.

        Raises: ConsoleError if the site was never enrolled.
        """
        info = self.state["sites"].get(site)
        if info is None:
            raise ConsoleError(f"site {site!r} is not enrolled (enrolled: "
                               f"{', '.join(sorted(self.state['sites'])) or 'none'})")
        if info.get("revoked"):
            return dict(info)
        self._roster_changed()
        info["revoked"] = True
        info["revoked_at"] = self.clock().isoformat()
        self._save()
        return dict(info)

    def revoke_unknown_site(self, site: str, curve_public: str,
                            ed25519_public_hex: str) -> dict[str, object]:
        """Record the revocation of a site the coordinator lists that this console did
        not enrol (a copy of this console's home, another console or the coordinator's
        host command enrolled it): its keys as the coordinator holds them, marked
        ``not_enrolled_here``. The roster serial grows, so the roster sent with the
        revocation replaces one that named it. A site this console knows is
        `revoke_site`'s; returns the record."""
        if site in self.state["sites"]:
            return self.revoke_site(site)
        self._roster_changed()
        now = self.clock().isoformat()
        self.state["sites"][site] = {"curve_public": curve_public,
                                     "ed25519_public": ed25519_public_hex,
                                     "enrolled": None, "not_enrolled_here": True,
                                     "revoked": True, "revoked_at": now}
        self._save()
        return dict(self.state["sites"][site])

    def raise_roster_serial(self, serial: int) -> None:
        """Make the next roster's serial at least `serial`: the coordinator holds a
        roster of a higher serial than this console's (signed by a copy of its roster
        key), which it would keep over this console's older-numbered one."""
        if serial > self.roster_serial:
            self.state["roster_serial"] = int(serial)
            self._save()

    # -- signed updates ------------------------------------------------------------------
    def sign_targets(
        self, new: Iterable[tuple[str, str, str, str, bytes]], *, now: datetime | None = None,
        persist: bool = True,
    ) -> tuple[bytes, dict[str, bytes]]:
        """Add targets (kind, name, version, filename, data) and sign a new targets.json
        that lists only the newest target of each lineage (`tuf_repo.lineage`): an
        appliance installs nothing older than the newest signed, nor than what it has
        installed, so an older one is of no use to it, and the coordinator may delete
        its file. An appliance several versions behind takes the newest directly.

        Returns (targets metadata bytes, {TUF path: data}) for the coordinator. With
        persist=False the console's copy is updated only by `save_targets`, once the
        coordinator accepted the new version.

        Raises:
            ConsoleError: a field is invalid; the version is older than the newest
                signed in its lineage, or is that version under another path or with
                other content; or a rotation of the offline keys is unfinished (the
                coordinator may already name a new targets key).
        """
        pending = self.pending_rotation()
        if pending is not None and pending.op == "rotate_offline_keys":
            raise ConsoleError(f"a rotation of the {' and '.join(pending.roles)} key(s) to "
                               f"root v{pending.root_version} is unfinished: run `fedge "
                               "console rotate-keys` to finish it before signing targets")
        now = now or self.clock()
        current = tuf_repo.load(self.targets_bytes(), "targets")
        files = dict(current.signed.targets)
        payload: dict[str, bytes] = {}
        for kind, name, version, filename, data in new:
            try:
                tf = tuf_repo.new_target_file(kind, name, version, filename, data)
            except ValueError as exc:
                raise ConsoleError(str(exc)) from exc
            mine = tuf_repo.version_key(version)
            newest = tuf_repo.newest_per_lineage(_fedge_specs(files).values())
            spec = newest.get(tuf_repo.lineage(kind, name))
            if spec is not None:
                old = files[spec.path]
                theirs = tuf_repo.version_key(spec.version)
                if theirs > mine:
                    raise ConsoleError(
                        f"{kind} {name} {version} is older than the signed {spec.kind} "
                        f"{spec.name} {spec.version} ({old.path!r}): appliances install only "
                        f"the newest version; publish a version above {spec.version}")
                if theirs == mine and (old.path != tf.path or old.hashes != tf.hashes):
                    other = " with other content" if old.hashes != tf.hashes else ""
                    raise ConsoleError(f"{kind} {name} {version} was already signed as "
                                       f"{old.path!r}{other}; publish a new version instead")
            files[tf.path] = tf
            payload[tf.path] = data
        md = tuf_repo.create_targets(self.tuf_key("targets"), _newest_only(files),
                                     version=current.signed.version + 1, now=now)
        data = tuf_repo.to_bytes(md)
        if persist:
            self.save_targets(data)
        return data, payload

    def save_targets(self, targets: bytes) -> None:
        """Record `targets` (signed by this console) as the latest published version."""
        write_atomic(self.home / "tuf" / "targets.json", targets)

    def root_expires(self) -> datetime:
        """When the console's current root metadata expires."""
        return tuf_repo.load(self.root_bytes(), "root").signed.expires

    def renewed_root(self, *, now: datetime | None = None) -> bytes | None:
        """Root version N+1 with the same keys when root N expires within
        `ROOT_RENEW_BEFORE`, else None; stored only by `save_root`, once the
        coordinator took it.

        Made again before it is stored (the console died after the coordinator took
        it), it is the same document byte for byte: its expiry is counted from root
        N's in whole years (Ed25519 signatures are deterministic), so the coordinator
        recognises the root it already holds. None while a key rotation is
        unfinished: finishing it signs a new root anyway.

        "Within" is by this console's clock: a slow one renews too late, and the
        coordinator refuses the push with root expired (`clock_note` says so).
        """
        now = now or self.clock()
        if self.pending_rotation() is not None:
            return None
        current = tuf_repo.load(self.root_bytes(), "root").signed
        if current.expires - now > ROOT_RENEW_BEFORE:
            return None
        year = tuf_repo.EXPIRY["root"]
        years = 1
        while current.expires + years * year - now <= ROOT_RENEW_BEFORE:
            years += 1
        # create_root counts a year from `now`: give it the year before the expiry wanted
        md = tuf_repo.create_root(self.tuf_key("root"), self.tuf_key("targets"),
                                  self.tuf_key("snapshot"), self.tuf_key("timestamp"),
                                  now=current.expires + (years - 1) * year,
                                  version=current.version + 1)
        return tuf_repo.to_bytes(md)

    def clock_note(self, *, now: datetime | None = None) -> str:
        """What this console's clock makes of the metadata it signs, for a refusal of
        expired metadata: its reading, when root expires by it (and so when a push
        renews it), and when the targets it signs now expire. A slow console clock
        explains such a refusal: it renews root too late and signs targets that the
        coordinator and the appliances already see as expired."""
        now = now or self.clock()
        expires = self.root_expires()
        renew = expires - ROOT_RENEW_BEFORE
        stamp = now.replace(microsecond=0).isoformat()
        return (f"this console's clock reads {stamp}; by it, root v{self.state['root_version']} "
                f"expires {expires.isoformat()} (a push renews it from {renew.isoformat()}) "
                f"and targets signed now expire "
                f"{(now + tuf_repo.EXPIRY['targets']).replace(microsecond=0).isoformat()}: if "
                "this clock is slow, that explains the refusal (root not renewed in time, "
                "targets signed already expired); fix it (NTP/RTC) and push again")

    def save_root(self, root: bytes) -> None:
        """Store a root made by `renewed_root` as the console's current one (new
        enrolments carry it) and rewrite the provision file."""
        version = tuf_repo.load(root, "root").signed.version
        write_atomic(self.home / "tuf" / f"{version}.root.json", root)
        self.state["root_version"] = version
        self._save()
        self.write_provision_file()

    def rotate_online_keys(self, *, now: datetime | None = None, persist: bool = True
                           ) -> tuple[bytes, bytes, bytes]:
        """New snapshot and timestamp keys (the coordinator's were exposed): sign root
        version N+1 naming them with the offline root key.

        Returns (new root metadata, snapshot key PEM, timestamp key PEM) for the
        coordinator. With persist=False nothing is stored until
        `commit_online_key_rotation`, once the coordinator accepted them.
        """
        now = now or self.clock()
        version = int(self.state["root_version"]) + 1
        snapshot, timestamp = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        root = tuf_repo.to_bytes(tuf_repo.create_root(
            self.tuf_key("root"), self.tuf_key("targets"), snapshot, timestamp, now=now,
            version=version))
        pems = (ed25519_pem(snapshot), ed25519_pem(timestamp))
        if persist:
            self.commit_online_key_rotation(root, pems[0], pems[1])
        return root, pems[0], pems[1]

    def commit_online_key_rotation(self, root: bytes, snapshot_pem: bytes,
                                   timestamp_pem: bytes) -> None:
        """Store a rotation made by `rotate_online_keys` and rewrite the provision file."""
        version = tuf_repo.load(root, "root").signed.version
        write_atomic(self.home / "tuf" / f"{version}.root.json", root)
        write_atomic(self.home / "keys" / "tuf-snapshot.pem", snapshot_pem)
        write_atomic(self.home / "keys" / "tuf-timestamp.pem", timestamp_pem)
        self.state["root_version"] = version
        self._save()
        self.write_provision_file()

    OFFLINE_ROLES = ("root", "targets")

    def rotate_offline_keys(self, roles: Iterable[str], *, now: datetime | None = None,
                            persist: bool = True) -> tuple[bytes, bytes, dict[str, bytes]]:
        """New keys for the offline roles named ("root", "targets"): after a key is lost
        or exposed, or on schedule. Root version N+1 names them and is signed by the
        current root key (and, when root itself rotates, by the new one too, as TUF
        requires); the current targets are re-signed as version M+1 with the targets
        key now named. Appliances follow root N+1 on their next refresh; metadata
        signed with a retired key is refused from then on.

        Returns (root N+1, targets M+1, {role: new key PEM}) for the coordinator. With
        persist=False nothing is stored until `commit_offline_key_rotation`, once the
        coordinator accepted them.

        Raises:
            ConsoleError: no role, or a role that is not offline.
        """
        roles = sorted(set(roles))
        bad = [r for r in roles if r not in self.OFFLINE_ROLES]
        if not roles or bad:
            raise ConsoleError(f"offline key roles to rotate must be among "
                               f"{', '.join(self.OFFLINE_ROLES)}; got {roles or 'none'}")
        now = now or self.clock()
        keys = {r: (Ed25519PrivateKey.generate() if r in roles else self.tuf_key(r))
                for r in self.OFFLINE_ROLES}
        root_md = tuf_repo.create_root(keys["root"], keys["targets"], self.tuf_key("snapshot"),
                                       self.tuf_key("timestamp"), now=now,
                                       version=int(self.state["root_version"]) + 1)
        if "root" in roles:  # the version before must vouch for the new root key
            root_md.sign(tuf_repo.signer(self.tuf_key("root")), append=True)
        current = tuf_repo.load(self.targets_bytes(), "targets")
        targets = tuf_repo.create_targets(keys["targets"], _newest_only(current.signed.targets),
                                          version=current.signed.version + 1, now=now)
        pems = {r: ed25519_pem(keys[r]) for r in roles}
        root, targets_bytes = tuf_repo.to_bytes(root_md), tuf_repo.to_bytes(targets)
        if persist:
            self.commit_offline_key_rotation(root, targets_bytes, pems)
        return root, targets_bytes, pems

    def commit_offline_key_rotation(self, root: bytes, targets: bytes,
                                    pems: dict[str, bytes]) -> None:
        """Store a rotation made by `rotate_offline_keys`: the retired keys are
        overwritten, and new enrolments carry root N+1."""
        version = tuf_repo.load(root, "root").signed.version
        write_atomic(self.home / "tuf" / f"{version}.root.json", root)
        for role, pem in pems.items():
            write_atomic(self.home / "keys" / f"tuf-{role}.pem", pem)
        self.save_targets(targets)
        self.state["root_version"] = version
        self._save()
        self.write_provision_file()

    # -- a rotation in flight ---------------------------------------------------------
    # A rotation is written here (with its new private keys, 0600) before the
    # coordinator is told, and removed only once the console has stored it. A console
    # that dies in between (or loses the coordinator's reply) finishes it by sending the
    # same documents again: the coordinator takes them once, so new keys that the fleet
    # may already trust are never lost.
    ROTATION_OPS = ("rotate_online_keys", "rotate_offline_keys")

    @property
    def pending_rotation_path(self) -> Path:
        return self.home / "pending-rotation.json"

    def begin_rotation(self, op: str, blobs: dict[str, bytes], pems: dict[str, bytes]
                       ) -> PendingRotation:
        """Keep a rotation made with persist=False before it is sent.

        Raises:
            ConsoleError: another rotation is still unfinished, or `op` is not a rotation.
        """
        if op not in self.ROTATION_OPS:
            raise ConsoleError(f"{op!r} is not a key rotation")
        if self.pending_rotation() is not None:
            raise ConsoleError(f"a key rotation is unfinished ({self.pending_rotation_path})")
        doc = {"op": op, "created": self.clock().isoformat(),
               "blobs": {k: base64.b64encode(v).decode() for k, v in blobs.items()},
               "pems": {k: base64.b64encode(v).decode() for k, v in pems.items()}}
        write_json(self.pending_rotation_path, doc)
        pending = self.pending_rotation()
        assert pending is not None
        return pending

    def pending_rotation(self) -> PendingRotation | None:
        """The rotation begun and not yet finished, if any.

        Raises:
            ConsoleError: the file is unreadable. It holds new private keys that the
                coordinator may already trust, so it is never moved aside or removed.
        """
        path = self.pending_rotation_path
        try:
            doc = json.loads(path.read_text())
            op = str(doc["op"])
            if op not in self.ROTATION_OPS:
                raise ValueError(f"op {op!r} is not a key rotation")
            blobs = {str(k): base64.b64decode(v, validate=True)
                     for k, v in doc["blobs"].items()}
            pems = {str(k): base64.b64decode(v, validate=True) for k, v in doc["pems"].items()}
            version = tuf_repo.load(blobs["root.json"], "root").signed.version
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConsoleError(
                f"{path} is unreadable ({type(exc).__name__}: {exc}); it holds the keys of "
                "an unfinished rotation: restore it from a backup before anything else") \
                from exc
        return PendingRotation(op, str(doc.get("created", "")), blobs, pems, version)

    def finish_rotation(self, pending: PendingRotation) -> None:
        """The coordinator holds `pending`: store it as the console's own, then forget
        it as pending (last, so a crash here is finished by running this again)."""
        root = pending.blobs["root.json"]
        if pending.op == "rotate_online_keys":
            self.commit_online_key_rotation(root, pending.pems["snapshot"],
                                            pending.pems["timestamp"])
        else:
            self.commit_offline_key_rotation(root, pending.blobs["targets.json"],
                                             pending.pems)
        self.pending_rotation_path.unlink()

    def abandon_rotation(self, coordinator_root_version: int) -> PendingRotation:
        """Drop the pending rotation, which the coordinator never took.

        Raises:
            ConsoleError: none is pending, or the coordinator's root is already at (or
                past) its version, so the fleet may trust its keys: finish it instead.
        """
        pending = self.pending_rotation()
        if pending is None:
            raise ConsoleError("no key rotation is pending")
        if coordinator_root_version >= pending.root_version:
            raise ConsoleError(
                f"the coordinator already holds root v{coordinator_root_version}, the "
                f"pending rotation's root is v{pending.root_version}: its keys may be "
                "trusted by the fleet; finish it (run the rotation command again) instead")
        self.pending_rotation_path.unlink()
        return pending

    def _save(self) -> None:
        write_json(self.home / "console.json", self.state)


@dataclass(frozen=True)
class PendingRotation:
    op: str  # "rotate_online_keys" or "rotate_offline_keys" (the admin op that sends it)
    created: str
    blobs: dict[str, bytes]  # what the coordinator is sent (root.json, targets.json, keys)
    pems: dict[str, bytes]  # the new private keys, by role
    root_version: int

    @property
    def roles(self) -> list[str]:
        return sorted(self.pems)


def _fedge_specs(files: Mapping[str, TargetFile]) -> dict[str, tuf_repo.TargetSpec]:
    """The fedge targets among `files`, by path (a target without fedge's description
    is not one)."""
    specs = {}
    for path, tf in files.items():
        try:
            specs[path] = tuf_repo.TargetSpec.from_target_file(tf)
        except ValueError:
            continue
    return specs


def _newest_only(files: Mapping[str, TargetFile]) -> dict[str, TargetFile]:
    """`files` less every fedge target older than the newest of its lineage (targets
    signed by an earlier console list every version ever pushed), and less every target
    described as fedge's whose fields break today's rule (an earlier console signed a
    version '4\n' or '٣': no appliance installs it, and the coordinator refuses a
    targets.json listing it, so keeping it would block every later push). Anything else
    that is not a fedge target is kept as it is."""
    specs = _fedge_specs(files)
    newest = {spec.path for spec in tuf_repo.newest_per_lineage(specs.values()).values()}
    return {path: tf for path, tf in files.items()
            if path in newest or (path not in specs and not _fedge_described(tf))}


def _fedge_described(tf: TargetFile) -> bool:
    custom = tf.custom if isinstance(tf.custom, dict) else {}
    return isinstance(custom.get("fedge"), dict)


ENROL_GRANT = "enrol_grant"  # the admin enrol op's blob holding the grant
GRANT_FORMAT = "fedge-enrol-grant/1"


def check_enrol_grant(grant: bytes, roster_public_key: bytes) -> dict[str, str]:
    """The site, CURVE key and identity (hex) an enrolment grant made by
    `ConsoleStore.enrol_grant` names, once its signature verifies under the console's
    roster key.

    Raises:
        ValueError: malformed, of another format, or not signed by that roster key.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        outer = json.loads(grant)
        payload = base64.b64decode(outer["payload"], validate=True)
        signature = bytes.fromhex(outer["signature"])
        Ed25519PublicKey.from_public_bytes(roster_public_key).verify(signature, payload)
        doc = json.loads(payload)
        if doc.get("format") != GRANT_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {GRANT_FORMAT!r}")
        return {k: str(doc[k]) for k in ("site", "curve_public", "ed25519_public")}
    except InvalidSignature:
        raise ValueError("the enrolment grant is not signed by the console's roster "
                         f"key {roster_public_key.hex()[:16]}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"the enrolment grant is malformed: {exc}") from exc


def _check_name(name: object, *, what: str) -> str:
    try:
        return check_client_id(name, what=what)
    except ValueError as exc:
        raise ConsoleError(str(exc)) from exc


def validity(days: float) -> timedelta:
    """Raises: ConsoleError if days is not in (0, 90]."""
    if not 0 < days <= 90:
        raise ConsoleError(f"validity {days} days must be in (0, 90]")
    return timedelta(days=days)
