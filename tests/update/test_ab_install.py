"""A/B install: versioned slots, atomic switch, health check over a real notify
socket, and rollback by itself when the new version is unhealthy."""

import io
import json
import tarfile
import time

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
