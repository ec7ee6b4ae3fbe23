"""The maintainer scripts as dpkg calls them: POSIX sh, known actions only, conffiles listed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

DEBIAN = Path(__file__).resolve().parents[2] / "packaging" / "debian"
SCRIPTS = ("postinst", "prerm", "postrm")


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_as_posix_sh_and_stop_on_errors(script: str) -> None:
    path = DEBIAN / script
    assert path.read_text().startswith("#!/bin/sh\n")
    assert "\nset -e\n" in path.read_text()
    proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_action_is_refused_and_named(script: str) -> None:
    proc = subprocess.run(["sh", str(DEBIAN / script), "frobnicate"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert f"{script} called with unknown argument 'frobnicate'" in proc.stderr


def test_only_purge_deletes_state() -> None:
    postrm = (DEBIAN / "postrm").read_text()
    remove = postrm.split("    remove)", 1)[1].split(";;", 1)[0]
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    assert "rm -rf" not in remove and "userdel" not in remove
    assert "rm -rf /var/lib/fedge /var/log/fedge /etc/fedge/credentials" in purge
    postinst = (DEBIAN / "postinst").read_text()
    # state directories are created only when missing: an upgrade never resets them
    assert "if [ ! -d /var/lib/fedge ]; then" in postinst


def test_abort_actions_succeed_without_side_effects(tmp_path: Path) -> None:
    for script, action in (("postinst", "abort-upgrade"), ("prerm", "upgrade"),
                           ("postrm", "abort-install"), ("postrm", "upgrade")):
        proc = subprocess.run(["sh", str(DEBIAN / script), action], capture_output=True,
                              text=True, timeout=30, cwd=tmp_path)
        assert proc.returncode == 0, (script, action, proc.stderr)
        assert list(tmp_path.iterdir()) == []


def test_purge_cleans_every_units_enable_symlinks(tmp_path: Path) -> None:
    """postrm purge's unit loop, run for real against a stand-in /etc and
    deb-systemd-helper: the helper purges each unit the package ships (guarded by
    -x, as debhelper does), and links left by `systemctl enable` are removed."""
    postrm = (DEBIAN / "postrm").read_text()
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    loop = purge[purge.index("for unit in"):purge.index("done") + len("done")]
    units = sorted(p.name for p in (DEBIAN.parent / "systemd").glob("*.service"))
    assert loop.split("\n", 1)[0].split("in", 1)[1].strip(" ;do").split() == units
    assert "if [ -x /usr/bin/deb-systemd-helper ]; then" in loop
    helper, calls = tmp_path / "deb-systemd-helper", tmp_path / "calls"
    helper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    helper.chmod(0o755)
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    for unit in units:
        (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")  # dangling, as after remove
    (wants / "ssh.service").symlink_to("/lib/systemd/system/ssh.service")
    script = (loop.replace("/usr/bin/deb-systemd-helper", str(helper))
              .replace("deb-systemd-helper purge", f"{helper} purge")
              .replace("/etc/systemd/system", str(tmp_path / "etc/systemd/system")))
    proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert calls.read_text().split("\n")[:-1] == [f"purge {u}" for u in units]
    assert sorted(p.name for p in wants.iterdir()) == ["ssh.service"]
    helper.unlink()  # no deb-systemd-helper (init-system-helpers gone): still fine
    for unit in units:
        (wants / unit).symlink_to(f"/lib/systemd/system/{unit}")
    proc = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and sorted(p.name for p in wants.iterdir()) == ["ssh.service"]


def test_make_installs_the_python_headers_the_core_and_systemd_python_build_against() -> None:
    root = DEBIAN.parents[1]
    makefile = (root / "Makefile").read_text()
    block = makefile.split("APT_PKGS :=", 1)[1].split("\n")
    pkgs: list[str] = []
    for line in block:
        pkgs += line.rstrip("\\").split()
        if not line.rstrip().endswith("\\"):
            break
    assert "Development.Module" in (root / "CMakeLists.txt").read_text()
    assert {"python3-dev", "libsystemd-dev", "python3-venv"} <= set(pkgs), pkgs
