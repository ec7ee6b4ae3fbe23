#!/usr/bin/env python3
"""Lay out a fedge software update bundle: a deterministic .tar.gz with a manifest.

The bundle is what the console signs as a TUF target of kind ``software`` and
what ``fedge.update.ab.SlotInstaller`` unpacks into ``slots/<version>/`` on the
appliance (see firmware/README.md)::

    fedge-bundle.json      {"format": 1, "version", "exec": [...], "env": {...},
                            "files": {"<path>": "<sha256>", ...}}
    <payload files>        e.g. site-packages/ from the fedge wheel, or a venv

``exec``/``env`` follow fedge.update.ab.slot_command: ``"{python}"`` is the
running interpreter, relative paths that exist in the slot resolve into it.
``files`` lets the appliance re-check the unpacked slot before it switches to it
(``fedge.update.ab.verify_slot``); ``--verify`` runs that same function by hand,
and also refuses a slot without a manifest, which it cannot vouch for.

Run it from a source tree or wherever fedge is installed (it imports
``fedge.update.ab``): ``python firmware/make_bundle.py`` from a checkout finds the
``fedge`` package beside it.

The archive is reproducible: members sorted, mtime 0, owner root, modes
normalised (0755 for executables and directories, 0644 otherwise), gzip header
without a timestamp; the same payload gives the same bytes and the same TUF hash.

Usage::

    firmware/make_bundle.py --version 0.2.0 --payload DIR --out fedge-0.2.0.tar.gz \\
        [--exec '{python} -m fedge.cli agent run --config /etc/fedge/agent.toml'] \\
        [--env PYTHONPATH=site-packages]
    firmware/make_bundle.py --verify SLOT_DIR

``--exec`` is one string, split as a POSIX shell would (quotes kept together).
A payload holding ``site-packages/`` gets ``PYTHONPATH=site-packages`` unless
``--env PYTHONPATH=...`` says otherwise: without it the slot's command would import
the packaged fedge, not the bundle's.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shlex
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

try:
    from fedge.update import ab
except ImportError:  # run as a script from a checkout without fedge installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedge.update import ab

MANIFEST = ab.MANIFEST
FORMAT = ab.FORMAT
DEFAULT_EXEC = ("{python}", "-m", "fedge.cli", "agent", "run", "--config",
                "/etc/fedge/agent.toml")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){1,3}([.+-][A-Za-z0-9.]+)?$")


class BundleError(ValueError):
    """A bundle cannot be made or does not verify; the message says which file and why."""


def _payload_files(payload: Path) -> list[Path]:
    files = []
    for path in sorted(payload.rglob("*")):
        rel = path.relative_to(payload)
        if path.is_symlink():
            raise BundleError(f"payload {rel}: symlinks are not allowed in a bundle")
        if path.is_file():
            if rel.as_posix() == MANIFEST:
                raise BundleError(f"payload already contains {MANIFEST}; it is generated")
            files.append(rel)
        elif not path.is_dir():
            raise BundleError(f"payload {rel}: not a regular file or directory")
    if not files:
        raise BundleError(f"payload {payload} has no files")
    return files


def _tarinfo(name: str, size: int, *, directory: bool = False, executable: bool = False):
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if (directory or executable) else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def make_bundle(
    payload: Path,
    version: str,
    out: Path,
    *,
    exec_argv: Sequence[str] = DEFAULT_EXEC,
    env: dict[str, str] | None = None,
) -> dict:
    """Write the bundle to ``out``; returns the manifest.

    Raises:
        BundleError: a bad version, an empty ``exec``, or a payload that is
            empty, holds symlinks/special files or a manifest of its own.
    """
    if not _VERSION.match(version):
        raise BundleError(f"version {version!r} is not MAJOR.MINOR[.PATCH][-+.suffix]")
    if not exec_argv or not all(isinstance(a, str) and a for a in exec_argv):
        raise BundleError(f"exec {list(exec_argv)!r} must be a non-empty list of strings")
    payload = Path(payload)
    if not payload.is_dir():
        raise BundleError(f"payload {payload} is not a directory")
    files = _payload_files(payload)
    manifest = {
        "format": FORMAT,
        "version": version,
        "exec": list(exec_argv),
        "env": dict(sorted((env or {}).items())),
        "files": {rel.as_posix(): ab.sha256_file(payload / rel) for rel in files},
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        tar.addfile(_tarinfo(MANIFEST, len(data)), io.BytesIO(data))
        dirs = sorted({p.as_posix() for rel in files for p in rel.parents if p != Path(".")})
        for d in dirs:
            tar.addfile(_tarinfo(d, 0, directory=True))
        for rel in files:
            src = payload / rel
            info = _tarinfo(rel.as_posix(), src.stat().st_size,
                            executable=bool(src.stat().st_mode & 0o111))
            with open(src, "rb") as fh:
                tar.addfile(info, fh)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw.getvalue())
    tmp.replace(out)
    return manifest


def verify_slot(slot: Path) -> dict:
    """Check an unpacked slot with ``fedge.update.ab.verify_slot``, the appliance's
    own check, requiring a manifest; returns it.

    Raises:
        BundleError: the manifest is missing, malformed or has no hashes; a listed
            file is missing, altered or a symlink; or the slot holds anything not
            listed (a symlink included).
    """
    slot = Path(slot)
    try:
        manifest = ab.verify_slot(slot, require_manifest=True)
    except ValueError as exc:
        raise BundleError(f"slot {slot}: {exc}") from None
    assert manifest is not None  # require_manifest: a slot without one raised
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version")
    parser.add_argument("--payload", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--exec", dest="exec_line", metavar="COMMAND",
                        default=shlex.join(DEFAULT_EXEC),
                        help="the slot's command, one string split as a shell would "
                             "(default: %(default)s)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the slot's command (a payload with "
                             "site-packages/ gets PYTHONPATH=site-packages unless given)")
    parser.add_argument("--verify", type=Path, metavar="SLOT_DIR")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            manifest = verify_slot(args.verify)
            print(f"{args.verify}: {len(manifest['files'])} files match, version "
                  f"{manifest['version']}")
            return 0
        if not (args.version and args.payload and args.out):
            parser.error("--version, --payload and --out are required (or --verify SLOT_DIR)")
        env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"--env {item!r} must be KEY=VALUE")
            env[key] = value
        try:
            exec_argv = shlex.split(args.exec_line)
        except ValueError as exc:
            parser.error(f"--exec {args.exec_line!r}: {exc}")
        if "PYTHONPATH" not in env and (args.payload / "site-packages").is_dir():
            env["PYTHONPATH"] = "site-packages"
            print("make_bundle: PYTHONPATH=site-packages (the payload's site-packages/)",
                  file=sys.stderr)
        manifest = make_bundle(args.payload, args.version, args.out, exec_argv=exec_argv,
                               env=env)
    except BundleError as exc:
        print(f"make_bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: version {manifest['version']}, {len(manifest['files'])} files, "
          f"sha256 {ab.sha256_file(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
