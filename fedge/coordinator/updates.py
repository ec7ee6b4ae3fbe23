"""The coordinator's side of signed updates: TUF repository storage and relay.

The console signs root and targets offline; this module holds the online
snapshot and timestamp keys, re-signs those two roles whenever the console
publishes new targets (and the timestamp before it expires), and answers the
agents' chunked fetch requests. It never signs targets, so a compromised
coordinator can at worst withhold updates, not forge them.

Layout under ``<state_dir>/tuf/``::

    keys/snapshot.pem, keys/timestamp.pem      online keys (0600)
    metadata/<N>.root.json, <N>.targets.json, <N>.snapshot.json, timestamp.json
    targets/<kind>/<name>/<version>/<sha256>.<file>
    state.json                                 current versions (written last)

Every root is kept; of targets and snapshot, the newest two versions, and of target
files those they list (`UpdateRepository.prune`, after each publish and re-sign):
the newest of each lineage and what the publish before listed, however many were
pushed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api.metadata import TargetFile

from fedge.update import tuf_repo
from fedge.update.files import (
    ed25519_public_bytes,
    load_ed25519,
    save_ed25519,
    write_atomic,
    write_json,
)
from fedge.update.messages import (
    ERROR_BAD_REQUEST,
    ERROR_NOT_FOUND,
    MAX_CHUNK,
    UpdateFetchReply,
    UpdateFetchRequest,
)

# Far beyond any target this relay holds; refused before they reach seek(2) / open(2).
MAX_FETCH_OFFSET = 1 << 40
MAX_FETCH_PATH = 1024
# A stored target's hash is remembered only for a file last written this long before
# it was hashed (see UpdateRepository._stored_state).
RACY_NS = 2_000_000_000
# Targets and snapshot metadata versions kept, newest first, with every target file
# they list: an agent that read timestamp.json just before a publish or a re-sign
# then fetches the snapshot, targets and files it names. Older ones no client asks
# for (consistent snapshots: a client fetches only the versions that the newest
# timestamp and snapshot name); every root is kept, for a client that walks the
# chain up from the root it was enrolled with.
KEEP_METADATA_VERSIONS = 2

log = logging.getLogger("fedge.coordinator.updates")


class UpdateRepositoryError(ValueError):
    """A publish was refused; nothing was changed."""


@dataclass
class _Versions:
    root: int
    targets: int
    snapshot: int
    timestamp: int


class UpdateRepository:
    """TUF storage and relay. Create once with `provision`, then open with the class."""

    def __init__(self, state_dir: Path, *, clock: tuf_repo.Clock = tuf_repo.utcnow) -> None:
        """Open a provisioned repository.

        Raises:
            FileNotFoundError: `provision` was never run for this state dir.
            ValueError: a key or the state file is corrupt.
        """
        self.root_dir = Path(state_dir) / "tuf"
        self.clock = clock
        state_file = self.root_dir / "state.json"
        if not state_file.exists():
            raise FileNotFoundError(f"no TUF repository at {self.root_dir}: run provisioning "
                                    "with the console's coordinator-provision.json first")
        self._snapshot_key = load_ed25519(self.root_dir / "keys" / "snapshot.pem")
        self._timestamp_key = load_ed25519(self.root_dir / "keys" / "timestamp.pem")
        try:
            self._v = _Versions(**json.loads(state_file.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"TUF state file {state_file} is corrupt: {exc}") from exc
        # Stored targets whose bytes this process hashed and found to match the signed
        # sha256 (in their hashed name): hashed path -> (size, mtime_ns, inode) then.
        # A publish re-hashes a stored target only when that changed or the console
        # supplies it again, so a push costs its own bytes, not everything stored.
        self._intact: dict[Path, tuple[int, int, int]] = {}

    # -- provisioning ------------------------------------------------------------------
    @classmethod
    def provision(
        cls,
        state_dir: Path,
        *,
        root: bytes,
        targets: bytes,
        snapshot_key: Ed25519PrivateKey,
        timestamp_key: Ed25519PrivateKey,
        clock: tuf_repo.Clock = tuf_repo.utcnow,
    ) -> UpdateRepository:
        """Install the console's root and first targets and the online keys.

        Raises:
            UpdateRepositoryError: root is not self-signed, targets not signed by
                root's targets key, the online keys are not those named in root, or
                root or targets is already expired by `clock` (the message names the
                expiry and this coordinator's clock; nothing is written then).
        """
        root_md = _load_or_refuse(root, "root")
        _verify_or_refuse(root_md, "root", root_md)
        targets_md = _load_or_refuse(targets, "targets")
        _verify_or_refuse(root_md, "targets", targets_md)
        now = clock()
        for md in (root_md, targets_md):
            if md.signed.is_expired(now):
                raise UpdateRepositoryError(_expired_at_provision(md, now))
        for role, key in (("snapshot", snapshot_key), ("timestamp", timestamp_key)):
            keyid = tuf_repo.signer(key).public_key.keyid
            if keyid not in root_md.signed.roles[role].keyids:
                raise UpdateRepositoryError(f"the {role} key given ({keyid[:12]}…) is not "
                                            f"the {role} key named in root")
        base = Path(state_dir) / "tuf"
        save_ed25519(base / "keys" / "snapshot.pem", snapshot_key)
        save_ed25519(base / "keys" / "timestamp.pem", timestamp_key)
        meta = base / "metadata"
        write_atomic(meta / f"{root_md.signed.version}.root.json", root, mode=0o644)
        write_atomic(meta / f"{targets_md.signed.version}.targets.json", targets, mode=0o644)
        v = _Versions(root_md.signed.version, targets_md.signed.version, 0, 0)
        cls._sign_online(base, snapshot_key, timestamp_key, v, now)
        _check_clock(root_md, targets_md, now)
        return cls(state_dir, clock=clock)

    @classmethod
    def from_provision(cls, state_dir: Path, provision: Mapping[str, Any], *,
                       clock: tuf_repo.Clock = tuf_repo.utcnow) -> UpdateRepository:
        """Open the repository, provisioning it first from the console's
        coordinator-provision.json contents if this state dir has none.

        Raises:
            UpdateRepositoryError: the provision data lacks a TUF field or does not verify.
            ValueError: an existing repository is corrupt.
        """
        if (Path(state_dir) / "tuf" / "state.json").exists():
            return cls(state_dir, clock=clock)
        try:
            keys = {role: serialization.load_pem_private_key(
                        base64.b64decode(provision["tuf_online_keys"][role]), password=None)
                    for role in ("snapshot", "timestamp")}
            root = str(provision["tuf_root"]).encode()
            targets = str(provision["tuf_targets"]).encode()
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRepositoryError(f"provision data lacks a usable TUF field: {exc}") \
                from exc
        for role, key in keys.items():
            if not isinstance(key, Ed25519PrivateKey):
                raise UpdateRepositoryError(f"provision {role} key is not Ed25519")
        return cls.provision(state_dir, root=root, targets=targets,
                             snapshot_key=keys["snapshot"], timestamp_key=keys["timestamp"],
                             clock=clock)

    # -- publishing --------------------------------------------------------------------
    def publish(
        self,
        targets: bytes,
        files: Mapping[str, bytes],
        *,
        root: bytes | None = None,
    ) -> int:
        """Accept new console-signed targets (and optionally a rotated root).

        `files` maps TUF target path → bytes for each target not already stored
        intact: a stored file that no longer matches its signed hash is rewritten
        from `files` (a corrupt one not supplied is logged and left for a re-push).
        Returns the new snapshot version.

        Raises:
            UpdateRepositoryError: bad signature, version not increasing, expired
                metadata (root included: named with its date), or a target file
                missing or not matching its hash.
        """
        if self.holds(targets, root):  # sent again (the console lost our reply)
            return self._v.snapshot
        if root is not None and self.holds(None, root):
            root = None  # the root in force, sent again (a renewal the console never stored)
        now = self.clock()
        root_md = self.current_root()
        new_root_bytes = None
        if root is not None:
            new_root = _load_or_refuse(root, "root")
            if new_root.signed.version != root_md.signed.version + 1:
                raise UpdateRepositoryError(
                    f"root version {new_root.signed.version} must be "
                    f"{root_md.signed.version + 1}")
            _verify_or_refuse(root_md, "root", new_root)
            _verify_or_refuse(new_root, "root", new_root)
            root_md, new_root_bytes = new_root, root
        if root_md.signed.is_expired(now):
            raise UpdateRepositoryError(
                f"root metadata v{root_md.signed.version} expired at "
                f"{root_md.signed.expires.isoformat()} by this coordinator's clock, which "
                f"reads {_stamp(now)}: appliances refuse every update under it; renew it "
                "(`fedge console push` sends a renewed root once it expires within 30 days "
                "by the console's clock, as do `fedge console rotate-keys` and "
                "rotate-online-keys); if it was not renewed, the console's clock may be slow, "
                "or this coordinator's fast: fix the wrong one (NTP/RTC) and push again")
        targets_md = _load_or_refuse(targets, "targets")
        _verify_or_refuse(root_md, "targets", targets_md)
        if targets_md.signed.version <= self._v.targets:
            raise UpdateRepositoryError(
                f"targets version {targets_md.signed.version} is not newer than the "
                f"published version {self._v.targets} (rollback refused)")
        if targets_md.signed.is_expired(now):
            raise UpdateRepositoryError(
                f"targets metadata v{targets_md.signed.version} expired at "
                f"{targets_md.signed.expires.isoformat()} by this coordinator's clock, which "
                f"reads {_stamp(now)}; the console signs targets for "
                f"{tuf_repo.EXPIRY['targets'].days} days from its own clock, so it signed "
                f"these at about {_signed_at(targets_md)}: the console's clock is slow or "
                "this coordinator's is fast; fix the wrong one (NTP/RTC) and push again")
        to_write: dict[Path, bytes] = {}
        for tf in targets_md.signed.targets.values():
            try:
                tuf_repo.TargetSpec.from_target_file(tf)
            except ValueError as exc:
                raise UpdateRepositoryError(str(exc)) from exc
            dest = self.root_dir / "targets" / tuf_repo.hashed_path(tf)
            data = files.get(tf.path)
            # a target sent again is checked byte for byte: pushing it repairs it
            stored = self._stored_state(dest, tf, recheck=data is not None)
            if stored == "ok":
                continue
            if data is None and stored == "corrupt":
                # agents refuse it by its hash; pushing the file again repairs it
                log.error("stored target %s does not match its signed length/sha256; "
                          "push it again to replace it", tf.path)
                continue
            if data is None:
                raise UpdateRepositoryError(f"target {tf.path!r} is listed but its file was "
                                            "not supplied")
            digest = hashlib.sha256(data).hexdigest()
            if len(data) != tf.length or digest != tf.hashes.get("sha256"):
                raise UpdateRepositoryError(
                    f"target {tf.path!r}: supplied file (length {len(data)}, sha256 "
                    f"{digest[:12]}…) does not match its metadata (length {tf.length})")
            to_write[dest] = data
        for dest, data in to_write.items():
            write_atomic(dest, data, mode=0o644)
        meta = self.root_dir / "metadata"
        if new_root_bytes is not None:
            write_atomic(meta / f"{root_md.signed.version}.root.json", new_root_bytes,
                         mode=0o644)
        write_atomic(meta / f"{targets_md.signed.version}.targets.json", targets, mode=0o644)
        v = _Versions(root_md.signed.version, targets_md.signed.version, self._v.snapshot,
                      self._v.timestamp)
        self._v = self._sign_online(self.root_dir, self._snapshot_key, self._timestamp_key,
                                    v, now)
        _check_clock(root_md, targets_md, now)
        self.prune()
        return self._v.snapshot

    def rotate_online_keys(self, root: bytes, snapshot_key: Ed25519PrivateKey,
                           timestamp_key: Ed25519PrivateKey) -> None:
        """Adopt root version N+1 (signed by the console's root key) that names new
        online keys, and re-sign snapshot and timestamp with them at once.

        Raises:
            UpdateRepositoryError: the root is not the next version, is not signed by
                the current root key and by itself, or does not name these keys.
        """
        if self.holds(None, root) and all(
                ed25519_public_bytes(a) == ed25519_public_bytes(b)
                for a, b in ((snapshot_key, self._snapshot_key),
                             (timestamp_key, self._timestamp_key))):
            return  # sent again (the console lost our reply): already in force
        current = self.current_root()
        new_root = _load_or_refuse(root, "root")
        if new_root.signed.version != current.signed.version + 1:
            raise UpdateRepositoryError(f"root version {new_root.signed.version} must be "
                                        f"{current.signed.version + 1}")
        _verify_or_refuse(current, "root", new_root)
        _verify_or_refuse(new_root, "root", new_root)
        for role, key in (("snapshot", snapshot_key), ("timestamp", timestamp_key)):
            if tuf_repo.signer(key).public_key.keyid not in new_root.signed.roles[role].keyids:
                raise UpdateRepositoryError(f"the new {role} key is not the one root "
                                            f"v{new_root.signed.version} names")
        save_ed25519(self.root_dir / "keys" / "snapshot.pem", snapshot_key)
        save_ed25519(self.root_dir / "keys" / "timestamp.pem", timestamp_key)
        write_atomic(self.root_dir / "metadata" / f"{new_root.signed.version}.root.json", root,
                     mode=0o644)
        self._snapshot_key, self._timestamp_key = snapshot_key, timestamp_key
        v = _Versions(new_root.signed.version, self._v.targets, self._v.snapshot,
                      self._v.timestamp)
        self._v = self._sign_online(self.root_dir, snapshot_key, timestamp_key, v,
                                    self.clock())
        self.prune()

    def refresh_timestamp(self, now: datetime | None = None) -> bool:
        """Re-sign snapshot/timestamp when past half their lifetime. Returns True if it did.

        Having re-signed, logs an error naming this coordinator's clock when the root
        or targets it relays is expired by it, or when the timestamp it signed expires
        before the console's clock read when it signed the targets (`_check_clock`):
        appliances refuse every update then, and a wrong clock is the likely cause."""
        now = now or self.clock()
        ts = tuf_repo.load((self.root_dir / "metadata" / "timestamp.json").read_bytes(),
                           "timestamp")
        snap = tuf_repo.load(
            (self.root_dir / "metadata" / f"{self._v.snapshot}.snapshot.json").read_bytes(),
            "snapshot")
        if (ts.signed.expires - now > tuf_repo.EXPIRY["timestamp"] / 2
                and snap.signed.expires - now > tuf_repo.EXPIRY["snapshot"] / 2):
            return False
        self._v = self._sign_online(self.root_dir, self._snapshot_key, self._timestamp_key,
                                    self._v, now)
        _check_clock(self.current_root(), self.current_targets(), now)
        self.prune()
        return True

    @staticmethod
    def _sign_online(base: Path, snapshot_key: Ed25519PrivateKey,
                     timestamp_key: Ed25519PrivateKey, v: _Versions, now: datetime) -> _Versions:
        """Sign snapshot and timestamp to expire `tuf_repo.EXPIRY` after `now` (this
        coordinator's clock: always in its future; whether it is in the appliances' is
        what `_check_clock` looks at) and record the versions."""
        meta = base / "metadata"
        snap_version, ts_version = v.snapshot + 1, v.timestamp + 1
        snap = tuf_repo.to_bytes(tuf_repo.create_snapshot(
            snapshot_key, targets_version=v.targets, version=snap_version, now=now))
        ts = tuf_repo.to_bytes(tuf_repo.create_timestamp(
            timestamp_key, snap, snapshot_version=snap_version, version=ts_version, now=now))
        write_atomic(meta / f"{snap_version}.snapshot.json", snap, mode=0o644)
        write_atomic(meta / "timestamp.json", ts, mode=0o644)
        nv = _Versions(v.root, v.targets, snap_version, ts_version)
        write_json(base / "state.json", nv.__dict__, mode=0o644)
        return nv

    def _stored_state(self, dest: Path, tf: TargetFile, *, recheck: bool) -> str:
        """Whether the stored copy of `tf` is "missing", "ok", or "corrupt" (its length
        or sha256 differ from the signed ones, or it cannot be read).

        Its bytes are hashed only if this process has not hashed them since they last
        changed (size, mtime or inode), or if `recheck`. File times are coarse (a
        kernel tick), so, as git does with its index, a file is remembered only once
        its mtime is `RACY_NS` older than the hash: a write within the same tick as
        an earlier one cannot then go unseen. A file altered in place with its size
        and mtime kept by hand is found by the agents' own check (they verify every
        length and hash), and repaired by pushing it again.
        """
        try:
            key = _stat_key(dest)
            if key[0] != tf.length:
                self._intact.pop(dest, None)
                return "corrupt"
            if not recheck and self._intact.get(dest) == key:
                return "ok"
            started = time.time_ns()
            ok = _sha256_file(dest) == tf.hashes.get("sha256")
        except FileNotFoundError:
            self._intact.pop(dest, None)
            return "missing"
        except OSError:
            self._intact.pop(dest, None)
            return "corrupt"
        if ok:
            if key[1] < started - RACY_NS:
                self._intact[dest] = key
            return "ok"
        self._intact.pop(dest, None)
        return "corrupt"

    def prune(self) -> int:
        """Delete what no agent can still ask for, once the current versions are
        published (state.json written): targets and snapshot metadata older than the
        newest `KEEP_METADATA_VERSIONS` of each, and every target file that none of
        the kept targets versions lists (the console lists only the newest version of
        each lineage, so a replaced one goes at the publish after the one that
        replaced it). Roots and the timestamp are kept. A crash midway leaves files
        for the next prune.
        Returns the bytes freed; a file that cannot be removed is logged and left.
        """
        meta = self.root_dir / "metadata"
        freed = 0
        kept_targets: list[int] = []
        for role, current in (("targets", self._v.targets), ("snapshot", self._v.snapshot)):
            versions = sorted(v for v in (_numbered(p, role) for p in meta.iterdir())
                              if v is not None and v <= current)
            keep = versions[-KEEP_METADATA_VERSIONS:]
            if role == "targets":
                kept_targets = keep
            for version in versions[:-KEEP_METADATA_VERSIONS]:
                freed += _remove(meta / f"{version}.{role}.json")
        listed: set[Path] = set()
        for version in kept_targets:
            try:
                md = tuf_repo.load((meta / f"{version}.targets.json").read_bytes(), "targets")
            except (OSError, ValueError) as exc:
                log.error("not pruning target files: targets v%d cannot be read (%s)",
                          version, exc)
                return freed
            listed.update(self.root_dir / "targets" / tuf_repo.hashed_path(tf)
                          for tf in md.signed.targets.values())
        base = self.root_dir / "targets"
        for path in sorted(base.rglob("*"), reverse=True):  # files before their folders
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):  # not empty: kept
                    path.rmdir()
            elif path not in listed:
                self._intact.pop(path, None)
                freed += _remove(path)
        if freed:
            log.info("update relay: %d bytes of replaced metadata and targets removed", freed)
        return freed

    # -- reading -----------------------------------------------------------------------
    def current_root(self) -> tuf_repo.Metadata:
        return tuf_repo.load(
            (self.root_dir / "metadata" / f"{self._v.root}.root.json").read_bytes(), "root")

    def current_targets(self) -> tuf_repo.Metadata:
        return tuf_repo.load(
            (self.root_dir / "metadata" / f"{self._v.targets}.targets.json").read_bytes(),
            "targets")

    def holds(self, targets: bytes | None, root: bytes | None = None) -> bool:
        """Whether these exact documents are the current ones (a repeated publish or
        rotation, byte for byte, changes nothing and is answered as done). None: not
        compared; both None is False."""
        if targets is None and root is None:
            return False
        meta = self.root_dir / "metadata"
        return ((targets is None
                 or (meta / f"{self._v.targets}.targets.json").read_bytes() == targets)
                and (root is None or (meta / f"{self._v.root}.root.json").read_bytes() == root))

    @property
    def versions(self) -> dict[str, int]:
        return dict(self._v.__dict__)

    def handle_fetch(self, req: UpdateFetchRequest) -> UpdateFetchReply:
        """Answer one chunked fetch. Never raises on bad input: the reply names the error
        (a hostile appliance's NUL, huge offset or over-long name is a bad request)."""
        path = req.path if isinstance(req.path, str) else ""
        if (type(req.offset) is not int or type(req.length) is not int
                or not 0 <= req.offset <= MAX_FETCH_OFFSET
                or not 0 < req.length <= MAX_FETCH_OFFSET):
            return UpdateFetchReply(path, 0, b"", True,
                                    f"{ERROR_BAD_REQUEST}: offset {req.offset!r} must be "
                                    f"0..{MAX_FETCH_OFFSET} and length {req.length!r} "
                                    f"1..{MAX_FETCH_OFFSET}")
        if "\x00" in path or len(path) > MAX_FETCH_PATH:
            return UpdateFetchReply(path[:MAX_FETCH_PATH], req.offset, b"", True,
                                    f"{ERROR_BAD_REQUEST}: path must hold no NUL and at most "
                                    f"{MAX_FETCH_PATH} characters (has {len(path)})")
        parts = path.split("/")
        if (len(parts) < 2 or parts[0] not in ("metadata", "targets")
                or any(p in ("", ".", "..") for p in parts) or "\\" in path):
            return UpdateFetchReply(path, req.offset, b"", True,
                                    f"{ERROR_BAD_REQUEST}: path {path!r} is not a "
                                    "metadata/ or targets/ path")
        file = self.root_dir.joinpath(*parts)
        try:
            with open(file, "rb") as f:
                f.seek(req.offset)
                data = f.read(min(req.length, MAX_CHUNK))
                eof = f.read(1) == b""
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return UpdateFetchReply(path, req.offset, b"", True, ERROR_NOT_FOUND)
        except (OSError, ValueError, OverflowError) as exc:  # ENAMETOOLONG, EACCES, ...
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return UpdateFetchReply(path, req.offset, b"", True,
                                    f"{ERROR_BAD_REQUEST}: path {path!r} cannot be read: "
                                    f"{why}")
        return UpdateFetchReply(path, req.offset, data, eof, "")


def _stamp(now: datetime) -> str:
    return now.replace(microsecond=0).isoformat()


def _signed_at(md: tuf_repo.Metadata) -> str:
    """When the console signed targets metadata `md`, by its clock: its expiry less the
    lifetime it signs targets for."""
    return (md.signed.expires - tuf_repo.EXPIRY["targets"]).isoformat()


def _expired_at_provision(md: tuf_repo.Metadata, now: datetime) -> str:
    role = md.signed.type
    lifetime = ("a year" if role == "root"
                else f"{tuf_repo.EXPIRY['targets'].days} days")
    return (f"{role} metadata v{md.signed.version} from the console expired at "
            f"{md.signed.expires.isoformat()} by this coordinator's clock, which reads "
            f"{_stamp(now)}: appliances would refuse every update under it. `fedge console "
            f"init` signs {role} for {lifetime} from the console's clock, so either the "
            "console's clock was slow when it ran (fix it, NTP/RTC, and run `fedge console "
            "init` again before any appliance is enrolled) or this coordinator's clock is "
            "fast (fix it and start the coordinator again); nothing was provisioned")


def _check_clock(root: tuf_repo.Metadata, targets: tuf_repo.Metadata, now: datetime) -> None:
    """Log an error naming this coordinator's clock when what it just signed cannot
    serve: the root or targets it relays is expired by its clock, or the timestamp it
    signed (expiring `EXPIRY["timestamp"]` after `now`) expires before the console's
    clock read when it signed the targets: this clock is slow, or the console's fast,
    and an appliance that keeps the console's time refuses the timestamp as expired."""
    for md in (root, targets):
        if md.signed.is_expired(now):
            log.error("%s metadata v%d that this coordinator relays expired at %s by its "
                      "clock, which reads %s: appliances refuse every update; if this clock "
                      "is fast, fix it (NTP/RTC); else the console must renew it (a push)",
                      md.signed.type, md.signed.version, md.signed.expires.isoformat(),
                      _stamp(now))
    timestamp_expires = now + tuf_repo.EXPIRY["timestamp"]
    console_signed = targets.signed.expires - tuf_repo.EXPIRY["targets"]
    if console_signed >= timestamp_expires:
        log.error("this coordinator's clock reads %s, but the console signed targets v%d at "
                  "about %s by its clock: the timestamp signed now expires at %s, already "
                  "past for an appliance that keeps the console's time, which then refuses "
                  "every update as expired. This clock is slow or the console's is fast: fix "
                  "the wrong one (NTP/RTC); the timestamp is re-signed from the fixed clock",
                  _stamp(now), targets.signed.version, console_signed.isoformat(),
                  _stamp(timestamp_expires))


def _numbered(path: Path, role: str) -> int | None:
    """N for a file named N.<role>.json, else None."""
    number, sep, rest = path.name.partition(".")
    return int(number) if sep and rest == f"{role}.json" and number.isdigit() else None


def _remove(path: Path) -> int:
    """Delete `path`; returns its size, 0 if it was gone or could not be removed."""
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.error("cannot remove %s: %s", path, exc)
        return 0
    return size


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _sha256_file(path: Path) -> str:
    """Raises: OSError if `path` cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_or_refuse(data: bytes, role: str) -> tuf_repo.Metadata:
    try:
        return tuf_repo.load(data, role)
    except ValueError as exc:
        raise UpdateRepositoryError(str(exc)) from exc


def _verify_or_refuse(root: tuf_repo.Metadata, role: str, md: tuf_repo.Metadata) -> None:
    try:
        tuf_repo.verify_by(root, role, md)
    except ValueError as exc:
        raise UpdateRepositoryError(str(exc)) from exc
