#!/usr/bin/env python3
"""Build fedge_VERSION_amd64.deb: fedge in its own virtualenv under /usr/lib/fedge.

What dh-virtualenv does, without debhelper (so that it runs from a plain
checkout with only dpkg-deb): the virtualenv is created *at its final path*
inside a staging root (``<work>/venv/usr/lib/fedge``) with Debian's
``/usr/bin/python3``, filled from the local wheels by the build venv's pip
(``pip --python``; no pip inside the appliance), its byte code compiled with
the final paths (``compileall -s/-p``, ``unchecked-hash`` pycs: the tree is
read-only at run time and replaced whole by dpkg), and every script shebang
that named the staging path rewritten to ``/usr/lib/fedge/bin/python``.

The heavy dependency install runs once per ``pyproject.toml`` content (a stamp
in the staging venv); each build reinstalls only the fedge wheel. Each package
root is a hard-link farm of the staging venv plus the units, configs, docs and
maintainer scripts from ``packaging/debian``, handed to ``dpkg-deb
--root-owner-group`` (no fakeroot needed).

Usage::

    packaging/build_deb.py [--version 0.3.0-1] [--out dist] [--work build/deb]
                           [--compress zstd|gzip|xz|none] [--level N]

Prints the path of the .deb on its last line.
"""

from __future__ import annotations

import argparse
import datetime
import email.utils
import gzip
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGING = REPO / "packaging"
PREFIX = "/usr/lib/fedge"
SYSTEM_PYTHON = "/usr/bin/python3"
# Debian version: [epoch:]upstream[-revision]; upstream starts with a digit.
DEB_VERSION = re.compile(r"^(?:[0-9]+:)?[0-9][A-Za-z0-9.+~-]*$")
MAINTAINER = "fedge maintainers <fedge@example.org>"
UNITS = ("fedge-agent.service", "fedge-coordinator.service", "fedge-nvidia-uvm.service",
         "fedge-serve.service")
CONFFILES = ("agent.toml", "coordinator.toml", "serve.env")
TORCH = "torch==2.13.0"


class BuildError(RuntimeError):
    """A build step failed; the message names the step."""


def log(msg: str) -> None:
    print(f"[build_deb {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], step: str, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; raise BuildError naming ``step`` with its output on failure."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise BuildError(
            f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def upstream_version() -> str:
    """The project version from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def check_version(version: str) -> str:
    """Validate a Debian package version.

    Raises:
        ValueError: ``version`` is not a Debian version string.
    """
    if not DEB_VERSION.match(version):
        raise ValueError(
            f"--version {version!r} is not a Debian version ([epoch:]upstream[-revision], "
            "upstream starting with a digit, characters A-Za-z0-9.+~-)"
        )
    return version


def snapshot_source(work: Path, rev: str) -> Path:
    """The committed tree at ``rev`` in ``<work>/src``, unchanged files keeping their mtimes.

    Packaging what is committed (not whatever is half-edited in the checkout)
    makes ``make deb`` reproducible; keeping mtimes lets the CMake build in
    ``<work>/cmake`` recompile only what changed.
    """
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                             capture_output=True)
    if archive.returncode != 0:
        raise BuildError(f"git archive {rev} failed: {archive.stderr.decode(errors='replace')}")
    src = work / "src"
    fresh = work / "src.new"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(fresh, filter="data")
    wanted = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    if src.exists():
        for old in [p for p in src.rglob("*") if p.is_file()]:
            if old.relative_to(src) not in wanted:
                old.unlink()
    for rel in wanted:
        new, old = fresh / rel, src / rel
        if old.is_file() and old.read_bytes() == new.read_bytes():
            continue
        old.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new, old)
    shutil.rmtree(fresh)
    return src


def build_wheel(work: Path, source: Path) -> Path:
    """Build the fedge wheel from ``source`` in the packaging's own CMake build directory."""
    out = work / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"building the fedge wheel from {source}")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--config-settings", f"build-dir={work / 'cmake'}", "-w", str(out), str(source)],
        "pip wheel")
    wheels = sorted(out.glob("fedge-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip wheel produced {[w.name for w in wheels]}, expected one fedge wheel")
    return wheels[0]


def _deps_stamp() -> str:
    h = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + TORCH.encode())
    h.update(os.path.realpath(SYSTEM_PYTHON).encode())
    return h.hexdigest()


