"""A/B install: versioned slots, atomic switch, health check over a real notify
socket, and rollback by itself when the new version is unhealthy."""

import io
import json
import re
import tarfile
import time
from pathlib import Path

import pytest

from fedge.update.ab import HealthCheckFailed, NotifyProcessService, SlotInstaller

# The service a bundle runs: the real agent would call fedge.systemd.Notifier; this
# stand-in speaks the same sd_notify datagrams, then behaves as its MODE says.
SERVICE = r'''
import os, socket, sys, time
mode = sys.argv[1]
version = sys.argv[2]
with open(os.environ["FEDGE_TEST_RUNNING"], "a") as f:
    f.write(version + "\n")
def notify(msg):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), os.environ["NOTIFY_SOCKET"])
    s.close()
if mode == "crash":
    sys.exit(3)
notify("READY=1\nSTATUS=up")
if mode == "no-heartbeat":
    time.sleep(60)
while True:
    notify("WATCHDOG=1")
    time.sleep(0.2)
'''


def bundle(tmp_path, version: str, mode: str) -> bytes:
    files = {
        "fedge-bundle.json": json.dumps(
            {"version": version, "exec": ["{python}", "service.py", mode, version]}).encode(),
        "service.py": SERVICE.encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def service(tmp_path, monkeypatch):
    running = tmp_path / "running.log"
    monkeypatch.setenv("FEDGE_TEST_RUNNING", str(running))
    svc = NotifyProcessService(stop_timeout_s=2.0)
    svc.running_log = running
    yield svc
    svc.close()


def write_bundle(tmp_path, version, mode):
    path = tmp_path / f"fedge-{version}.tar.gz"
    path.write_bytes(bundle(tmp_path, version, mode))
    return path


def test_healthy_update_switches_slot_and_keeps_previous(tmp_path, service):
    slots = SlotInstaller(tmp_path / "software")
    slots.install_and_switch("1.0.0", write_bundle(tmp_path, "1.0.0", "good"), service,
                             deadline_s=10)
    slots.install_and_switch("1.1.0", write_bundle(tmp_path, "1.1.0", "good"), service,
                             deadline_s=10)
    assert slots.current_version() == "1.1.0"
    assert slots.previous_version() == "1.0.0"
    assert (tmp_path / "software" / "current").is_symlink()
    assert service.running_log.read_text().split() == ["1.0.0", "1.1.0"]


@pytest.mark.parametrize(("mode", "why"), [("crash", "exited with status 3"),
                                           ("no-heartbeat", "no heartbeat within")])
def test_unhealthy_update_rolls_back_by_itself(tmp_path, service, mode, why):
    slots = SlotInstaller(tmp_path / "software")
    slots.install_and_switch("1.0.0", write_bundle(tmp_path, "1.0.0", "good"), service,
                             deadline_s=10)
    t0 = time.monotonic()
    with pytest.raises(HealthCheckFailed, match=why) as info:
        slots.install_and_switch("1.1.0", write_bundle(tmp_path, "1.1.0", mode), service,
                                 deadline_s=5)
    assert info.value.rolled_back
    assert "rolled back to 1.0.0" in str(info.value)
    assert time.monotonic() - t0 < 20  # no hang: deadline 5 s for each of two starts
    assert slots.current_version() == "1.0.0"
    assert service.pid is not None  # the old version runs again, and was healthy
    assert service.running_log.read_text().split() == ["1.0.0", "1.1.0", "1.0.0"]


def test_first_install_unhealthy_has_nothing_to_roll_back_to(tmp_path, service):
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(HealthCheckFailed, match="no previous version") as info:
        slots.install_and_switch("1.0.0", write_bundle(tmp_path, "1.0.0", "crash"), service,
                                 deadline_s=2)
    assert not info.value.rolled_back


def test_bad_bundles_are_refused_before_anything_switches(tmp_path, service):
    slots = SlotInstaller(tmp_path / "software")
    junk = tmp_path / "fedge-2.0.0.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="cannot be unpacked"):
        slots.install_and_switch("2.0.0", junk, service, deadline_s=1)
    odd = tmp_path / "fedge.rpm"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown type"):
        slots.unpack("2.0.0", odd)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    bad = tmp_path / "evil.tar.gz"
    bad.write_bytes(evil.getvalue())
    with pytest.raises(ValueError, match="cannot be unpacked"):
        slots.unpack("2.0.1", bad)
    assert not (tmp_path / "escape.txt").exists()
    assert slots.current_version() is None


def test_unpacking_over_the_running_slot_is_refused_and_leaves_it_untouched(tmp_path):
    slots = SlotInstaller(tmp_path / "software")
    slots.unpack("2.0.0", write_bundle(tmp_path, "2.0.0", "good"))
    slots.switch("2.0.0")
    running = tmp_path / "software" / "slots" / "2.0.0" / "open-by-the-running-agent"
    running.write_text("x")
    inode = running.parent.stat().st_ino
    with pytest.raises(ValueError, match=r"2\.0\.0 is the current slot"):
        slots.unpack("2.0.0", write_bundle(tmp_path, "2.0.0", "crash"))
    assert running.exists() and running.parent.stat().st_ino == inode
    assert slots.current_version() == "2.0.0" and slots.previous_version() is None


def test_signed_software_update_that_fails_health_rolls_back_and_is_audited(
        tmp_path, fleet, service):
    fleet.publish("software", "fedge", "1.0.0", "fedge-1.0.0.tar.gz",
                  bundle(tmp_path, "1.0.0", "good"))
    [spec] = fleet.updater.pending()
    assert fleet.updater.install(spec, service=service, health_deadline_s=10).ok
    fleet.publish("software", "fedge", "1.1.0", "fedge-1.1.0.tar.gz",
                  bundle(tmp_path, "1.1.0", "crash"))
    [spec] = fleet.updater.pending()
    outcome = fleet.updater.install(spec, service=service, health_deadline_s=10)
    assert not outcome.ok and outcome.rolled_back
    assert "rolled back to 1.0.0" in outcome.detail
    assert fleet.updater.installed() == {"software/fedge": "1.0.0"}
    audit = fleet.updater.audit_log()
    assert [(a["version"], a["ok"], a["rolled_back"]) for a in audit] == [
        ("1.0.0", True, False), ("1.1.0", False, True)]


def test_wheel_bundle_unpacks_into_site_packages_with_a_default_manifest(tmp_path):
    import zipfile

    from fedge.update.ab import slot_command

    whl = tmp_path / "fedge-1.2.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("fedge/__init__.py", "__version__ = '1.2.0'\n")
    slots = SlotInstaller(tmp_path / "software")
    slot = slots.unpack("1.2.0", whl)
    assert (slot / "site-packages" / "fedge" / "__init__.py").exists()
    argv, env = slot_command(slot)
    assert argv[1:] == ["-m", "fedge.cli", "agent", "--config", "/etc/fedge/agent.toml"]
    assert env["PYTHONPATH"] == str(slot.resolve() / "site-packages")
    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.py", "x")
    with pytest.raises(ValueError, match="escapes the slot"):
        slots.unpack("1.3.0", evil)


def deb(path, members) -> None:
    """A .deb (ar: debian-binary, control.tar.xz, data.tar.xz) whose data archive
    holds `members`: (TarInfo, bytes) pairs, written as given."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for info, payload in members:
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:xz") as tar:
        text = b"Package: fedge\nVersion: 3.0.0\nArchitecture: all\nMaintainer: x <x@x>\n"
        info = tarfile.TarInfo("./control")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))

    def ar_member(name: str, payload: bytes) -> bytes:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(payload):<10}`\n".encode()
        return header + payload + (b"\n" if len(payload) % 2 else b"")

    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
                     + ar_member("control.tar.xz", control.getvalue())
                     + ar_member("data.tar.xz", data.getvalue()))


def member(name: str, *, mode: int = 0o644, link: str | None = None):
    info = tarfile.TarInfo(name)
    info.mode = mode
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
    return info


needs_dpkg = pytest.mark.skipif(__import__("shutil").which("dpkg-deb") is None,
                                reason="dpkg-deb is not installed")


@needs_dpkg
@pytest.mark.parametrize("link", ["/etc/shadow", "../../outside"],
                         ids=["absolute", "escaping"])
def test_a_deb_with_a_link_out_of_its_slot_is_refused_and_writes_nothing(tmp_path, link):
    """A .deb goes through the same member checks as a .tar.gz: `dpkg-deb -x` kept
    a link to /etc/shadow, or out of the slot, for the slot's software to follow."""
    outside = tmp_path / "software" / "outside"
    outside.mkdir(parents=True)
    manifest = json.dumps({"version": "3.0.0", "exec": ["true"]}).encode()
    path = tmp_path / "fedge-3.0.0.deb"
    deb(path, [(member("./fedge-bundle.json"), manifest),
               (member("./esc", link=link), b"")])
    slots = SlotInstaller(tmp_path / "software")
    with pytest.raises(ValueError, match=r"fedge-3\.0\.0\.deb' cannot be unpacked: './esc'"):
        slots.unpack("3.0.0", path)
    assert list(outside.iterdir()) == []
    assert not (slots.slots / "3.0.0").exists() and list(slots.slots.iterdir()) == []


@needs_dpkg
def test_a_deb_unpacks_into_its_slot_without_setuid_bits(tmp_path):
    manifest = json.dumps({"version": "3.0.0", "exec": ["./bin/fedge"]}).encode()
    path = tmp_path / "fedge-3.0.0.deb"
    deb(path, [(member("./fedge-bundle.json"), manifest),
               (member("./bin/fedge", mode=0o4755), b"#!/bin/sh\n"),
               (member("./bin/helper", mode=0o2775), b"#!/bin/sh\n"),
               (member("./lib/here", link="../bin/fedge"), b"")])
    slot = SlotInstaller(tmp_path / "software").unpack("3.0.0", path)
    assert (slot / "bin" / "fedge").stat().st_mode & 0o7777 == 0o755
    assert (slot / "bin" / "helper").stat().st_mode & 0o7777 == 0o755
    assert (slot / "lib" / "here").resolve() == (slot / "bin" / "fedge").resolve()


def test_a_slot_that_does_not_match_its_manifests_hashes_is_refused_before_switching(
        tmp_path, service):
    """A bundle from firmware/make_bundle.py lists every file's sha256: the unpacked
    slot is checked against it before it is kept, so an altered, missing or extra
    file refuses the bundle and nothing switches."""
    import hashlib

    good = b"print('ok')\n"

    def made(files: dict[str, bytes], listed: dict[str, bytes]) -> Path:
        manifest = {"format": 1, "version": "4.0.0", "exec": ["{python}", "app.py"],
                    "env": {}, "files": {n: hashlib.sha256(d).hexdigest()
                                         for n, d in listed.items()}}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in {"fedge-bundle.json": json.dumps(manifest).encode(),
                               **files}.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        out = tmp_path / "fedge-4.0.0.tar.gz"
        out.write_bytes(buf.getvalue())
        return out

    slots = SlotInstaller(tmp_path / "software")
    for files, why in [({"app.py": b"print('altered')\n"}, "app.py does not match its sha256"),
                       ({}, "app.py, listed in fedge-bundle.json, is missing"),
                       ({"app.py": good, "extra.py": b"x"}, r"not listed .*\['extra.py'\]")]:
        with pytest.raises(ValueError, match=why):
            slots.install_and_switch("4.0.0", made(files, {"app.py": good}), service,
                                     deadline_s=1)
        assert slots.current_version() is None and list(slots.slots.iterdir()) == []
    assert slots.unpack("4.0.0", made({"app.py": good}, {"app.py": good})).is_dir()


def test_a_slot_with_a_symlink_its_manifest_does_not_list_is_refused(tmp_path):
    """Links inside the slot pass tarfile's "data" filter, but a bundle from
    firmware/make_bundle.py never has one: a link is an entry like any file, so an
    unlisted one refuses the bundle even when it points at a listed directory (a
    walk that asks is_dir() follows it and took it for a directory)."""
    import hashlib

    from fedge.update.ab import verify_slot

    data = b"weights"
    slot = tmp_path / "slot"
    (slot / "data").mkdir(parents=True)
    (slot / "data" / "a.bin").write_bytes(data)
    (slot / "fedge-bundle.json").write_text(json.dumps(
        {"format": 1, "version": "4.0.0", "exec": ["{python}"],
         "files": {"data/a.bin": hashlib.sha256(data).hexdigest()}}))
    verify_slot(slot)  # as made: passes
    (slot / "alias").symlink_to("data")
    with pytest.raises(ValueError, match=re.escape(
            "files not listed in fedge-bundle.json: ['alias']")):
        verify_slot(slot)
    (slot / "alias").unlink()
    (slot / "data" / "a.bin").rename(tmp_path / "a.bin")  # the same bytes, elsewhere
    (slot / "data" / "a.bin").symlink_to(tmp_path / "a.bin")
    with pytest.raises(ValueError, match=re.escape(
            "data/a.bin, listed in fedge-bundle.json, is a symlink")):
        verify_slot(slot)
