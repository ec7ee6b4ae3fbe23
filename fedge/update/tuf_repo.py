"""TUF metadata for fedge's signed updates, on top of python-tuf.

Who signs what:

- root and targets: the console, offline (keys never leave its store);
- snapshot and timestamp: the coordinator, online; it re-signs both whenever
  the console publishes new targets, and the timestamp before it expires.

Targets carry their fedge meaning in ``custom["fedge"]``:
``{"kind": "software"|"app"|"model", "name": str, "version": "dotted ints"}``;
their TUF path is ``<kind>/<name>/<version>/<filename>``. Consistent snapshots
are on, so files are stored and fetched under their hash-prefixed names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

TARGET_KINDS: tuple[str, ...] = ("software", "app", "model")
# The one software lineage: the appliance runs one fedge, so every software target
# is a version of it, whatever it is named (the console signs only this name).
SOFTWARE_NAME = "fedge"
ROLE_NAMES: tuple[str, ...] = ("root", "targets", "snapshot", "timestamp")
EXPIRY: Mapping[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
# Matched whole (fullmatch) and ASCII only: an anchored re.match let a trailing newline
# into a signed path, and \d let Arabic-Indic digits into a version every appliance
# then refuses.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_VERSION = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,3}")
_SERIALIZER = JSONSerializer(compact=False)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _expiry(now: datetime, role: str) -> datetime:
    # TUF stores expiry to the second; drop microseconds so re-parsed == signed.
    return (now + EXPIRY[role]).replace(microsecond=0)


def signer(key: Ed25519PrivateKey) -> CryptoSigner:
    return CryptoSigner(key)


def version_key(version: str) -> tuple[int, ...]:
    """Order target versions ("3", "1.2.0") as PEP 440 orders them (the agent's
    `fedge.agent.updates.release_version`, and software slots): trailing zeros do not
    count, so "1.2" and "1.2.0" are the same version.

    Raises:
        ValueError: not 1-4 dot-separated integers (names the value).
    """
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise ValueError(f"target version {version!r} must be 1-4 dot-separated integers "
                         "of ASCII digits 0-9, e.g. '3' or '1.2.0'")
    key = [int(p) for p in version.split(".")]
    while len(key) > 1 and key[-1] == 0:
        key.pop()
    return tuple(key)


def is_version(name: str) -> bool:
    """Whether ``name`` is a target version (`version_key` takes it): a software slot's,
    a model's or an app's version folder; a hidden temporary or a link's name is not."""
    try:
        version_key(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TargetSpec:
    """One verified target, as fedge reads it."""

    kind: str
    name: str
    version: str
    path: str
    length: int
    sha256: str

    @classmethod
    def from_target_file(cls, tf: TargetFile) -> TargetSpec:
        """Raises: ValueError if the target lacks valid fedge custom fields."""
        custom = (tf.custom or {}).get("fedge") if isinstance(tf.custom, dict) else None
        if not isinstance(custom, dict):
            raise ValueError(f"target {tf.path!r} has no custom['fedge'] description")
        kind, name, version = custom.get("kind"), custom.get("name"), custom.get("version")
        check_target_fields(kind, name, version)
        return cls(kind, name, version, tf.path, tf.length, tf.hashes.get("sha256", ""))


def check_target_fields(kind: object, name: object, version: object) -> None:
    """Raises: ValueError naming the field, its value and the rule."""
    if kind not in TARGET_KINDS:
        raise ValueError(f"target kind {kind!r} must be one of {', '.join(TARGET_KINDS)}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"target name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . -, "
                         "starting with a letter or digit")
    version_key(version)  # type: ignore[arg-type]


def lineage(kind: str, name: str) -> tuple[str, str]:
    """Versions of one lineage replace each other: (kind, name), except that all
    software is one lineage (the appliance runs one fedge). The console signs only the
    newest target of each; the appliance installs only the newest signed of each."""
    return (kind, SOFTWARE_NAME if kind == "software" else name)


def newest_per_lineage(specs: Iterable[TargetSpec]) -> dict[tuple[str, str], TargetSpec]:
    """The newest target of each lineage among ``specs`` (``version_key`` order, PEP
    440's for these versions): what the console signs, and all the appliance installs."""
    newest: dict[tuple[str, str], TargetSpec] = {}
    for spec in specs:
        key = lineage(spec.kind, spec.name)
        if key not in newest or version_key(spec.version) > version_key(newest[key].version):
            newest[key] = spec
    return newest


def target_path(kind: str, name: str, version: str, filename: str) -> str:
    """The TUF path of a target. Raises: ValueError for a bad field or file name."""
    check_target_fields(kind, name, version)
    if not _NAME.fullmatch(filename):
        raise ValueError(f"target file name {filename!r} must be 1-64 characters of "
                         "A-Z a-z 0-9 _ . -")
    return f"{kind}/{name}/{version}/{filename}"


def hashed_path(tf: TargetFile) -> str:
    """Where a consistent-snapshot client fetches `tf` (under targets/)."""
    dirname, sep, basename = tf.path.rpartition("/")
    return f"{dirname}{sep}{tf.hashes['sha256']}.{basename}"


def create_root(
    root_key: Ed25519PrivateKey,
    targets_key: Ed25519PrivateKey,
    snapshot_key_public: CryptoSigner | Ed25519PrivateKey,
    timestamp_key_public: CryptoSigner | Ed25519PrivateKey,
    *,
    now: datetime,
    version: int = 1,
) -> Metadata[Root]:
    """Root metadata naming one key per role, threshold 1, signed by `root_key`."""
    root = Root(version=version, expires=_expiry(now, "root"), consistent_snapshot=True)
    for role, key in (
        ("root", root_key),
        ("targets", targets_key),
        ("snapshot", snapshot_key_public),
        ("timestamp", timestamp_key_public),
    ):
        s = key if isinstance(key, CryptoSigner) else signer(key)
        root.add_key(s.public_key, role)
    md = Metadata(root)
    md.sign(signer(root_key))
    return md


def create_targets(
    targets_key: Ed25519PrivateKey,
    files: Mapping[str, TargetFile],
    *,
    version: int,
    now: datetime,
) -> Metadata[Targets]:
    targets = Targets(version=version, expires=_expiry(now, "targets"))
    targets.targets = dict(files)
    md = Metadata(targets)
    md.sign(signer(targets_key))
    return md


def new_target_file(kind: str, name: str, version: str, filename: str, data: bytes) -> TargetFile:
    """Describe `data` as a fedge target. Raises: ValueError for a bad field."""
    tf = TargetFile.from_data(target_path(kind, name, version, filename), data, ["sha256"])
    tf.unrecognized_fields["custom"] = {"fedge": {"kind": kind, "name": name, "version": version}}
    return tf


def create_snapshot(
    snapshot_key: Ed25519PrivateKey, *, targets_version: int, version: int, now: datetime
) -> Metadata[Snapshot]:
    snap = Snapshot(version=version, expires=_expiry(now, "snapshot"))
    snap.meta = {"targets.json": MetaFile(version=targets_version)}
    md = Metadata(snap)
    md.sign(signer(snapshot_key))
    return md


def create_timestamp(
    timestamp_key: Ed25519PrivateKey, snapshot_bytes: bytes, *, snapshot_version: int,
    version: int, now: datetime,
) -> Metadata[Timestamp]:
    ts = Timestamp(version=version, expires=_expiry(now, "timestamp"))
    ts.snapshot_meta = MetaFile.from_data(snapshot_version, snapshot_bytes, ["sha256"])
    md = Metadata(ts)
    md.sign(signer(timestamp_key))
    return md


def to_bytes(md: Metadata) -> bytes:
    return md.to_bytes(_SERIALIZER)


def load(data: bytes, role: str) -> Metadata:
    """Parse metadata of `role`.

    Raises:
        ValueError: not TUF metadata, or of another role (names both).
    """
    try:
        md = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises DeserializationError and friends
        raise ValueError(f"{role} metadata does not parse: {exc}") from exc
    if md.signed.type != role:
        raise ValueError(f"expected {role} metadata, got {md.signed.type}")
    return md


def verify_by(root: Metadata[Root], role: str, md: Metadata) -> None:
    """Check that `md` carries a threshold of `role` signatures under `root`.

    Raises:
        ValueError: the signatures do not verify (names the role).
    """
    try:
        root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
    except RepositoryError as exc:
        raise ValueError(f"{role} metadata is not signed by the {role} key in root "
                         f"v{root.signed.version}: {exc}") from exc


def role_keys(root: Metadata[Root]) -> dict[str, Role]:
    return dict(root.signed.roles)
