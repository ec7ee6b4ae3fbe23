"""The Debian package, end to end on this machine: build, install, upgrade, remove, purge.

Installs into the real / (CI runs as root on a throw-away machine) and always
purges the package at the end, also when a step fails. Both packages come from
one staging virtualenv (built once, cached in build/deb), so the second build
only re-packs; the packages are not compressed and dpkg runs with
--force-unsafe-io (no fsync per file), which keeps the ~1.1 GB tree fast.

lintian is not run here: on this package (200+ ELF objects from the wheels,
libtorch_cpu.so alone ~450 MB) it takes many minutes, so it runs in
`make deb-lint` (see the Makefile), which CI calls after the tests.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "packaging" / "build_deb.py"
UNITS = ("fedge-agent.service", "fedge-coordinator.service", "fedge-nvidia-uvm.service",
         "fedge-serve.service")

TOOLS = ("dpkg", "dpkg-deb", "systemd-analyze", "git")
missing = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: needs root"),
    pytest.mark.skipif(bool(missing), reason=f"missing tools: {missing}"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no /usr/bin/python3"),
]


def sh(*cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def installed_version() -> str | None:
    proc = sh("dpkg-query", "-W", "-f=${Status} ${Version}", "fedge", check=False)
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.rpartition(" ")
    return version if status.endswith("installed") else None


def dpkg_status() -> str:
    return sh("dpkg-query", "-W", "-f=${Status}", "fedge", check=False).stdout


def upstream() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if dpkg_status():
        pytest.skip(f"a fedge package is already known to dpkg here ({dpkg_status()}); "
                    "not touching it")
    out = tmp_path_factory.mktemp("debs")
    built = []
    for revision, reuse in (("1", ()), ("2", ("--reuse-wheel",))):
        # No compression and no CUDA kernels: this tests the packaging, not the
        # kernels, and `make deb-lint` checks the compressed release package.
        proc = sh(sys.executable, str(BUILD), "--version", f"{upstream()}-{revision}",
                  "--out", str(out), "--compress", "none", *reuse, timeout=900,
                  env={**os.environ, "FEDGE_CUDA": "OFF"})
        built.append(Path(proc.stdout.strip().splitlines()[-1]))
    try:
        yield built[0], built[1]
    finally:
        if dpkg_status():
            sh("dpkg", "--purge", "fedge", check=False)


def test_deb_is_named_and_described_as_debian_expects(debs: tuple[Path, Path]) -> None:
    v1 = debs[0]
    assert v1.name == f"fedge_{upstream()}-1_amd64.deb"
    fields = sh("dpkg-deb", "--field", str(v1)).stdout
    assert f"Version: {upstream()}-1" in fields and "Architecture: amd64" in fields
    assert re.search(r"^Depends: .*python3\.11.*adduser", fields, re.M)
    contents = sh("dpkg-deb", "--contents", str(v1)).stdout
    for path in ("./usr/bin/fedge -> ../lib/fedge/bin/fedge",
                 *(f"./lib/systemd/system/{unit}" for unit in UNITS),
                 "./etc/fedge/agent.toml", "./etc/fedge/serve.env",
                 "./usr/share/doc/fedge/copyright",
                 "./usr/share/doc/fedge/configuration.md"):
        assert path in contents, path
    assert "build/deb" not in contents
    print(f"package size: {v1.stat().st_size / 2**20:.1f} MiB")


def test_install_upgrade_remove_purge(debs: tuple[Path, Path]) -> None:
    v1, v2 = debs
    # -- install
    sh("dpkg", "--force-unsafe-io", "-i", str(v1))
    assert installed_version() == f"{upstream()}-1"
    assert sh("fedge", "--version").stdout.strip() == f"fedge {upstream()}"
    assert os.readlink("/usr/lib/fedge/bin/python3") == "../../../bin/python3.11"
    assert os.path.realpath("/usr/lib/fedge/bin/python") == os.path.realpath("/usr/bin/python3")
    sh("/usr/lib/fedge/bin/python", "-c", "import fedge._core, fedge.health, fedge.systemd, "
       "torch, zmq, onnxruntime, systemd.daemon", cwd="/")
    user = pwd.getpwnam("fedge")
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_dir == "/var/lib/fedge"
    assert user.pw_uid < 1000 and grp.getgrgid(user.pw_gid).gr_name == "fedge"
    st = os.stat("/var/lib/fedge")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.pw_uid, 0o700)
    for path in ("/var/lib/fedge-credentials", "/var/lib/fedge-credentials/agent",
                 "/etc/fedge/credentials/coordinator"):
        cred = os.stat(path)
        assert (cred.st_uid, stat.S_IMODE(cred.st_mode)) == (0, 0o700), path
    conffiles = sh("dpkg-query", "-W", "-f=${Conffiles}", "fedge").stdout
    for conffile in ("/etc/fedge/agent.toml", "/etc/fedge/coordinator.toml",
                     "/etc/fedge/serve.env"):
        assert conffile in conffiles, conffile
    # the health report runs from the installed tree, as the service user would
    health = sh("/usr/lib/fedge/bin/python", "-m", "fedge.health", "--state-dir", "/var/lib/fedge",
                "--allow-cpu-only", check=False, cwd="/")
    assert "host:" in health.stdout, health.stderr

    # -- the installed units as systemd judges them: no warning at all
    unit_paths = [f"/lib/systemd/system/{u}" for u in UNITS]
    verify = sh("systemd-analyze", "verify", "--man=no", *unit_paths, check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "" and verify.stdout.strip() == "", (
        verify.stdout + verify.stderr)
    for unit in ("fedge-agent.service", "fedge-serve.service"):
        security = sh("systemd-analyze", "security", "--offline=true", "--no-pager",
                      f"/lib/systemd/system/{unit}")
        exposure = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)",
                                   security.stdout).group(1))
        print(f"{unit} exposure: {exposure}")
        assert exposure <= 2.0

    # -- state and local configuration an upgrade must keep
    marker = Path("/var/lib/fedge/identity.marker")
    marker.write_text("appliance identity\n")
    os.chown(marker, user.pw_uid, user.pw_gid)
    with open("/etc/fedge/agent.toml", "a") as fh:
        fh.write('\n[agent]\nsite = "hospital-test"\n')
    secret = Path("/var/lib/fedge-credentials/agent/curve.key")
    secret.write_text("z85-secret")
    secret.chmod(0o600)
    # where packages before 0.1.0-2's kept it: the upgrade moves it
    old_place = Path("/etc/fedge/credentials/agent")
    old_place.mkdir(mode=0o700)
    (old_place / "identity.key").write_text("ed25519-secret")

    # -- upgrade to the rebuilt, higher version
    sh("dpkg", "--force-unsafe-io", "--force-confold", "-i", str(v2))
    assert installed_version() == f"{upstream()}-2"
    sh("dpkg", "--compare-versions", f"{upstream()}-2", "gt", f"{upstream()}-1")
    assert marker.read_text() == "appliance identity\n" and marker.stat().st_uid == user.pw_uid
    assert 'site = "hospital-test"' in Path("/etc/fedge/agent.toml").read_text()
    assert secret.read_text() == "z85-secret"
    moved = secret.parent / "identity.key"
    assert moved.read_text() == "ed25519-secret" and stat.S_IMODE(moved.stat().st_mode) == 0o600
    assert not old_place.exists()
    assert pwd.getpwnam("fedge").pw_uid == user.pw_uid
    assert sh("fedge", "--version").stdout.strip() == f"fedge {upstream()}"

    # -- remove: the program goes, data, configuration and the user stay
    sh("dpkg", "--force-unsafe-io", "--remove", "fedge")
    assert dpkg_status() == "deinstall ok config-files"
    assert not Path("/usr/lib/fedge").exists() and not Path("/usr/bin/fedge").is_symlink()
    assert not Path("/lib/systemd/system/fedge-agent.service").exists()
    assert marker.exists() and secret.exists()
    assert 'site = "hospital-test"' in Path("/etc/fedge/agent.toml").read_text()
    assert pwd.getpwnam("fedge")
    if shutil.which("deb-systemd-helper"):  # masked, as debhelper packages are
        for unit in UNITS:
            assert os.readlink(f"/etc/systemd/system/{unit}") == "/dev/null", unit

    # -- purge: everything goes
    sh("dpkg", "--purge", "fedge")
    assert dpkg_status() == ""
    for path in ("/var/lib/fedge", "/var/lib/fedge-coordinator", "/var/lib/fedge-credentials",
                 "/var/cache/fedge-coordinator", "/var/cache/fedge-serve", "/var/log/fedge",
                 "/etc/fedge", "/usr/lib/fedge",
                 *(f"/etc/systemd/system/{unit}" for unit in UNITS)):
        assert not Path(path).exists() and not Path(path).is_symlink(), path
    with pytest.raises(KeyError):
        pwd.getpwnam("fedge")
    with pytest.raises(KeyError):
        grp.getgrnam("fedge")
