"""A/B install for software updates: versioned slot directories, an atomic
symlink switch, a restart and a health check, and rollback by itself.

Layout under the slot root (e.g. ``/var/lib/fedge/software``)::

    slots/<version>/          one unpacked bundle per version
    current -> slots/<v>      what the service runs (switched with rename(2))
    previous -> slots/<v0>    where a failed update goes back to
    pending.json, outcome.json  a self-update on trial, and how the last one ended

Once a switch is confirmed (`SelfUpdate.confirm`, or a healthy
`SlotInstaller.install_and_switch`), `SlotInstaller.prune` removes every other
slot: ``current``, ``previous`` and the versions the state files name are all an
appliance can run or go back to, and a slot may be a whole venv (~1.4 GB).

Health, as systemd sees it: the new version must send ``READY=1`` over
``NOTIFY_SOCKET`` within the deadline and then a good heartbeat
(``WATCHDOG=1``) while still running. `NotifyProcessService` runs the slot's
entry point as a child process with a real notify socket (tests, and hosts
without systemd); `SystemdService` drives a systemd unit whose ExecStart runs
``current/``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from fedge.update.files import holding, remove_stale_temps
from fedge.update.tuf_repo import is_version, version_key

log = logging.getLogger("fedge.update.ab")

MANIFEST = "fedge-bundle.json"
FORMAT = 1  # of the manifest's files table (firmware/make_bundle.py writes it)
MAX_MANIFEST_BYTES = 64 << 20  # read into memory to check a bundle before unpacking it
# An archive member's name, at most: Linux's PATH_MAX and NAME_MAX. tarfile's "data"
# filter before CPython 3.11.13/3.12.11 is bypassed with names near PATH_MAX
# (CVE-2025-4517); the links it needs are refused anyway (`check_members`).
MAX_MEMBER_NAME_BYTES = 4096
MAX_MEMBER_COMPONENT_BYTES = 255


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
# Set by `exec_current` (the unit's ExecStart) to the slot root, whether it runs a
# slot or the packaged install: the agent under it can update itself.
SOFTWARE_ROOT_ENV = "FEDGE_SOFTWARE_ROOT"
SLOT_ENV = "FEDGE_SOFTWARE_SLOT"  # the slot the launcher runs; unset for the packaged install
# Set by `exec_current` to the version on trial when it ran the version before it
# instead, the trial's start not being countable (`SelfUpdate.preflight`'s "deferred"):
# `SelfUpdate.confirm` then leaves the trial for a later start.
DEFERRED_ENV = "FEDGE_SOFTWARE_TRIAL_DEFERRED"
AGENT_CONFIG = "/etc/fedge/agent.toml"  # what a wheel slot runs by default


class UnsafeArchive(ValueError):
    """An archive `check_members` refuses before extracting anything; the message
    names the member and why."""


class SoftwareOnTrial(ValueError):
    """A software update was asked to stage while the running one is still on trial."""


class HealthCheckFailed(RuntimeError):
    """The new version did not become healthy. `rolled_back` says whether the
    previous slot is running again."""

    def __init__(self, message: str, *, rolled_back: bool) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back


class Service(Protocol):
    def restart(self, slot: Path) -> None: ...
    def wait_healthy(self, deadline_s: float) -> None: ...
    def stop(self) -> None: ...


# `SlotInstaller.unpack`'s temporary slot: ".<version>.<mkdtemp's 8 random characters>",
# and a slot `SlotInstaller.prune` is removing (renamed to the same shape first).
SLOT_TEMP_NAME = re.compile(r"\.[0-9][0-9.]*\.[a-z0-9_]{8}")
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # mkdtemp's, so the sweep matches

PENDING = "pending.json"  # `SelfUpdate`: the version on trial and the one before it
OUTCOME = "outcome.json"  # `SelfUpdate`: the last update's result, not yet reported
LOCK = ".lock"  # `SlotInstaller.lock`: one change to the slot root at a time
# `SelfUpdate.preflight`'s default (the agent unit passes no --max-attempts): starts
# of an unconfirmed slot; the start after them rolls it back. So a broken slot needs
# TRIAL_STARTS + 1 starts, which the unit's StartLimitBurst must leave room for.
TRIAL_STARTS = 3
# What a state file that cannot be written fails with: a read-only file system (ext4's
# errors=remount-ro), a full disk or quota, files of another user.
UNWRITABLE = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                        errno.EFBIG})


class SlotInstaller:
    """Opening one removes what killed installs left under ``root``: a slot whose
    unpacking never finished (hundreds of MB, under a random name no retry reuses),
    one whose removal by `prune` was cut short, and pending.json or outcome.json
    written half-way; one a live process is still writing is left
    (``fedge.update.files.remove_stale_temps``). Slots, ``current`` and
    ``previous`` are never touched on open: only `prune` removes slots."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.slots = self.root / "slots"
        remove_stale_temps(self.slots, SLOT_TEMP_NAME, directories=True)
        remove_stale_temps(self.root)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the slot root's lock (``flock`` on ``<root>/.lock``): one of stage,
        preflight, confirm, install_and_switch and prune at a time, across threads
        and processes. Not reentrant: a locked method calls the unlocked parts."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def current_version(self) -> str | None:
        return self._link_target("current")

    def previous_version(self) -> str | None:
        return self._link_target("previous")

    def _link_target(self, name: str) -> str | None:
        link = self.root / name
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def unpack(self, version: str, bundle: Path) -> Path:
        """Unpack `bundle` (.tar.gz/.tgz/.tar, .whl, .deb) into slots/<version>.

        A tar archive's members are checked before anything is extracted
        (`check_members`: regular files and directories only; a .deb's data archive
        may also hold relative symlinks that stay inside the slot), and so is a
        manifest's table of files (a bundle from firmware/make_bundle.py) against the
        members; tarfile's "data" filter (no escaping paths or links, no device
        nodes, no setuid/setgid bits) is a second layer. A manifest that lists its
        files' hashes is checked against the unpacked slot (`verify_slot`) before
        the slot is kept.

        Raises:
            ValueError: bad version, unknown bundle type, unsafe or corrupt archive,
                a slot that does not match its manifest's hashes, or `version` is
                the `current` slot (the software running now).
        """
        version_key(version)
        if version == self.current_version():
            raise ValueError(f"version {version} is the current slot under {self.root}: "
                             "refusing to unpack over the running software")
        bundle = Path(bundle)
        dest = self.slots / version
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self._mkdir(self.slots)))
        with holding(tmp):  # until renamed into place or removed
            return self._unpack_into(tmp, version, bundle, dest)

    def _unpack_into(self, tmp: Path, version: str, bundle: Path, dest: Path) -> Path:
        """`unpack`'s work in the temporary slot ``tmp``. Raises: as `unpack`."""
        try:
            name = bundle.name
            if name.endswith((".tar.gz", ".tgz", ".tar")):
                with tarfile.open(bundle) as tar:
                    extract_checked(tar, tmp, bundle=True)
            elif name.endswith(".whl"):
                site = tmp / "site-packages"
                with zipfile.ZipFile(bundle) as zf:
                    for member in zf.namelist():
                        if member.startswith("/") or ".." in Path(member).parts:
                            raise ValueError(f"wheel member {member!r} escapes the slot")
                    zf.extractall(site)
                if not (tmp / MANIFEST).exists():
                    (tmp / MANIFEST).write_text(json.dumps(
                        {"version": version, "exec": ["{python}", "-m", "fedge.cli", "agent",
                                                    "--config", AGENT_CONFIG],
                         "env": {"PYTHONPATH": "site-packages"}}))
            elif name.endswith(".deb"):
                _unpack_deb(bundle, tmp)
            else:
                raise ValueError(f"bundle {name!r}: unknown type (expected .tar.gz, .whl, .deb)")
            verify_slot(tmp)
            # on disk before the slot is named: after a power cut, `current` must not
            # point at a slot of empty or missing files (switch fsyncs only the link)
            self._fsync_tree(tmp)
        except (tarfile.TarError, zipfile.BadZipFile, subprocess.SubprocessError, OSError,
                UnsafeArchive, KeyError) as exc:  # KeyError: tarfile's hardlink to a
            # member not there (refused before extracting now; kept as a second layer)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"bundle {bundle.name!r} cannot be unpacked: {exc}") from exc
        except ValueError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        self._fsync(self.slots)
        return dest

    @classmethod
    def _fsync_tree(cls, top: Path) -> None:
        """fsync every regular file and directory under `top` (symlinks are not
        followed: a link's own entry is in its directory, fsynced). Raises: OSError."""
        for directory, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(directory, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            cls._fsync(Path(directory))

    def switch(self, version: str) -> str | None:
        """Point `current` at slots/<version> atomically; returns the version it replaced.

        Raises: FileNotFoundError if that slot does not exist.
        """
        if not (self.slots / version).is_dir():
            raise FileNotFoundError(f"no slot for version {version} under {self.slots}")
        old = self.current_version()
        if old is not None and old != version:
            self._set_link("previous", old)
        self._set_link("current", version)
        return old

    def unlink_current(self) -> None:
        """Remove `current`: the service runs its packaged install (`exec_current`)."""
        (self.root / "current").unlink(missing_ok=True)
        self._fsync_root()

    def _set_link(self, name: str, version: str) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("slots") / version)
        os.replace(tmp, self.root / name)  # rename(2): the switch is atomic
        self._fsync_root()

    def _fsync_root(self) -> None:
        self._fsync(self.root)

    @staticmethod
    def _fsync(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def install_and_switch(self, version: str, bundle: Path, service: Service, *,
                           deadline_s: float) -> None:
        """Unpack, switch, restart, check health; on failure switch back by itself.
        Healthy, the switch is confirmed and older slots are pruned (`prune`).

        Raises:
            ValueError: the bundle cannot be unpacked (nothing switched).
            HealthCheckFailed: the new version was unhealthy; `rolled_back` tells
                whether the previous version is running and healthy again.
        """
        with self.lock():
            self._install_and_switch(version, bundle, service, deadline_s=deadline_s)

    def _install_and_switch(self, version: str, bundle: Path, service: Service, *,
                            deadline_s: float) -> None:
        self.unpack(version, bundle)
        previous = self.switch(version)
        try:
            service.restart(self.root / "current")
            service.wait_healthy(deadline_s)
        except HealthCheckFailed as exc:
            reason = str(exc)
        else:
            self._prune()  # healthy: the switch is confirmed
            return
        if previous is None or previous == version:
            service.stop()
            raise HealthCheckFailed(f"version {version} unhealthy ({reason}); no previous "
                                    "version to roll back to", rolled_back=False)
        self._set_link("current", previous)
        self._set_link("previous", version)
        try:
            service.restart(self.root / "current")
            service.wait_healthy(deadline_s)
        except HealthCheckFailed as exc2:
            raise HealthCheckFailed(f"version {version} unhealthy ({reason}); rollback to "
                                    f"{previous} also unhealthy ({exc2})",
                                    rolled_back=False) from exc2
        raise HealthCheckFailed(f"version {version} unhealthy ({reason}); rolled back to "
                                f"{previous}", rolled_back=True)

    def prune(self) -> list[str]:
        """Remove every slot but the ones an appliance may run or go back to:
        ``current``, ``previous``, and each version pending.json and outcome.json
        name. Call it once a switch is confirmed; returns the versions removed.

        While a switch is pending (pending.json there, or unreadable) nothing is
        removed. Only real directories with a slot's name (`tuf_repo.is_version`) go, never
        a link or an entry of another name. Each goes in two steps: renamed to a
        temporary name (`SLOT_TEMP_NAME`, held while it is removed), then deleted, so
        that a process killed mid-way leaves a whole slot or a temporary that the
        next open of the installer sweeps, never a slot half deleted under its name.

        Never raises: a slot that cannot be renamed or deleted is logged and left
        (the update it follows is done; the next prune tries again).
        """
        with self.lock():
            return self._prune()

    def _prune(self) -> list[str]:
        keep = self._kept_versions()
        if keep is None:
            return []
        try:
            entries = [e for e in os.scandir(self.slots)
                       if is_version(e.name) and e.name not in keep
                       and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("cannot list software slots in %s to prune them: %s", self.slots, exc)
            return []
        removed = []
        for entry in sorted(entries, key=lambda e: version_key(e.name)):
            if self._remove_slot(entry.name):
                removed.append(entry.name)
        if removed:
            log.info("removed software slot(s) %s; kept %s", ", ".join(removed),
                     ", ".join(sorted(keep, key=version_key)) or "none")
        return removed

    def _kept_versions(self) -> set[str] | None:
        """The slots `prune` keeps, or None while a switch is pending (nothing may go)."""
        keep = {v for v in (self.current_version(), self.previous_version()) if v}
        for name in (PENDING, OUTCOME):
            try:
                doc = json.loads((self.root / name).read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:  # SelfUpdate sets a torn one aside
                log.warning("%s is unreadable (%s): no software slot pruned", name, exc)
                return None
            if name == PENDING:
                log.info("a software switch is pending (%s): no slot pruned", self.root / name)
                return None
            if isinstance(doc, dict):
                keep |= {str(doc[k]) for k in ("version", "previous") if doc.get(k)}
        return keep

    def _remove_slot(self, version: str) -> bool:
        """Rename slots/<version> to a temporary name, then delete it. Returns whether
        it is gone; a failure is logged (what is left is whole, or the sweep's)."""
        import secrets

        slot = self.slots / version
        for _ in range(8):
            suffix = "".join(secrets.choice(_TEMP_CHARS) for _ in range(8))
            tmp = self.slots / f".{version}.{suffix}"
            if not os.path.lexists(tmp):
                break
        try:
            with holding(slot):  # the lock follows the directory through the rename
                os.rename(slot, tmp)
                self._fsync(self.slots)  # renamed before anything in it is deleted
                shutil.rmtree(tmp)
        except FileNotFoundError:  # gone meanwhile
            return not slot.exists()
        except OSError as exc:
            where = tmp if os.path.lexists(tmp) else slot
            log.warning("cannot remove software slot %s (%s); left at %s", version, exc, where)
            return False
        return True

    @staticmethod
    def _mkdir(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        return path


def _unpack_deb(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data archive into `dest` with the same member checks as a
    .tar.gz (`dpkg-deb -x` would keep escaping symlinks and setuid bits).

    Raises: subprocess.SubprocessError (dpkg-deb failed), UnsafeArchive (a member
        `check_members` refuses), tarfile.TarError (refused or corrupt member),
        OSError.
    """
    with tempfile.TemporaryFile(dir=dest.parent) as data:
        done = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=data,
                              stderr=subprocess.PIPE, timeout=120, check=False)
        if done.returncode != 0:
            raise subprocess.SubprocessError(
                f"dpkg-deb --fsys-tarfile exited with {done.returncode}: "
                f"{done.stderr.decode(errors='replace').strip()}")
        data.seek(0)
        with tarfile.open(fileobj=data) as tar:
            extract_checked(tar, dest, bundle=True, symlinks=True)


def extract_checked(tar: tarfile.TarFile, dest: Path, *, bundle: bool = False,
                    symlinks: bool = False) -> None:
    """Extract `tar` into the empty directory `dest` once `check_members` (with
    `symlinks`) accepts every member, and, for a software `bundle`, once the members
    are what its manifest's table of files lists (`_check_listed`); tarfile's "data"
    filter is a second layer. Nothing is written before the checks pass.

    Raises: UnsafeArchive (a member refused), ValueError (a bundle whose members are
        not what its manifest lists, or whose table is not format 1), tarfile.TarError
        (corrupt, or refused by the filter), OSError.
    """
    members = tar.getmembers()
    check_members(members, symlinks=symlinks)
    if bundle:
        _check_listed(tar, members)
    tar.extractall(dest, members=members, filter="data")


def check_members(members: list[tarfile.TarInfo], *, symlinks: bool = False) -> None:
    """Refuse an archive from its member list alone, before anything is extracted,
    whatever the interpreter's tarfile filter would do (the "data" filter of CPython
    before 3.11.13/3.12.11 lets a chain of symlinks write anywhere: CVE-2025-4517).

    Each member must be a regular file or a directory, with a relative name of no
    ``..`` component, at most `MAX_MEMBER_NAME_BYTES` long and each component at most
    `MAX_MEMBER_COMPONENT_BYTES`, and no two members may have the same name (``./a``
    and ``a`` are the same). With `symlinks` (a .deb's data archive: Debian packages
    hold them) a symlink is allowed too if its target is relative and, resolved
    against the link's own directory one component at a time, never leaves the
    archive's root nor passes through another symlink member; and no member lies
    under a symlink member. Hardlinks, devices and FIFOs are always refused.

    Raises: UnsafeArchive naming the first member refused and why.
    """
    allowed = ("regular files, directories and relative symlinks that stay inside"
               if symlinks else "regular files and directories only")
    names: dict[str, tarfile.TarInfo] = {}
    links: dict[str, tarfile.TarInfo] = {}
    for member in members:
        path = _member_path(member)
        if path in names:
            raise UnsafeArchive(f"{member.name!r} appears twice in the archive")
        names[path] = member
        if member.isreg() or member.isdir():
            continue
        if member.issym() and symlinks:
            links[path] = member
            continue
        raise UnsafeArchive(f"{member.name!r} is {_member_kind(member)}: the archive may "
                            f"hold {allowed}")
    for path, member in names.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            under = "/".join(parts[:i])
            if under in links:
                raise UnsafeArchive(f"{member.name!r} lies under the symlink member "
                                    f"{links[under].name!r}")
    for path, member in links.items():
        _check_link(path, member, links)


def _member_path(member: tarfile.TarInfo) -> str:
    """A member's name without ``.`` and empty components ("" for the root itself).

    Raises: UnsafeArchive for a name that is absolute, has a ``..`` component, a NUL,
        or is too long.
    """
    name = member.name
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_MEMBER_NAME_BYTES:
        raise UnsafeArchive(f"{name[:64]!r}... has a name of {size} bytes, more than "
                            f"{MAX_MEMBER_NAME_BYTES}")
    if "\0" in name:
        raise UnsafeArchive(f"{name!r} has a NUL in its name")
    if name.startswith("/"):
        raise UnsafeArchive(f"{name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{name!r} has a '..' component")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_MEMBER_COMPONENT_BYTES:
            raise UnsafeArchive(f"{name[:64]!r}... has a path component longer than "
                                f"{MAX_MEMBER_COMPONENT_BYTES} bytes")
    if not parts and not member.isdir():
        raise UnsafeArchive(f"{name!r} names the archive's root but is not a directory")
    return "/".join(parts)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return f"a hardlink to {member.linkname!r}"
    if member.issym():
        return f"a symlink to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "a device node"
    if member.isfifo():
        return "a FIFO"
    return f"of tar type {member.type!r}"


def _check_link(path: str, member: tarfile.TarInfo, links: dict[str, tarfile.TarInfo]
                ) -> None:
    """`check_members`' rule for one symlink member at `path`: see there.

    Raises: UnsafeArchive naming the link, its target and why.
    """
    target = member.linkname
    what = f"{member.name!r} is a symlink to {target!r}"
    if not target or "\0" in target:
        raise UnsafeArchive(f"{what}, an empty or NUL-holding target")
    if len(target.encode("utf-8", "surrogateescape")) > MAX_MEMBER_NAME_BYTES:
        raise UnsafeArchive(f"{member.name!r} is a symlink whose target is longer than "
                            f"{MAX_MEMBER_NAME_BYTES} bytes")
    if target.startswith("/"):
        raise UnsafeArchive(f"{what}, an absolute path")
    where = path.split("/")[:-1]  # the link's own directory
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not where:
                raise UnsafeArchive(f"{what}, which leaves the archive's root")
            where.pop()
            continue
        where.append(part)
        through = "/".join(where)
        if through in links:
            raise UnsafeArchive(f"{what}, which passes through the symlink member "
                                f"{links[through].name!r} (links to links are refused)")


def _check_listed(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> None:
    """For a bundle whose manifest has a table of files (firmware/make_bundle.py),
    refuse before extracting an archive whose members are not exactly what it lists
    (besides directories and the top-level manifest): `verify_slot`'s rule, whose
    hashes are checked once unpacked. Without a readable manifest or a table there is
    nothing to compare (`verify_slot` passes such a slot too).

    Raises: ValueError naming a member not listed, or a listed file missing or not a
        regular file; as `_files_table`.
    """
    by_path = {_member_path(m): m for m in members}
    top = by_path.get(MANIFEST)
    if top is None or not top.isreg():
        return
    if top.size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{MANIFEST} is {top.size} bytes, more than {MAX_MANIFEST_BYTES}")
    raw = tar.extractfile(top)
    assert raw is not None  # a regular file
    try:
        manifest = json.loads(raw.read())
    except ValueError:
        return  # slot_command names a bad manifest when the slot is started
    files = _files_table(manifest)
    if files is None:
        return
    extra = sorted(p for p, m in by_path.items()
                   if not m.isdir() and p not in files and p != MANIFEST)
    if extra:
        raise ValueError(f"files not listed in {MANIFEST}: {extra[:5]}")
    for rel in sorted(files):
        member = by_path.get(rel)
        if member is None:
            raise ValueError(f"{rel}, listed in {MANIFEST}, is missing from the bundle")
        if not member.isreg():
            raise ValueError(f"{rel}, listed in {MANIFEST}, is {_member_kind(member)}; a "
                             "bundle holds regular files only")


def _files_table(manifest: object) -> dict[str, str] | None:
    """A manifest's table of file hashes, or None when it has none.

    Raises: ValueError for a table that is not format `FORMAT`'s.
    """
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if files is None:
        return None
    assert isinstance(manifest, dict)
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise ValueError(f"{MANIFEST}: format {manifest.get('format')!r} with files of type "
                         f"{type(files).__name__}; expected format 1 and a table of hashes")
    return files


def verify_slot(slot: Path, *, require_manifest: bool = False) -> dict | None:
    """Check an unpacked slot against the sha256 of each file its manifest lists;
    returns the manifest, or None for a slot that has no hashes to check.

    The one slot check: `SlotInstaller.unpack` runs it on every slot, and
    ``firmware/make_bundle.py --verify`` runs it with `require_manifest`.

    Only a manifest with a ``files`` table (format 1, written by
    firmware/make_bundle.py) can be checked; a slot from a .whl, a .deb or a
    hand-made .tar.gz without one passes unchecked (TUF already verified the
    archive's hash) unless `require_manifest`, which refuses it. With a table, the
    slot must be exactly what it lists: each listed file a regular file (not a
    symlink) with that hash, and nothing else in the slot — a symlink or any other
    entry that is not a directory is an extra, and only the top-level
    ``fedge-bundle.json`` is exempt.

    Raises: ValueError naming the file that is missing, altered, a symlink or not
        listed, or (with `require_manifest`) the manifest that is missing or has no
        table of hashes.
    """
    slot = Path(slot)
    try:
        manifest = json.loads((slot / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        if require_manifest:
            raise ValueError(f"bad or missing {MANIFEST}: {exc}") from None
        return None  # slot_command names a bad manifest when the slot is started
    files = _files_table(manifest)
    if files is None:
        if require_manifest:
            raise ValueError(f"{MANIFEST} has no files table: nothing to check the slot "
                             "against (not a bundle from firmware/make_bundle.py)")
        return None
    # First, so that no hash is read through a symlinked directory. The walk does not
    # follow links, and a link to a directory counts as an entry like any other.
    entries = []
    for top, dirs, names in os.walk(slot, followlinks=False):
        here = Path(top).relative_to(slot)
        entries += [(here / n).as_posix() for n in names]
        entries += [(here / d).as_posix() for d in dirs if os.path.islink(os.path.join(top, d))]
    extra = sorted(e for e in entries if e not in files and e != MANIFEST)
    if extra:
        raise ValueError(f"files not listed in {MANIFEST}: {extra[:5]}")
    for rel, digest in sorted(files.items()):
        path = slot / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{rel!r}, listed in {MANIFEST}, is not a path inside the slot")
        if path.is_symlink():
            raise ValueError(f"{rel}, listed in {MANIFEST}, is a symlink; a bundle holds "
                             "regular files only")
        if not path.is_file():
            raise ValueError(f"{rel}, listed in {MANIFEST}, is missing from the bundle")
        if sha256_file(path) != digest:
            raise ValueError(f"{rel} does not match its sha256 in {MANIFEST}")
    return manifest


def slot_command(slot: Path) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment from a slot's fedge-bundle.json.

    Raises: HealthCheckFailed (not rolled back) if the manifest is missing or bad.
    """
    slot = Path(slot).resolve()
    try:
        manifest = json.loads((slot / MANIFEST).read_text())
        argv = [str(a) for a in manifest["exec"]]
        env = {str(k): str(v) for k, v in manifest.get("env", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HealthCheckFailed(f"slot {slot.name}: bad {MANIFEST}: {exc}",
                                rolled_back=False) from exc
    argv = [sys.executable if a == "{python}" else a for a in argv]
    argv = [str(slot / a) if not os.path.isabs(a) and (slot / a).exists() else a for a in argv]
    env = {k: (str(slot / v) if (slot / v).exists() else v) for k, v in env.items()}
    return argv, env


class NotifyProcessService:
    """Run the slot's entry point as a child process with a real sd_notify socket."""

    def __init__(self, *, command: Callable[[Path], tuple[list[str], dict[str, str]]] =
                 slot_command, stop_timeout_s: float = 5.0) -> None:
        self._command = command
        self._stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="fedge-notify-"))
        self._sock_path = self._dir / "notify"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self._sock_path))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def restart(self, slot: Path) -> None:
        self.stop()
        self._drain()
        argv, extra = self._command(slot)
        env = {**os.environ, **extra, "NOTIFY_SOCKET": str(self._sock_path)}
        try:
            self._proc = subprocess.Popen(argv, env=env, cwd=str(Path(slot).resolve()),
                                          stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise HealthCheckFailed(f"cannot start {argv[0]}: {exc}", rolled_back=False) from exc

    def _drain(self) -> None:
        self._sock.setblocking(False)
        try:
            while True:
                self._sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self._sock.setblocking(True)

    def wait_healthy(self, deadline_s: float) -> None:
        """Wait for READY=1 then WATCHDOG=1 from the child within `deadline_s`.

        Raises: HealthCheckFailed naming what was missing.
        """
        end = time.monotonic() + deadline_s
        ready = False
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise HealthCheckFailed(f"service exited with status {code} before "
                                        f"{'a heartbeat' if ready else 'READY=1'}",
                                        rolled_back=False)
            left = end - time.monotonic()
            if left <= 0:
                raise HealthCheckFailed(f"no {'heartbeat' if ready else 'READY=1'} within "
                                        f"{deadline_s:g} s", rolled_back=False)
            self._sock.settimeout(min(left, 0.1))
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode(errors="replace")
                          .splitlines() if "=" in line)
            if fields.get("READY") == "1":
                ready = True
            if ready and fields.get("WATCHDOG") == "1":
                return

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._sock.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class SystemdService:
    """A systemd unit (Type=notify, WatchdogSec set) whose ExecStart runs current/.

    Not exercised by the tests (no systemd as PID 1 there); `NotifyProcessService`
    implements the same READY/heartbeat contract with a real child process.
    """

    def __init__(self, unit: str = "fedge-agent.service") -> None:
        self.unit = unit

    def _show(self) -> dict[str, str]:
        out = subprocess.run(["systemctl", "show", self.unit, "-p", "ActiveState",
                              "-p", "SubState", "-p", "NRestarts"],
                             capture_output=True, text=True, timeout=30, check=False).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def restart(self, slot: Path) -> None:
        # Type=notify: `systemctl restart` returns once READY=1 arrived or start timed out.
        r = subprocess.run(["systemctl", "restart", self.unit], capture_output=True,
                           text=True, timeout=300, check=False)
        if r.returncode != 0:
            raise HealthCheckFailed(f"systemctl restart {self.unit}: {r.stderr.strip()}",
                                    rolled_back=False)
        self._restarts = self._show().get("NRestarts", "0")

    def wait_healthy(self, deadline_s: float) -> None:
        time.sleep(deadline_s)  # let at least one watchdog interval pass
        state = self._show()
        if state.get("ActiveState") != "active" or state.get("NRestarts") != self._restarts:
            raise HealthCheckFailed(f"{self.unit} is {state.get('ActiveState')}/"
                                    f"{state.get('SubState')} after {deadline_s:g} s",
                                    rolled_back=False)

    def stop(self) -> None:
        subprocess.run(["systemctl", "stop", self.unit], capture_output=True, timeout=120,
                       check=False)


class SelfUpdate:
    """A service that updates the software it runs itself (the agent).

    It cannot health-check its own restart, so the check is split in three:

    1. `stage` (old version, running): unpack, write ``pending.json``, switch
       `current`, then the caller asks systemd to restart the unit;
    2. `preflight` (ExecStartPre, before every start, from the stable install):
       counts starts of a pending version; after `max_attempts` starts that never
       confirmed (crashed, no READY, watchdog kill) it switches `current` back;
    3. `confirm` (new version, after READY and a good heartbeat): the update is
       kept and the slots it no longer needs are removed (`SlotInstaller.prune`).
       Whichever version runs next reports the outcome (`take_outcome`).
    """

    def __init__(self, root: Path, *, max_attempts: int = TRIAL_STARTS) -> None:
        """Raises: ValueError if max_attempts < 1."""
        if max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts} must be >= 1")
        self.slots = SlotInstaller(root)
        self.root = Path(root)
        self.max_attempts = max_attempts

    def _read(self, name: str) -> dict[str, object] | None:
        try:
            return json.loads((self.root / name).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # torn or corrupt: treat as absent, keep a copy for people
            from fedge.update.files import set_aside

            aside = set_aside(self.root / name, log)
            log.error("%s is unreadable (%s); moved to %s", self.root / name, exc, aside.name)
            return None

    def _write(self, name: str, doc: dict[str, object]) -> None:
        from fedge.update.files import write_json

        write_json(self.root / name, doc)

    def pending(self) -> dict[str, object] | None:
        return self._read(PENDING)

    def stage(self, version: str, bundle: Path, *, rollout_id: str = "", path: str = "",
              name: str = "fedge") -> None:
        """Unpack and switch to `version`; the caller then restarts the service.

        ``pending.json`` is written before `current` moves: whatever instant the
        process dies at, a `current` on an unconfirmed slot has its pending record,
        so `preflight` puts it on trial and rolls it back. A record whose switch
        never happened is dropped by the next `preflight`.

        Raises:
            ValueError: a bad bundle (nothing switched).
            OSError: pending.json or the switch could not be written (e.g. a full
                disk); `current` is left where it was and no record stays.
            SoftwareOnTrial: the running slot is itself on trial (not yet confirmed):
                nothing is unpacked; push the version again once it is confirmed.
        """
        with self.slots.lock():
            p = self.pending()
            current = self.slots.current_version()
            if p is not None and p.get("version") == current:
                raise SoftwareOnTrial(
                    f"software {current} is on trial (its start not yet confirmed healthy): "
                    f"staging {version} now would leave nothing to roll back to and drop "
                    f"{current}'s trial; push it again once {current} is confirmed")
            self._stage(version, bundle, rollout_id=rollout_id, path=path, name=name)

    def _stage(self, version: str, bundle: Path, *, rollout_id: str, path: str,
               name: str) -> None:
        self.slots.unpack(version, bundle)
        previous = self.slots.current_version()
        before = self.slots.previous_version()
        self._write(PENDING, {"version": version, "previous": previous, "attempts": 0,
                              "rollout_id": rollout_id, "path": path, "name": name})
        try:
            self.slots.switch(version)
        except BaseException:
            self._undo_switch(version, previous, before)
            raise

    def _undo_switch(self, version: str, current: str | None, previous: str | None) -> None:
        """Put `current` and `previous` back after a failed switch to `version`, then
        drop pending.json, unless `current` still names `version`: then the record
        stays, and preflight tries that slot and rolls it back like any other."""
        for link, want in (("current", current), ("previous", previous)):
            if self.slots._link_target(link) == want:
                continue
            try:
                if want is None:
                    (self.root / link).unlink(missing_ok=True)
                else:
                    self.slots._set_link(link, want)
            except OSError as exc:
                log.error("cannot put %s back to %s after a failed switch: %s", link, want, exc)
        if self.slots.current_version() != version:
            (self.root / PENDING).unlink(missing_ok=True)

    def awaiting(self, rollout_id: str) -> bool:
        """Whether `rollout_id`'s software is staged and its outcome not yet reported
        (pending a restart's confirmation, or decided and waiting for `take_outcome`)."""
        return bool(rollout_id) and any(
            doc is not None and doc.get("rollout_id") == rollout_id
            for doc in (self._read(PENDING), self._read(OUTCOME)))

    def preflight(self) -> str:
        """Run before every start. Returns "none", "trial", "rolled_back" or "deferred".

        Rolling back goes to the previous slot, or, when there is none (the first
        update of a packaged install), removes ``current`` so that `exec_current`
        runs the packaged install again.

        When the slot root cannot be written (`UNWRITABLE`: read-only, full, another
        user's), nothing can be recorded: with no trial pending that is "none" (the
        agent starts, and reports itself not eligible); with a trial pending this
        start cannot be counted, so it must not run the trial's version, or a broken
        one would restart uncounted until systemd gives up. Then "deferred":
        `exec_current` runs the version before it (`fallback_version`), and the trial
        goes on at the first start that can count it.

        Raises: OSError other than `UNWRITABLE` (e.g. EIO); one of those too when the
            pending record itself cannot be read.
        """
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.slots.lock())
            except OSError as exc:
                if exc.errno not in UNWRITABLE:
                    raise
                # unlocked: what cannot be written here cannot change under us either
                return self._cannot_record(exc)
            try:
                return self._preflight()
            except OSError as exc:
                if exc.errno not in UNWRITABLE:
                    raise
                return self._cannot_record(exc)
        raise AssertionError("unreachable")  # pragma: no cover (mypy: ExitStack may swallow)

    def _cannot_record(self, exc: OSError) -> str:
        """`preflight` where ``exc`` (one of `UNWRITABLE`) stopped a write: "none" or
        "deferred", said in one log line. Raises: OSError reading pending.json."""
        why = f"{exc.strerror or exc}: {exc.filename or self.root}"
        p = self.pending()
        if p is None:
            log.info("no software update pending; %s cannot be written (%s): nothing to "
                     "record, the agent starts", self.root, why)
            return "none"
        version, current = str(p.get("version")), self.slots.current_version()
        if current != version:
            log.warning("pending software %s is not the current slot (%s): nothing to try; "
                        "its record stays, as %s cannot be written (%s)", version, current,
                        self.root, why)
            return "none"
        log.error("software %s is on trial, but this start cannot be counted: %s cannot be "
                  "written (%s). The trial's version is not started uncounted: %s runs "
                  "instead, and the trial goes on at the first start after the file system "
                  "can be written again", version, self.root, why,
                  _version_words(fallback_version(self.root, p)))
        return "deferred"

    def _preflight(self) -> str:
        p = self.pending()
        if p is None:
            return "none"
        attempts = int(p.get("attempts", 0)) + 1  # type: ignore[call-overload]
        version = str(p["version"])
        if self.slots.current_version() != version:
            # `stage` died (or failed) before `current` moved, or a roll-back died
            # after moving it back: the pending version is not what starts.
            log.warning("pending software %s is not the current slot (%s): nothing to "
                        "try; pending record dropped", version, self.slots.current_version())
            (self.root / PENDING).unlink()
            return "none"
        if attempts <= self.max_attempts:
            self._write(PENDING, {**p, "attempts": attempts})
            return "trial"
        return self._roll_back(p, f"version {version} did not confirm READY and a "
                                  f"heartbeat in {self.max_attempts} starts")

    def _roll_back(self, p: dict[str, Any], detail: str) -> str:
        """Switch back from the pending slot ``p``: to its previous slot, or (none)
        to the packaged install; the outcome says ``detail`` and where it went."""
        version, previous = str(p["version"]), p.get("previous")
        back = isinstance(previous, str) and (self.slots.slots / previous).is_dir()
        if back:
            detail += f"; rolled back to {previous}"
        else:
            detail += ("; no previous slot, so rolled back to the packaged install "
                       "(`current` removed)")
        # The outcome goes first: a crash after the links moved leaves pending.json
        # for a slot that is no longer current, which the next preflight drops.
        self._write(OUTCOME, {"rollout_id": p.get("rollout_id", ""), "path": p.get("path", ""),
                              "name": p.get("name", "fedge"), "version": version, "ok": False,
                              "rolled_back": True, "detail": detail})
        if back:
            self.slots._set_link("current", str(previous))
            self.slots._set_link("previous", version)
        else:
            self.slots.unlink_current()
        (self.root / PENDING).unlink()
        return "rolled_back"

    def confirm(self) -> bool:
        """The running version is healthy: keep it, and prune the slots neither it nor a
        rollback from it needs (`SlotInstaller.prune`). Returns True if an update was
        pending.

        Under the unit's launcher (``FEDGE_SOFTWARE_ROOT`` set) the pending version is
        confirmed only if it is what runs (``FEDGE_SOFTWARE_SLOT``): when the launcher
        ran the packaged install instead (a .deb upgrade newer than the staged slot
        landed meanwhile), the update is dropped and reported as superseded, never
        marked healthy unrun. When the launcher deferred the trial (``DEFERRED_ENV``:
        its start could not be counted), the record is left for a later start.

        With nothing pending, nothing is locked or written (a read-only slot root is
        no error then).

        Raises: OSError: the outcome or the slot root's lock cannot be written (a full
            or read-only disk); the trial stays pending, so a later call may confirm it.
        """
        p = self.pending()
        if p is None:
            return False
        if os.environ.get(DEFERRED_ENV) == str(p.get("version")):
            log.debug("software %s's trial was deferred by the launcher: not confirmed by "
                      "this start", p.get("version"))
            return False
        with self.slots.lock():
            return self._confirm()

    def deferred_trial(self) -> str | None:
        """The version on trial whose start the launcher deferred for this process
        (``DEFERRED_ENV``: `preflight` said "deferred", the slot root could not be
        written), while pending.json still has it on trial; else None. This process
        runs the version before it, and `confirm` leaves the trial alone.

        Raises: OSError reading pending.json."""
        version = os.environ.get(DEFERRED_ENV)
        if not version:
            return None
        p = self.pending()
        return version if p is not None and str(p.get("version")) == version else None

    def trial_countable(self, version: str) -> bool:
        """Whether a start now could count `version`'s deferred trial: under the slot
        root's lock, its record is written back as it is, the write `preflight` and
        `exec_current` make first (a few hundred bytes, so cheap to try every minute).
        False when `version` is no longer on trial, or no longer the current slot:
        nothing to resume.

        Raises: OSError: the slot root still cannot be written (`UNWRITABLE`: a full
            or read-only disk, another user's files), or worse (EIO)."""
        with self.slots.lock():
            p = self.pending()
            if (p is None or str(p.get("version")) != version
                    or self.slots.current_version() != version):
                return False
            self._write(PENDING, p)
        return True

    def _confirm(self) -> bool:
        p = self.pending()
        if p is None or self.slots.current_version() != p["version"]:
            return False
        if (os.environ.get(SOFTWARE_ROOT_ENV)
                and os.environ.get(SLOT_ENV) != p["version"]):
            self._write(OUTCOME, {"rollout_id": p.get("rollout_id", ""),
                                  "path": p.get("path", ""), "name": p.get("name", "fedge"),
                                  "version": p["version"], "ok": False, "rolled_back": False,
                                  "detail": f"software {p['version']} not run: the packaged "
                                            f"install {packaged_version()} is newer (a .deb "
                                            "upgrade came first); the update is dropped"})
            (self.root / PENDING).unlink()
            return False
        imported = _imported_fedge()
        slot = (self.slots.slots / str(p["version"])).resolve()
        if os.environ.get(SOFTWARE_ROOT_ENV) and slot not in imported.parents:
            # the slot's command ran, but imported another fedge (a bundle without
            # its own code on the path, e.g. no PYTHONPATH=site-packages): the update
            # would be reported healthy while the old code runs. Where the code was
            # imported from is what tells, not fedge.__version__, which comes from
            # installed metadata (a bundle's site-packages may carry none, and then it
            # names the packaged install's version whatever code runs).
            self._roll_back(p, f"software {p['version']}'s slot ran, but the fedge it "
                               f"imported is {imported.parent}, not the slot's {slot} "
                               "(does its fedge-bundle.json env set PYTHONPATH to its "
                               "site-packages?)")
            return False
        self._write(OUTCOME, {"rollout_id": p.get("rollout_id", ""), "path": p.get("path", ""),
                              "name": p.get("name", "fedge"), "version": p["version"],
                              "ok": True, "rolled_back": False,
                              "detail": f"software {p['version']} healthy after "
                                        f"{p.get('attempts')} start(s)"})
        (self.root / PENDING).unlink()
        self.slots._prune()
        return True

    def take_outcome(self) -> dict[str, object] | None:
        """The last update's outcome, once (for reporting to the coordinator).

        Raises: OSError: there is one, but the lock or its removal failed (a read-only
            disk); it stays for a later call."""
        if not (self.root / OUTCOME).exists():  # nothing to lock for (read-only is fine)
            return None
        with self.slots.lock():
            out = self._read(OUTCOME)
            if out is not None:
                (self.root / OUTCOME).unlink()
            return out


def exec_current(root: Path, fallback: list[str]) -> list[str]:
    """What the service runs: the ``current`` slot's entry point if that slot is newer
    than the packaged install (`slot_is_newer`), else ``fallback``.

    Used as the unit's ExecStart (``python -m fedge.update.ab exec --root DIR --
    /usr/bin/fedge agent run ...``) so that a software update switched in by
    `SelfUpdate.stage` is what systemd starts next, while an appliance that never
    took an update, or whose .deb was since upgraded past its slot, runs the packaged
    install. The process is replaced with
    ``execve``: the main PID (``NotifyAccess=main``) is the agent itself.

    Either way ``FEDGE_SOFTWARE_ROOT`` (`SOFTWARE_ROOT_ENV`) names `root`, so the
    agent knows it runs under this launcher and may stage its own first update.

    A ``current`` slot on trial whose record cannot be written (a read-only or full
    disk: preflight could not count this start, and said "deferred") is not run: the
    version before it is (`fallback_version`), with ``DEFERRED_ENV`` naming the trial,
    so that a broken update cannot restart uncounted until systemd gives up.

    Returns the argv it would run (after updating ``os.environ``); `_main` execs it.

    Raises: HealthCheckFailed for a ``current`` slot with a bad manifest (systemd
        restarts the unit and ``preflight`` rolls back after max_attempts); ValueError
        for an empty fallback.
    """
    if not fallback:
        raise ValueError("exec needs a fallback command after --")
    os.environ[SOFTWARE_ROOT_ENV] = str(Path(root).absolute())
    os.environ.pop(SLOT_ENV, None)  # set below only when a slot runs
    os.environ.pop(DEFERRED_ENV, None)
    current = Path(root) / "current"
    if not current.is_dir():
        log.info("no software slot under %s: running the packaged install %s", root,
                 packaged_version())
        return list(fallback)
    slot = current.resolve().name
    if not slot_is_newer(slot):
        # A .deb upgrade does not touch the slot root: a slot an older OTA update
        # left behind must not shadow the newer packaged install for ever.
        log.warning("software slot %s is not newer than the packaged install %s: "
                    "running the packaged install", slot, packaged_version())
        return list(fallback)
    deferred = _uncountable_trial(Path(root), slot)
    if deferred is not None:
        doc, exc = deferred
        back = fallback_version(Path(root), doc)
        log.error("software %s is on trial, but %s cannot be written (%s: %s): its start "
                  "cannot be counted, so %s runs instead; the trial goes on at the first "
                  "start after the file system can be written again", slot, root,
                  exc.strerror or exc, exc.filename or root, _version_words(back))
        os.environ[DEFERRED_ENV] = slot
        if back is None:
            return list(fallback)
        current, slot = Path(root) / "slots" / back, back
    else:
        log.info("running software slot %s (newer than the packaged install %s)", slot,
                 packaged_version())
    argv, extra = slot_command(current)
    os.environ.update(extra)
    os.environ[SLOT_ENV] = slot
    return argv


def _uncountable_trial(root: Path, slot: str) -> tuple[dict[str, Any], OSError] | None:
    """When `slot` is on trial (pending.json names it) and its record cannot be written
    (one of `UNWRITABLE`, or any other error), so that `SelfUpdate.preflight` could not
    have counted this start: the record and the error; else None. The record is written
    back as it is: the write preflight did (or failed to do) just before."""
    from fedge.update.files import write_json

    try:
        doc = json.loads((root / PENDING).read_text())
    except (OSError, ValueError):  # none, or preflight's to deal with
        return None
    if not isinstance(doc, dict) or doc.get("version") != slot:
        return None
    try:
        write_json(root / PENDING, doc)
    except OSError as exc:  # UNWRITABLE, or worse (EIO): uncountable either way
        return doc, exc
    return None


def fallback_version(root: Path, pending: dict[str, Any]) -> str | None:
    """What runs while a trial is deferred: the slot it would roll back to (its
    ``previous``) when that slot is there and newer than the packaged install, else
    None, the packaged install (as `exec_current` would choose between them)."""
    previous = pending.get("previous")
    if (isinstance(previous, str) and (Path(root) / "slots" / previous).is_dir()
            and slot_is_newer(previous)):
        return previous
    return None


def _version_words(version: str | None) -> str:
    return (f"software slot {version}" if version is not None
            else f"the packaged install {packaged_version()}")


def running_version() -> str:
    """The software version this process runs: the slot the unit's launcher started
    (``FEDGE_SOFTWARE_SLOT``, set by `exec_current`), else the packaged install."""
    return os.environ.get(SLOT_ENV) or packaged_version()


def packaged_version() -> str:
    """The version of the fedge package this interpreter imports (the .deb's)."""
    import fedge

    return fedge.__version__


def _imported_fedge() -> Path:
    """The file this process imported the fedge package from, symlinks resolved."""
    import fedge

    return Path(fedge.__file__).resolve()


def slot_is_newer(slot_version: str, packaged: str | None = None) -> bool:
    """Whether a slot's version is newer than the packaged install's (PEP 440 order,
    so 0.10.0 > 0.9.0 and 0.2.0 > 0.2.0rc1). A version that does not parse on either
    side counts as not newer: the packaged install is the one known to be whole."""
    from packaging.version import InvalidVersion, Version

    packaged = packaged_version() if packaged is None else packaged
    try:
        return Version(slot_version) > Version(packaged)
    except InvalidVersion:
        log.warning("cannot order software slot %r against the packaged install %r",
                    slot_version, packaged)
        return False


def _main(argv: list[str] | None = None) -> int:
    """``python -m fedge.update.ab preflight --root DIR`` (the unit's ExecStartPre) and
    ``python -m fedge.update.ab exec --root DIR -- FALLBACK...`` (its ExecStart)."""
    import argparse

    args_in = list(sys.argv[1:] if argv is None else argv)
    fallback: list[str] = []
    if "--" in args_in:
        cut = args_in.index("--")
        args_in, fallback = args_in[:cut], args_in[cut + 1:]
    ap = argparse.ArgumentParser(
        prog="python -m fedge.update.ab",
        usage="%(prog)s preflight --root DIR [--max-attempts N]\n"
              "       %(prog)s exec --root DIR -- COMMAND [ARG...]",
        description="preflight: run before every start of the agent's unit (counts a "
                    "software update's trial starts, rolls back after --max-attempts). "
                    "exec: run the current software slot, or COMMAND (the packaged "
                    "install) when no slot is newer.")
    ap.add_argument("action", choices=("preflight", "exec"))
    ap.add_argument("--root", type=Path, required=True)
    from fedge.serve.cli import positive_int

    ap.add_argument("--max-attempts", type=positive_int, default=TRIAL_STARTS)
    args = ap.parse_args(args_in)
    if args.root.exists() and not args.root.is_dir():
        print(f"fedge.update.ab {args.action}: --root {args.root} is not a directory",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="fedge.update.ab: %(message)s")
    if args.action == "exec":
        try:
            command = exec_current(args.root, fallback)
        except (ValueError, HealthCheckFailed) as exc:
            print(f"fedge.update.ab exec: {exc}", file=sys.stderr)
            return 2
        sys.stdout.flush()
        os.execvp(command[0], command)
    try:
        print(SelfUpdate(args.root, max_attempts=args.max_attempts).preflight())
    except (ValueError, OSError) as exc:  # the journal keeps one line, not a traceback
        print(f"fedge.update.ab preflight: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
