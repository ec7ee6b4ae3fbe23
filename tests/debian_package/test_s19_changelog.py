"""The package says what its version changed: changelog.Debian.gz from CHANGELOG.md.

The package's changelog said only "Package built from the fedge source tree" for
every build, and main stayed 0.2.0 across 486 commits, so nothing on an appliance
told hospital IT that a coordinator upgrade migrates its database (schema 2 to 3,
no way back to 0.2.0) or which agent.toml keys 0.2.0 refuses. Now
packaging/build_deb.py writes /usr/share/doc/fedge/changelog.Debian.gz from the
CHANGELOG.md section of the package's upstream version (and the older ones), ships
CHANGELOG.md as the upstream changelog.gz, and refuses, before building, a version
CHANGELOG.md has no section for.

The package here is assembled and built by build_deb's own assemble() and
build_deb() around an empty staging venv (the venv build is minutes and
tests/debian_package/test_deb.py's business): what is checked is the package's
documentation, which does not depend on the venv.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build_deb.py"

missing = [t for t in ("dpkg-deb", "dpkg-parsechangelog") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"missing tools: {missing}")


@pytest.fixture(scope="module")
def build_deb():
    sys.path.insert(0, str(BUILD.parent))
    try:
        import build_deb
    finally:
        sys.path.remove(str(BUILD.parent))
    return build_deb


def upstream() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_changelog_md_has_the_packaged_version_first(build_deb) -> None:
    releases = build_deb.read_changelog((REPO / "CHANGELOG.md").read_text(encoding="utf-8"))
    assert releases[0].version == upstream()
    assert "0.2.0" in [r.version for r in releases]


def test_the_built_package_carries_this_versions_release_notes(build_deb, tmp_path) -> None:
    venv_root = tmp_path / "venv"
    (venv_root / "usr/lib/fedge/lib/python3.11/site-packages").mkdir(parents=True)
    (venv_root / "usr/lib/fedge/bin").mkdir()
    version = f"{upstream()}-1"
    build_deb.assemble(venv_root, tmp_path / "pkg", version)
    deb = build_deb.build_deb(tmp_path / "pkg", tmp_path / "out", version, "none", None)
    assert deb.name == f"fedge_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "root")], check=True,
                   timeout=120)
    doc = tmp_path / "root/usr/share/doc/fedge"

    debian = doc / "changelog.Debian"
    debian.write_bytes(gzip.decompress((doc / "changelog.Debian.gz").read_bytes()))
    text = debian.read_text()
    assert "Package built from the fedge source tree" not in text
    # dpkg reads it: the newest entry is the package's version, then 0.2.0-1
    top = subprocess.run(["dpkg-parsechangelog", "-l", str(debian), "-S", "Version"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert top.stdout.strip() == version and not top.stderr, top.stderr
    every = subprocess.run(["dpkg-parsechangelog", "-l", str(debian), "--all", "--format",
                            "rfc822"], capture_output=True, text=True, timeout=60, check=True)
    versions = [line.split(": ", 1)[1] for line in every.stdout.splitlines()
                if line.startswith("Version: ")]
    assert versions == [version, "0.2.0-1"], every.stdout
    # what hospital IT must read before installing it over 0.2.0
    flat = " ".join(text.split())
    assert "schema 2 to 3" in flat and "/var/lib/fedge-coordinator" in flat
    assert "There is no downgrade: 0.2.0 refuses a schema-3 database" in flat
    assert "min_noise_multiplier" in flat and "DatasetClasses" in flat
    assert "format version 2" in flat
    assert max(len(line) for line in text.splitlines()) <= 80  # lintian's line length
    # and the whole CHANGELOG.md as the upstream changelog
    assert gzip.decompress((doc / "changelog.gz").read_bytes()) == \
        (REPO / "CHANGELOG.md").read_bytes()


def test_a_version_without_release_notes_is_refused_before_building(tmp_path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, str(BUILD), "--version", "9.9.9-1", "--out", str(tmp_path / "out"),
         "--work", str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert (f"{REPO / 'CHANGELOG.md'} has no section for 9.9.9 (the package version "
            "9.9.9-1; it has ") in proc.stderr
    assert "add '## 9.9.9 (YYYY-MM-DD)'" in proc.stderr
    assert not work.exists() and not (tmp_path / "out").exists()  # nothing built


@pytest.mark.parametrize(("text", "error"), [
    ("## 0.3.0 (2026-13-01)\n- x\n", "line 1: '2026-13-01' is not a date"),
    ("## 0.3.0\n- x\n", "line 1: '## 0.3.0' is not a release heading"),
    ("## 0.3.0 (2026-12-01)\n- x\n## 0.3.0 (2026-12-02)\n- y\n",
     "line 3: release 0.3.0 is given twice"),
    ("## 0.3.0 (2026-12-01)\n\n### Nothing\n", "release 0.3.0 says nothing"),
], ids=["bad-date", "no-date", "twice", "empty"])
def test_a_malformed_changelog_is_named(build_deb, text: str, error: str) -> None:
    with pytest.raises(build_deb.BuildError, match=r"^CHANGELOG\.md") as exc:
        build_deb.read_changelog(text)
    assert error in str(exc.value)


def test_items_groups_and_older_releases(build_deb, tmp_path) -> None:
    md = tmp_path / "CHANGELOG.md"
    md.write_text("# Changelog\n\npreamble, left out\n\n## 0.4.0 (2027-01-05)\n\n"
                  "- drafted, not packaged yet\n\n## 0.3.0 (2026-12-01)\n\nIntro line one\n"
                  "and two.\n\n### Upgrading\n\n- `first` item\n  continued\n- second\n\n"
                  "## 0.2.0 (2026-11-30)\n\n- old\n")
    assert build_deb.debian_changelog("1:0.3.0-2", md) == (
        "fedge (1:0.3.0-2) stable; urgency=medium\n\n"
        "  * Intro line one and two.\n"
        "  * Upgrading:\n"
        "    - first item continued\n"
        "    - second\n\n"
        f" -- {build_deb.MAINTAINER}  Tue, 01 Dec 2026 00:00:00 +0000\n\n"
        "fedge (0.2.0-1) stable; urgency=medium\n\n"
        "  * old\n\n"
        f" -- {build_deb.MAINTAINER}  Mon, 30 Nov 2026 00:00:00 +0000\n")