def build_venv(work: Path, wheel: Path) -> Path:
    """Create or refresh the staging venv; returns the staging root containing usr/lib/fedge."""
    root = work / "venv"
    venv = root / PREFIX.lstrip("/")
    stamp = venv / ".fedge-deps-stamp"
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    if not (stamp.exists() and stamp.read_text() == _deps_stamp()):
        log(f"creating {PREFIX} in {root} with {SYSTEM_PYTHON} and installing dependencies")
        shutil.rmtree(root, ignore_errors=True)
        run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], "python3 -m venv")
        # torch first and pinned, as in the Makefile: the CPU build lies in the local
        # wheel directory, while a loose "torch>=" pulls the CUDA build and 4 GB of
        # nvidia-* wheels.
        run([*pip, "install", "-q", "--no-compile", "--no-warn-script-location", TORCH],
            "pip install (torch)")
        run([*pip, "install", "-q", "--no-compile", "--no-warn-script-location",
             f"{wheel}[systemd]"], "pip install (dependencies)")
        relocate(venv)
        compile_bytecode(venv, next(venv.glob("lib/python3*/site-packages")))
        stamp.write_text(_deps_stamp())
    log("installing the fedge wheel into the staging venv")
    run([*pip, "install", "-q", "--no-compile", "--no-deps", "--force-reinstall",
         "--no-warn-script-location", str(wheel)], "pip install (fedge)")
    relocate(venv)
    compile_bytecode(venv, next(venv.glob("lib/python3*/site-packages/fedge")))
    return root


def relocate(venv: Path) -> None:
    """Rewrite every reference to the staging path into the final prefix."""
    staged = str(venv)
    for script in (venv / "bin").iterdir():
        if script.is_symlink() or not script.is_file():
            continue
        data = script.read_bytes()
        if staged.encode() in data:
            script.write_bytes(data.replace(staged.encode(), PREFIX.encode()))
    (venv / "bin" / "Activate.ps1").unlink(missing_ok=True)
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(staged, PREFIX))
    for direct_url in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        direct_url.unlink()  # names the build machine's wheel path
    leftovers = [
        str(p) for p in (venv / "bin").iterdir()
        if p.is_file() and not p.is_symlink() and staged.encode() in p.read_bytes()
    ]
    if leftovers:
        raise BuildError(f"staging path still referenced after relocation: {leftovers}")


def compile_bytecode(venv: Path, tree: Path) -> None:
    """Compile every module under ``tree`` with its final path as co_filename.

    Like pip, modules that do not compile under this Python (e.g. torch's
    Python 3.12-only test helpers) are left without byte code.
    """
    log(f"compiling byte code in {tree.name}")
    root = venv.parents[len(Path(PREFIX).parts) - 2]  # the staging root
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "compileall", "-qq", "-j0",
         "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/", str(tree)],
        capture_output=True, text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
    )
    if proc.returncode not in (0, 1):  # 1: some files did not compile
        raise BuildError(f"compileall crashed (exit {proc.returncode}): {proc.stderr}")


def _copy(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def _installed_size_kib(root: Path) -> int:
    total = 0
    seen: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root / "DEBIAN":
            dirnames.clear()
            continue
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += (st.st_size + 1023) // 1024 if not os.path.isdir(
                os.path.join(dirpath, name)) else 1
    return total


# What changed, for hospital IT and the ML engineer: shipped as the upstream
# changelog (/usr/share/doc/fedge/changelog.gz), and the source of the package's
# changelog.Debian.gz (:func:`debian_changelog`), so that `apt changelog`-style
# reading of an installed package says what this version brought.
CHANGELOG = REPO / "CHANGELOG.md"
_RELEASE = re.compile(r"^## (\S+) \((\d{4}-\d{2}-\d{2})\)\s*$")
# lintian flags changelog lines over 80 columns (debian-changelog-line-too-long)
CHANGELOG_WIDTH = 78


