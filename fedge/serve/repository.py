"""The model repository on disk: `<root>/<model name>/<version>/model.onnx`.

A version is a directory named by a positive integer; the highest one is the
live version and the ones below it stay for rollback. `install` writes the new
model into a hidden staging directory beside the versions, fsyncs it and then
renames the whole directory into place, so a serving process that scans the
repository sees either no new version or a complete one, never a half-written
file. Files copied in by hand are handled by the server's checks instead
(a version that does not load is skipped and retried when it changes; one still
being written in place is left until it has rested one poll interval).

Opening a repository removes the staging directories of installs that were
killed before their rename (``.incoming-*``, under a random name no later install
reuses), unless a live install still holds one
(``fedge.update.files.remove_stale_temps``).

`retire` moves a version out of the scan (to `.retired-<v>-<n>`), which is how
a bad model is rolled back: the server falls back to the next highest version.

A version number names one model for good: `install` takes a number above every
version directory (with a model file or not) and every retired version, so a
client that asked for version 2 never gets another model under that name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import onnx

from fedge.update.files import holding, remove_stale_temps

log = logging.getLogger("fedge.serve.repository")

MODEL_FILE = "model.onnx"
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_RETIRED = re.compile(r"\.retired-([1-9][0-9]*)-[0-9a-f]+")
# `install`'s staging directory: ".incoming-<mkdtemp's 8 random characters>"
_STAGING = re.compile(r"\.incoming-[a-z0-9_]{8}")
# ASCII digits only: str.isdigit() also takes "²" (int() refuses it) and "١" (int()
# reads it as 1, a second directory for version 1)
_VERSION = re.compile(r"[1-9][0-9]*")
INSTALL_ATTEMPTS = 1000  # version numbers tried before install gives up


def check_model_name(name: str) -> str:
    """Return `name` if it is a valid model name.

    Raises:
        ValueError: the name does not match `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`.
    """
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        raise ValueError(
            f"model name {name!r} is invalid: it must match {NAME_RULE.pattern} "
            "(letters, digits, '_', '.', '-'; at most 64 characters)"
        )
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRepository:
    """Versioned ONNX models under one root directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.remove_stale_staging()

    def remove_stale_staging(self) -> list[Path]:
        """Remove the staging directories that killed installs left (module
        docstring); returns them. Versions and retired versions are not touched."""
        try:
            bases = [p for p in self.root.iterdir()
                     if NAME_RULE.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            log.warning("cannot look for stale staging directories in %s: %s", self.root, exc)
            return []
        removed: list[Path] = []
        for base in bases:
            removed += remove_stale_temps(base, _STAGING, directories=True)
        return removed

    def models(self) -> list[str]:
        """Names of the models that have at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and NAME_RULE.fullmatch(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[int]:
        """The versions of `name` that hold a model file, ascending.

        Raises:
            ValueError: invalid model name.
        """
        base = self.root / check_model_name(name)
        if not base.is_dir():
            return []
        found = []
        for p in base.iterdir():
            if _VERSION.fullmatch(p.name) and (p / MODEL_FILE).is_file():
                found.append(int(p.name))
        return sorted(found)

    def _highest_number_taken(self, base: Path) -> int:
        """The highest version number ever used under `base`: a version directory
        with or without its model file (one being copied in by hand), or retired."""
        highest = 0
        for p in base.iterdir():
            if _VERSION.fullmatch(p.name):
                highest = max(highest, int(p.name))
            elif m := _RETIRED.fullmatch(p.name):
                highest = max(highest, int(m.group(1)))
        return highest

    def path(self, name: str, version: int) -> Path:
        """Where version `version` of `name` keeps its ONNX file.

        Raises:
            ValueError: invalid model name or a version that is not a positive integer.
        """
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"model version {version!r} must be a positive integer")
        return self.root / check_model_name(name) / str(version) / MODEL_FILE

    def install(self, name: str, model: str | os.PathLike[str] | bytes) -> int:
        """Add `model` (a path to an ONNX file, or its bytes) as the next version of `name`.

        The model is parsed and checked with `onnx.checker` before anything is
        written; the new version appears atomically, numbered above every version
        ever used (retired ones included). Returns the new version.

        Raises:
            ValueError: invalid model name, or bytes that are not a valid ONNX model
                (the message names the checker's complaint); nothing is installed.
            FileNotFoundError: `model` is a path that does not exist.
            OSError: the repository cannot be written, INSTALL_ATTEMPTS version
                numbers were all taken meanwhile, or this process runs threads as
                root and the repository is another user's (named); nothing is
                installed.

        Run as root into a repository (or a directory on the way to it) another user
        owns, the files are written by a child run as that user, and are that user's;
        only from a process with no other thread (the command line's `fedge export
        --install`): a process running threads as root (an agent run as root, whose
        updater installs models) is refused with an OSError naming the owner, and
        nothing is written (``fedge.as_owner``).
        """
        check_model_name(name)
        data = model if isinstance(model, bytes) else Path(model).read_bytes()
        try:
            proto = onnx.load_from_string(data)
            onnx.checker.check_model(proto)
        except Exception as exc:  # protobuf DecodeError, ValidationError, ...
            raise ValueError(
                f"refusing to install {name!r}: not a valid ONNX model ({exc})"
            ) from None
        # Run as root (`sudo fedge export --install`) into a repository another user
        # owns (the fedge user's models/): written as that user (fedge.as_owner), so a
        # models/<name> symlink it planted gets root to create nothing anywhere.
        from fedge.as_owner import owner_to_act_as, run_as

        version: int = run_as(owner_to_act_as(self.root), lambda: self._place(name, data),
                              what=f"installing {name!r} into {self.root}", umask=None)
        return version

    def _place(self, name: str, data: bytes) -> int:
        """Write checked model bytes as the next version of `name` (`install`)."""
        base = self.root / name
        base.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
        try:
            with holding(staging):  # until renamed into place or removed
                with open(staging / MODEL_FILE, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                # mkdtemp makes 0700; the serving process may run as another user
                os.chmod(staging / MODEL_FILE, 0o644)
                # its last change not a write: a server takes it as complete at once
                # (fedge.serve.runtime, settle_s). chmod alone may fall in the same
                # timestamp tick as the write; a modification time 1 ns earlier is
                # below any change time the kernel gives from now on.
                st = os.stat(staging / MODEL_FILE)
                os.utime(staging / MODEL_FILE, ns=(st.st_atime_ns, st.st_mtime_ns - 1))
                os.chmod(staging, 0o755)
                _fsync_dir(staging)
                version = self._highest_number_taken(base) + 1
                for _ in range(INSTALL_ATTEMPTS):
                    try:
                        # rename(2) replaces only an empty directory: a version another
                        # installer created meanwhile makes this fail, and we take the next.
                        os.rename(staging, base / str(version))
                    except OSError as exc:
                        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                            raise
                        version = max(version, self._highest_number_taken(base)) + 1
                        continue
                    _fsync_dir(base)
                    return version
                raise OSError(
                    errno.EEXIST,
                    f"cannot install {name!r}: {INSTALL_ATTEMPTS} version numbers up to "
                    f"{version - 1} were taken meanwhile in {base}",
                )
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def retire(self, name: str, version: int) -> Path:
        """Take `version` of `name` out of service (kept on disk under `.retired-…`).

        Raises:
            ValueError: invalid name or version.
            FileNotFoundError: no such version.
        """
        src = self.path(name, version).parent
        if not src.is_dir():
            raise FileNotFoundError(f"model {name!r} has no version {version} in {self.root}")
        dst = src.parent / f".retired-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(src, dst)
        with contextlib.suppress(OSError):
            _fsync_dir(src.parent)
        return dst
