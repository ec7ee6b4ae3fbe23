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