@dataclass
class Release:
    """One ``## VERSION (DATE)`` section of CHANGELOG.md: its groups in order, each
    ``(title, items)``; the text before the first ``###`` is the group titled ""."""

    version: str
    date: datetime.date
    groups: list[tuple[str, list[str]]]


def read_changelog(text: str, source: str = "CHANGELOG.md") -> list[Release]:
    """The releases of a CHANGELOG.md text, newest first as written.

    Within a release, a ``- `` line starts an item and indented lines continue it;
    any other text makes a paragraph item; a blank line ends either. Text before
    the first release is the file's preamble and is left out.

    Raises:
        BuildError: a release heading whose date is not a date, a version given twice,
            or a release with nothing in it (each names ``source`` and the line).
    """
    releases: list[Release] = []
    item: list[str] | None = None

    def close() -> None:
        nonlocal item
        if item is not None:
            releases[-1].groups[-1][1].append(" ".join(item))
        item = None

    for n, line in enumerate(text.splitlines(), 1):
        heading = _RELEASE.match(line)
        if heading is None and line.startswith("## "):
            raise BuildError(f"{source} line {n}: {line!r} is not a release heading "
                             "'## VERSION (YYYY-MM-DD)'")
        if heading is not None:
            close()
            version, day = heading.groups()
            try:
                date = datetime.date.fromisoformat(day)
            except ValueError:
                raise BuildError(
                    f"{source} line {n}: {day!r} is not a date (YYYY-MM-DD)") from None
            if any(r.version == version for r in releases):
                raise BuildError(f"{source} line {n}: release {version} is given twice")
            releases.append(Release(version, date, [("", [])]))
            continue
        if not releases:
            continue  # the preamble
        stripped = line.strip()
        if line.startswith("### "):
            close()
            releases[-1].groups.append((line[4:].strip(), []))
        elif not stripped:
            close()
        elif line.startswith("- "):
            close()
            item = [stripped[2:].strip()]
        elif item is not None:
            item.append(stripped)
        else:
            item = [stripped]
    close()
    for r in releases:
        r.groups = [(title, items) for title, items in r.groups if items]
        if not r.groups:
            raise BuildError(f"{source}: release {r.version} says nothing")
    return releases


def upstream_of(version: str) -> str:
    """The upstream part of a Debian version: no epoch, no Debian revision."""
    upstream = version.split(":", 1)[-1]
    return upstream.rpartition("-")[0] if "-" in upstream else upstream


def _debian_text(text: str) -> str:
    return text.replace("`", "")


def debian_changelog(version: str, changelog_md: Path = CHANGELOG) -> str:
    """The package's debian/changelog: one entry per release of ``changelog_md``
    from ``version``'s upstream release down, the first one named ``version``, the
    older ones ``<release>-1``; each dated by its release's date.

    Raises:
        BuildError: ``changelog_md`` cannot be read, does not parse
            (:func:`read_changelog`), or has no section for ``version``'s upstream
            version (a package must say what its version changed).
    """
    try:
        text = changelog_md.read_text(encoding="utf-8")
    except OSError as exc:
        raise BuildError(f"cannot read {changelog_md}: {exc.strerror or exc}") from exc
    releases = read_changelog(text, str(changelog_md))
    upstream = upstream_of(version)
    names = [r.version for r in releases]
    if upstream not in names:
        raise BuildError(
            f"{changelog_md} has no section for {upstream} (the package version "
            f"{version}; it has {', '.join(names) or 'none'}): add '## {upstream} "
            "(YYYY-MM-DD)' saying what this version changed before packaging it")
    entries = []
    for r in releases[names.index(upstream):]:
        lines = [f"fedge ({version if r.version == upstream else f'{r.version}-1'}) "
                 "stable; urgency=medium", ""]
        for title, items in r.groups:
            if title:
                lines += textwrap.wrap(_debian_text(title) + ":", CHANGELOG_WIDTH,
                                       initial_indent="  * ", subsequent_indent="    ")
                indent = ("    - ", "      ")
            else:
                indent = ("  * ", "    ")
            for it in items:
                lines += textwrap.wrap(_debian_text(it), CHANGELOG_WIDTH,
                                       initial_indent=indent[0],
                                       subsequent_indent=indent[1],
                                       break_long_words=False, break_on_hyphens=False)
        midnight = datetime.datetime.combine(r.date, datetime.time(0, 0),
                                         tzinfo=datetime.UTC)
        lines += ["", f" -- {MAINTAINER}  {email.utils.format_datetime(midnight)}"]
        entries.append("\n".join(lines) + "\n")
    return "\n".join(entries)


