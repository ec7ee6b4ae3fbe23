"""firmware/make_bundle.py: bundles that fedge.update.ab really installs, A/B, with rollback."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from fedge.update.ab import HealthCheckFailed, NotifyProcessService, SlotInstaller

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_bundle", REPO / "firmware/make_bundle.py")
mb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mb)

APP = textwrap.dedent(
    """
    import asyncio, sys
    from fedge.systemd import run_service

    async def main(shutdown, notifier):
        if open("mode.txt").read().strip() == "broken":
            raise SystemExit(3)  # a release that cannot start
        notifier.ready("serving")
        await shutdown.wait()

    sys.exit(run_service("bundle-app", main))
    """
)


def payload(tmp: Path, mode: str) -> Path:
    root = tmp / f"payload-{mode}"
    (root / "lib").mkdir(parents=True)
    (root / "app.py").write_text(APP)
    (root / "mode.txt").write_text(mode + "\n")
    (root / "lib" / "model.onnx").write_bytes(os.urandom(64))
    tool = root / "lib" / "tool.sh"
    tool.write_text("#!/bin/sh\necho ok\n")
    tool.chmod(0o755)
    return root


def bundle(tmp: Path, mode: str, version: str) -> Path:
    out = tmp / f"fedge-{version}.tar.gz"
    mb.make_bundle(payload(tmp, mode), version, out, exec_argv=["{python}", "app.py"],
                   env={"WATCHDOG_USEC": "200000"})
    return out


def test_bundles_install_a_b_and_roll_back_on_a_broken_release(tmp_path: Path) -> None:
    slots = SlotInstaller(tmp_path / "software")
    service = NotifyProcessService(stop_timeout_s=10)
    try:
        slots.install_and_switch("1.0.0", bundle(tmp_path, "good", "1.0.0"), service,
                                 deadline_s=30)
        assert slots.current_version() == "1.0.0"
        assert mb.verify_slot(tmp_path / "software/slots/1.0.0")["version"] == "1.0.0"
        with pytest.raises(HealthCheckFailed) as info:
            slots.install_and_switch("1.1.0", bundle(tmp_path, "broken", "1.1.0"), service,
                                     deadline_s=30)
        assert info.value.rolled_back
        assert slots.current_version() == "1.0.0"
    finally:
        service.close()


def test_archive_is_reproducible_and_normalised(tmp_path: Path) -> None:
    src = payload(tmp_path, "good")
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    mb.make_bundle(src, "2.0.0", a)
    os.utime(src / "app.py", (1, 1))  # mtimes must not matter
    mb.make_bundle(src, "2.0.0", b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    with tarfile.open(a) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert next(iter(members)) == "fedge-bundle.json"
    assert {(m.uid, m.gid, m.mtime) for m in members.values()} == {(0, 0, 0)}
    assert members["lib/tool.sh"].mode == 0o755 and members["app.py"].mode == 0o644
    assert members["lib"].isdir()


def test_verify_slot_catches_tampering_and_extra_files(tmp_path: Path) -> None:
    slots = SlotInstaller(tmp_path / "software")
    slot = slots.unpack("1.0.0", bundle(tmp_path, "good", "1.0.0"))
    manifest = mb.verify_slot(slot)
    assert set(manifest["files"]) == {"app.py", "mode.txt", "lib/model.onnx", "lib/tool.sh"}
    (slot / "mode.txt").write_text("broken\n")
    with pytest.raises(mb.BundleError, match=re.escape("mode.txt does not match its sha256")):
        mb.verify_slot(slot)
    (slot / "mode.txt").write_text("good\n")
    (slot / "lib" / "implant.so").write_bytes(b"\x7fELF")
    with pytest.raises(mb.BundleError, match=re.escape(
            "files not listed in fedge-bundle.json: ['lib/implant.so']")):
        mb.verify_slot(slot)
    (slot / "lib" / "implant.so").unlink()
    (slot / "app.py").unlink()
    with pytest.raises(mb.BundleError, match=re.escape(
            "app.py, listed in fedge-bundle.json, is missing")):
        mb.verify_slot(slot)
    with pytest.raises(mb.BundleError, match=re.escape("bad or missing fedge-bundle.json")):
        mb.verify_slot(tmp_path)


def test_verify_is_the_appliances_own_check_and_also_wants_a_manifest(tmp_path: Path) -> None:
    """--verify runs fedge.update.ab.verify_slot, so it refuses what the appliance
    refuses: a listed file that is a symlink (even to the same bytes), a link or a
    fedge-bundle.json below the top level that the manifest does not list. A slot
    without a table of hashes (a .whl's) the appliance takes unchecked; --verify
    cannot vouch for it and says so."""
    from fedge.update.ab import verify_slot

    slot = SlotInstaller(tmp_path / "software").unpack("1.0.0", bundle(tmp_path, "good",
                                                                       "1.0.0"))
    (slot / "mode.txt").rename(tmp_path / "mode.txt")
    (slot / "mode.txt").symlink_to(tmp_path / "mode.txt")
    with pytest.raises(mb.BundleError, match=re.escape(
            "mode.txt, listed in fedge-bundle.json, is a symlink")):
        mb.verify_slot(slot)
    (slot / "mode.txt").unlink()
    (tmp_path / "mode.txt").rename(slot / "mode.txt")
    for name, make in [("lib/fedge-bundle.json", lambda p: p.write_text("{}")),
                       ("dangling", lambda p: p.symlink_to(tmp_path / "nowhere"))]:
        make(slot / name)
        with pytest.raises(mb.BundleError, match=re.escape(f"not listed in fedge-bundle.json: "
                                                           f"[{name!r}]")):
            mb.verify_slot(slot)
        (slot / name).unlink()
    assert mb.verify_slot(slot) == verify_slot(slot)

    wheel_like = tmp_path / "wheel-slot"
    wheel_like.mkdir()
    (wheel_like / "fedge-bundle.json").write_text('{"version": "1.0.0", "exec": ["x"]}')
    assert verify_slot(wheel_like) is None
    with pytest.raises(mb.BundleError, match=re.escape("fedge-bundle.json has no files table")):
        mb.verify_slot(wheel_like)


def test_bad_inputs_are_refused_with_the_reason(tmp_path: Path) -> None:
    src = payload(tmp_path, "good")
    out = tmp_path / "x.tar.gz"
    with pytest.raises(mb.BundleError, match=re.escape("version 'latest' is not MAJOR.MINOR")):
        mb.make_bundle(src, "latest", out)
    with pytest.raises(mb.BundleError, match="exec \\[\\] must be a non-empty list"):
        mb.make_bundle(src, "1.0.0", out, exec_argv=[])
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(mb.BundleError, match="payload link: symlinks are not allowed"):
        mb.make_bundle(src, "1.0.0", out)
    (src / "link").unlink()
    (src / "fedge-bundle.json").write_text("{}")
    with pytest.raises(mb.BundleError, match=re.escape("already contains fedge-bundle.json")):
        mb.make_bundle(src, "1.0.0", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(mb.BundleError, match="has no files"):
        mb.make_bundle(empty, "1.0.0", out)
    assert not out.exists()  # nothing half-written


def test_command_line(tmp_path: Path) -> None:
    src = payload(tmp_path, "good")
    out = tmp_path / "cli.tar.gz"
    tool = str(REPO / "firmware/make_bundle.py")
    made = subprocess.run([sys.executable, tool, "--version", "3.1.0", "--payload", str(src),
                           "--out", str(out), "--env", "A=b"], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    assert f"version 3.1.0, 4 files, sha256 {hashlib.sha256(out.read_bytes()).hexdigest()}" in (
        made.stdout)
    slot = SlotInstaller(tmp_path / "sw").unpack("3.1.0", out)
    checked = subprocess.run([sys.executable, tool, "--verify", str(slot)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and "4 files match" in checked.stdout
    bad = subprocess.run([sys.executable, tool, "--version", "3", "--payload", str(src),
                          "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "version '3' is not" in bad.stderr


def test_the_documented_exec_line_is_one_string_and_site_packages_gets_its_pythonpath(
        tmp_path: Path) -> None:
    """The usage's `--exec '{python} -m fedge.cli agent run --config …'` is taken as
    the slot's command, and a payload with site-packages/ runs the bundle's own code:
    PYTHONPATH=site-packages unless --env names another."""
    src = tmp_path / "payload"
    (src / "site-packages" / "fedge").mkdir(parents=True)
    (src / "site-packages" / "fedge" / "__init__.py").write_text("__version__ = '9.0.0'\n")
    tool = str(REPO / "firmware/make_bundle.py")

    def bundle(*extra: str) -> dict:
        out = tmp_path / "b.tar.gz"
        made = subprocess.run([sys.executable, tool, "--version", "9.0.0", "--payload",
                               str(src), "--out", str(out), *extra], capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        slot = SlotInstaller(tmp_path / f"sw{len(extra)}").unpack("9.0.0", out)
        return json.loads((slot / "fedge-bundle.json").read_text())

    made = bundle("--exec", "{python} -m fedge.cli agent run --config '/etc/my fedge/a.toml'")
    assert made["exec"] == ["{python}", "-m", "fedge.cli", "agent", "run", "--config",
                            "/etc/my fedge/a.toml"]
    assert made["env"] == {"PYTHONPATH": "site-packages"}
    assert bundle()["exec"] == ["{python}", "-m", "fedge.cli", "agent", "run", "--config",
                                "/etc/fedge/agent.toml"]
    assert bundle("--env", "PYTHONPATH=lib", "--env", "A=b")["env"] == {
        "A": "b", "PYTHONPATH": "lib"}