def changelog(version: str) -> bytes:
    """changelog.Debian.gz: :func:`debian_changelog`, gzipped as lintian wants it."""
    return gzip.compress(debian_changelog(version).encode(), compresslevel=9, mtime=0)


def _epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))


def assemble(venv_root: Path, pkg: Path, version: str) -> None:
    """Lay out the package root: venv (hard links), /usr/bin/fedge, units, configs, docs."""
    shutil.rmtree(pkg, ignore_errors=True)
    pkg.mkdir(parents=True)
    run(["cp", "-al", str(venv_root / "usr"), str(pkg / "usr")], "hard-link the venv")
    (pkg / PREFIX.lstrip("/") / ".fedge-deps-stamp").unlink(missing_ok=True)
    prune(pkg / PREFIX.lstrip("/"))
    (pkg / "usr/bin").mkdir(parents=True, exist_ok=True)
    (pkg / "usr/bin/fedge").symlink_to("../lib/fedge/bin/fedge")
    for unit in UNITS:
        _copy(PACKAGING / "systemd" / unit, pkg / "lib/systemd/system" / unit, 0o644)
    for conf in CONFFILES:
        _copy(PACKAGING / "debian" / "etc" / conf, pkg / "etc/fedge" / conf, 0o644)
    doc = pkg / "usr/share/doc/fedge"
    _copy(PACKAGING / "debian" / "copyright", doc / "copyright", 0o644)
    _copy(PACKAGING / "debian" / "README.Debian", doc / "README.Debian", 0o644)
    # every setting of the conffiles, with its default and rule (README.Debian, Files)
    _copy(REPO / "docs" / "configuration.md", doc / "configuration.md", 0o644)
    (doc / "changelog.Debian.gz").write_bytes(changelog(version))
    (doc / "changelog.gz").write_bytes(
        gzip.compress(CHANGELOG.read_bytes(), compresslevel=9, mtime=0))
    _copy(PACKAGING / "debian" / "lintian-overrides",
          pkg / "usr/share/lintian/overrides/fedge", 0o644)

    control = pkg / "DEBIAN"
    control.mkdir()
    for script in ("postinst", "prerm", "postrm"):
        _copy(PACKAGING / "debian" / script, control / script, 0o755)
    (control / "conffiles").write_text("".join(f"/etc/fedge/{c}\n" for c in CONFFILES))
    template = (PACKAGING / "debian" / "control.in").read_text()
    (control / "control").write_text(
        template.replace("@VERSION@", version)
        .replace("@MAINTAINER@", MAINTAINER)
        .replace("@INSTALLED_SIZE@", str(_installed_size_kib(pkg)))
    )
    write_md5sums(pkg)


# Never imported at run time: the wheels' own test suites and C headers for
# building extensions. ~13,000 of ~32,000 files, which makes dpkg and lintian
# markedly faster.


def prune(venv: Path) -> None:
    """Remove what never runs on the appliance; fix modes and links lintian rejects.

    Removed: the wheels' test suites, C headers, torch's C++ test binaries and
    VCS files. Shared libraries lose their execute bit (some wheels ship them
    0755); the interpreter link becomes relative.
    """
    site = next(venv.glob("lib/python3*/site-packages"))
    doomed = [
        Path(dirpath) / name
        for dirpath, dirnames, _ in os.walk(site)
        for name in dirnames
        # "include" only where it is not a Python package of that name
        if name == "tests"
        or (name == "include" and not (Path(dirpath) / name / "__init__.py").exists())
    ]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(venv / "include", ignore_errors=True)
    torch_bin = site / "torch" / "bin"
    if torch_bin.is_dir():
        for path in torch_bin.iterdir():
            if path.name != "torch_shm_manager":  # the only one torch runs (multiprocessing)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in site.rglob("*"):
        if path.name in (".gitignore", ".gitattributes") and path.is_file():
            path.unlink()
        elif ".so" in path.suffixes and path.is_file() and not path.is_symlink():
            # a hard link to the staging venv: drop x there too, harmless
            path.chmod(0o644)
    link = venv / "bin" / "python3"
    if link.is_symlink() and os.path.isabs(os.readlink(link)):
        target = os.path.realpath(SYSTEM_PYTHON)  # /usr/bin/python3.11
        link.unlink()
        # relative to where the link will live, not to the staging tree
        link.symlink_to(os.path.relpath(target, f"{PREFIX}/bin"))


def write_md5sums(pkg: Path) -> None:
    lines = []
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(pkg)
        if rel_dir.parts[:1] == ("DEBIAN",):
            continue
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
            lines.append(f"{digest}  {rel_dir / name}\n")
    (pkg / "DEBIAN" / "md5sums").write_text("".join(lines))


def build_deb(pkg: Path, out: Path, version: str, compress: str, level: int | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    upstream_and_rev = version.split(":", 1)[-1]
    deb = out / f"fedge_{upstream_and_rev}_amd64.deb"
    cmd = ["dpkg-deb", "--root-owner-group", f"-Z{compress}"]
    if level is not None:
        cmd.append(f"-z{level}")
    cmd += ["--build", str(pkg), str(deb)]
    log(f"dpkg-deb -Z{compress}{'' if level is None else f' -z{level}'} → {deb}")
    run(cmd, "dpkg-deb --build", env={**os.environ, "SOURCE_DATE_EPOCH": str(_epoch())})
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="Debian version (default: <pyproject version>-1)")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "deb")
    # lintian in Debian 12 rejects zstd members ("malformed-deb-archive"); gzip it is.
    parser.add_argument("--compress", choices=("gzip", "xz", "zstd", "none"), default="gzip")
    parser.add_argument("--source", default="HEAD",
                        help="git revision to package, or 'worktree' for the checkout as it is")
    parser.add_argument("--reuse-wheel", action="store_true",
                        help="package the wheel of the previous build again (re-pack only)")
    parser.add_argument("--level", type=int, default=None,
                        help="compression level (default: dpkg-deb's; tests use 1)")
    args = parser.parse_args(argv)
    try:
        version = check_version(args.version or f"{upstream_version()}-1")
    except ValueError as exc:
        parser.error(str(exc))
    try:  # before minutes of building: a version without release notes is not packaged
        debian_changelog(version)
    except BuildError as exc:
        parser.error(str(exc))
    if not Path(SYSTEM_PYTHON).exists():
        parser.error(f"{SYSTEM_PYTHON} is missing: install python3 and python3-venv")
    t0 = time.monotonic()
    work = args.work.resolve()
    try:
        previous = sorted((work / "wheels").glob("fedge-*.whl"))
        if args.reuse_wheel and len(previous) == 1:
            wheel = previous[0]
            log(f"re-using {wheel.name}")
        else:
            source = REPO if args.source == "worktree" else snapshot_source(work, args.source)
            wheel = build_wheel(work, source)
        venv_root = build_venv(work, wheel)
        pkg = work / "pkg"
        assemble(venv_root, pkg, version)
        deb = build_deb(pkg, args.out.resolve(), version, args.compress, args.level)
    except BuildError as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    size = deb.stat().st_size
    log(f"built {deb.name}: {size / 2**20:.1f} MiB in {time.monotonic() - t0:.0f} s")
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
