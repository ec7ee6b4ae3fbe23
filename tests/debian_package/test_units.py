"""The systemd units as systemd itself judges them (fast: no package build)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "packaging" / "systemd"

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed")


def exposure(unit: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


def test_agent_exposure_is_at_most_2() -> None:
    assert exposure(UNITS / "fedge-agent.service") <= 2.0


def test_coordinator_exposure_is_at_most_2() -> None:
    assert exposure(UNITS / "fedge-coordinator.service") <= 2.0


def test_serve_exposure_is_at_most_2() -> None:
    assert exposure(UNITS / "fedge-serve.service") <= 2.0


def test_security_threshold_flag_agrees() -> None:
    # systemd-analyze itself fails the unit above the threshold (exposure x 10).
    ok = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20",
                         "--no-pager", str(UNITS / "fedge-agent.service")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout[-2000:]
    strict = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=5",
                             "--no-pager", str(UNITS / "fedge-agent.service")],
                            capture_output=True, text=True, timeout=60)
    assert strict.returncode != 0  # the check can fail: the agent is above 0.5


def unit_settings(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


DAEMONS = ["fedge-agent.service", "fedge-coordinator.service", "fedge-serve.service"]


@pytest.mark.parametrize("name", DAEMONS)
def test_units_have_the_required_settings(name: str) -> None:
    s = unit_settings(UNITS / name)
    required = {
        "Type": ["notify"], "NotifyAccess": ["main"], "Restart": ["on-failure"],
        "ProtectSystem": ["strict"], "CapabilityBoundingSet": [""],
        "User": ["fedge"], "Group": ["fedge"], "UMask": ["0077"], "NoNewPrivileges": ["yes"],
    }
    for key, value in required.items():
        assert s.get(key) == value, (key, s.get(key))
    assert s["WatchdogSec"] == ["60s"] and s["SystemCallFilter"][0] == "@system-service"
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    if name == "fedge-serve.service":  # no secrets, no state of its own: see below
        assert "LoadCredential" not in s and "StateDirectory" not in s
        assert s["ExecStart"][0].startswith("/usr/bin/fedge serve ")
        return
    assert s["ConfigurationDirectory"] == ["fedge"] and s["LogsDirectory"] == ["fedge"]
    assert s["LoadCredential"] == [{"fedge-agent.service": "fedge:/var/lib/fedge-credentials/agent",
                                    "fedge-coordinator.service":
                                        "fedge:/etc/fedge/credentials/coordinator"}[name]]
    if name == "fedge-agent.service":  # through the A/B slot launcher (signed updates)
        assert s["StateDirectory"] == ["fedge"]
        assert s["ExecStartPre"] == ["/usr/lib/fedge/bin/python -m fedge.update.ab preflight "
                                     "--root /var/lib/fedge/software"]
        assert s["ExecStart"][0].startswith("/usr/lib/fedge/bin/python -m fedge.update.ab exec "
                                            "--root /var/lib/fedge/software -- /usr/bin/fedge ")
    else:
        assert s["ExecStart"][0].startswith("/usr/bin/fedge ")


def test_agent_and_coordinator_keep_their_state_apart() -> None:
    """Both roles write roster.json and tuf/ in their state directory: sharing
    /var/lib/fedge made one host running both overwrite each other's (finding 9)."""
    agent = unit_settings(UNITS / "fedge-agent.service")
    coord = unit_settings(UNITS / "fedge-coordinator.service")
    assert agent["StateDirectory"] == ["fedge"]
    assert coord["StateDirectory"] == ["fedge-coordinator"]


def test_serve_unit_serves_the_agents_model_repository_and_nothing_else_of_its_state() -> None:
    """Finding 1: nothing ran `fedge serve`. The unit serves what the agent installs
    (its StateDirectory's models/), as the agent's user (UMask=0077 leaves the
    repository readable by fedge only), and sees no other file of the agent's."""
    agent = unit_settings(UNITS / "fedge-agent.service")
    serve = unit_settings(UNITS / "fedge-serve.service")
    state = "/var/lib/" + agent["StateDirectory"][0]
    repository = f"{state}/models"
    assert serve["ExecStart"] == [
        f"/usr/bin/fedge serve --repository {repository} --host ${{FEDGE_SERVE_HOST}} "
        "--port ${FEDGE_SERVE_PORT} $FEDGE_SERVE_ARGS"]
    assert (serve["User"], serve["Group"]) == (agent["User"], agent["Group"])
    assert serve["TemporaryFileSystem"] == [f"{state}:ro"]
    assert serve["BindReadOnlyPaths"] == [repository]
    assert serve["RequiresMountsFor"] == [state]
    assert serve["EnvironmentFile"] == ["-/etc/fedge/serve.env"]
    assert serve["PrivateDevices"] == ["yes"] and "DeviceAllow" not in serve
    assert "multi-user.target" in serve["WantedBy"]


def test_agent_is_ordered_after_the_unit_that_loads_nvidia_uvm() -> None:
    """Finding 7: DeviceAllow=char-nvidia-uvm is resolved against /proc/devices when
    the agent's cgroup is set up; with nvidia_uvm not loaded yet the group was
    dropped. A unit of its own loads it first (an ExecStartPre=+ in the agent would
    run too late and still under its DevicePolicy=)."""
    agent = unit_settings(UNITS / "fedge-agent.service")
    uvm = unit_settings(UNITS / "fedge-nvidia-uvm.service")
    assert "fedge-nvidia-uvm.service" in agent["Wants"]
    assert "fedge-nvidia-uvm.service" in agent["After"]
    assert not any("nvidia-modprobe" in cmd for cmd in agent.get("ExecStartPre", []))
    assert uvm["Type"] == ["oneshot"] and uvm["RemainAfterExit"] == ["yes"]
    # "-": a failing or missing nvidia-modprobe (no GPU, no driver) fails nothing
    assert uvm["ExecStart"] == ["-/usr/bin/nvidia-modprobe -u -c=0"]
    assert uvm["ConditionPathExists"] == ["/usr/bin/nvidia-modprobe"]
    assert uvm["Before"] == ["fedge-agent.service"]
    assert "WantedBy" not in uvm  # pulled in by the agent only


def test_the_package_ships_every_unit_and_conffile() -> None:
    sys.path.insert(0, str(UNITS.parent))
    try:
        import build_deb
    finally:
        sys.path.remove(str(UNITS.parent))
    assert sorted(build_deb.UNITS) == sorted(p.name for p in UNITS.glob("*.service"))
    for conf in build_deb.CONFFILES:
        assert (UNITS.parent / "debian" / "etc" / conf).is_file(), conf
    assert "serve.env" in build_deb.CONFFILES


def test_only_the_agent_sees_the_gpus() -> None:
    agent = unit_settings(UNITS / "fedge-agent.service")
    coord = unit_settings(UNITS / "fedge-coordinator.service")
    assert agent["DevicePolicy"] == ["closed"]
    # By device group, never by path: a path absent when the unit starts (nvidia-uvm
    # is created lazily) is skipped, and CUDA then fails inside the service.
    assert sorted(agent["DeviceAllow"]) == ["char-nvidia-caps r", "char-nvidia-frontend rw",
                                            "char-nvidia-uvm rw"]
    assert coord["PrivateDevices"] == ["yes"] and "DeviceAllow" not in coord


def test_verify_in_a_root_with_the_fedge_command(tmp_path: Path) -> None:
    # systemd-analyze verify checks that ExecStart= exists and that every unit named
    # resolves: give it a root with the fedge command and this system's units.
    root = tmp_path / "root"
    (root / "lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    fedge = root / "usr/bin/fedge"
    fedge.write_text("#!/bin/sh\nexit 0\n")
    fedge.chmod(0o755)
    if not (root / "bin").exists():  # the units' ExecStartPre=/bin/sh -c ...
        (root / "bin").mkdir()
        shutil.copy(fedge, root / "bin/sh")
    python = root / "usr/lib/fedge/bin/python"  # the package's private venv
    python.parent.mkdir(parents=True)
    shutil.copy(fedge, python)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS.glob("*.service"):
        shutil.copy(unit, unit_dir / unit.name)
    out = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", "--generators=no",
         *(str(unit_dir / u.name) for u in UNITS.glob("*.service"))],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    # and the check can fail: a unit whose command is missing is reported
    fedge.unlink()
    python.unlink()
    for unit, command in (("fedge-coordinator.service", "/usr/bin/fedge"),
                          ("fedge-serve.service", "/usr/bin/fedge"),
                          ("fedge-agent.service", "/usr/lib/fedge/bin/python")):
        bad = subprocess.run(
            ["systemd-analyze", "verify", f"--root={root}", "--man=no", "--generators=no",
             str(unit_dir / unit)],
            capture_output=True, text=True, timeout=60,
        )
        assert bad.returncode != 0 and command in bad.stderr, (unit, bad.stderr)


def test_a_stop_waits_longer_than_a_request_may_take() -> None:
    """fedge serve lets requests in flight end when stopped; a half-sent one ends at
    its --request-timeout. A shorter TimeoutStopSec would SIGKILL the server first."""
    import argparse

    from fedge.serve.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    request_timeout = sub.choices["serve"].get_default("request_timeout")
    stop = unit_settings(UNITS / "fedge-serve.service")["TimeoutStopSec"]
    assert stop[0].endswith("s") and float(stop[0][:-1]) > request_timeout


def owned_by_the_service_user() -> set[Path]:
    """The directories systemd creates and hands to a unit's User= (StateDirectory=,
    CacheDirectory=, LogsDirectory=, RuntimeDirectory=; ConfigurationDirectory= stays
    root's), for every fedge unit."""
    roots = {"StateDirectory": "/var/lib", "CacheDirectory": "/var/cache",
             "LogsDirectory": "/var/log", "RuntimeDirectory": "/run"}
    owned = set()
    for unit in UNITS.glob("*.service"):
        s = unit_settings(unit)
        for key, root in roots.items():
            owned |= {Path(root) / name for value in s.get(key, []) for name in value.split()}
    return owned


def test_the_agents_keys_are_where_a_reimage_keeps_them_and_fedge_cannot_swap_them() -> None:
    """Finding 1: the keys were in /etc/fedge/credentials/agent, on / (unencrypted on the
    appliance, lost with a re-image of /). Not inside /var/lib/fedge either: the fedge
    user owns it and could rename a root-owned subdirectory and put a symlink in its
    place, and systemd reads LoadCredential= sources as root, following symlinks."""
    agent = unit_settings(UNITS / "fedge-agent.service")
    (source,) = [Path(v.split(":", 1)[1]) for v in agent["LoadCredential"]]
    assert source == Path("/var/lib/fedge-credentials/agent")
    assert Path("/etc") not in source.parents
    for owned in owned_by_the_service_user():
        assert owned != source and owned not in source.parents, owned
    # started only once the volume holding state and keys is mounted
    mounts = " ".join(agent["RequiresMountsFor"]).split()
    assert "/var/lib/fedge" in mounts and str(source.parent) in mounts


HOME_CACHES = {"fedge-coordinator.service": "fedge-coordinator",
               "fedge-serve.service": "fedge-serve"}


def unit_env(unit: Path, cache_root: str = "%C") -> dict[str, str]:
    """Environment= assignments as systemd sets them, %C (the cache root) replaced."""
    env: dict[str, str] = {}
    for line in unit_settings(unit).get("Environment", []):
        for word in shlex.split(line):
            key, value = word.split("=", 1)
            env[key] = value.replace("%C", cache_root)
    return env


@pytest.mark.parametrize("name, cache", HOME_CACHES.items())
def test_coordinator_and_serve_keep_what_libraries_write_under_home_in_their_cache(
        name: str, cache: str) -> None:
    """The fedge user's HOME is the agent's /var/lib/fedge, read-only (and for the
    server hidden) in these two units; matplotlib (the report's plots at the end of a
    job) and others then fail or fall back to a fresh temporary cache each run."""
    s = unit_settings(UNITS / name)
    assert s["CacheDirectory"] == [cache] and s["CacheDirectoryMode"] == ["0700"]
    env = unit_env(UNITS / name)
    assert env["HOME"] == env["XDG_CACHE_HOME"] == f"%C/{cache}"
    assert env["MPLCONFIGDIR"] == f"%C/{cache}/matplotlib"


def test_the_report_plots_write_only_into_the_coordinators_cache(tmp_path: Path) -> None:
    """matplotlib and onnxruntime run with the coordinator unit's environment (%C a
    scratch cache root, the CacheDirectory= made as systemd makes it): whatever they
    write lands in the unit's cache directory, nothing outside it."""
    cache_root = tmp_path / "var-cache"
    (cache_root / "fedge-coordinator").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR",
                        "ORT_DISABLE_TELEMETRY", "MPLBACKEND")}
    env.update(unit_env(UNITS / "fedge-coordinator.service", str(cache_root)))
    code = """
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.plot([0, 1], [1, 0])
plt.savefig(sys.argv[1])
import onnxruntime
"""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(out / "plot.png")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "is not a writable directory" not in proc.stderr  # matplotlib's fallback warning
    written = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    assert written - {Path("out/plot.png")}, "matplotlib cached nothing"
    outside = {p for p in written - {Path("out/plot.png")}
               if Path("var-cache/fedge-coordinator") not in p.parents}
    assert not outside, outside
    assert not any("Microsoft" in p.parts for p in written), written


@pytest.mark.parametrize("name", DAEMONS)
def test_every_daemon_starts_with_onnxruntime_telemetry_off(name: str) -> None:
    """onnxruntime's Linux build writes a device id under HOME and queues usage events
    for upload as soon as it is imported; only ORT_DISABLE_TELEMETRY=1 set before that
    stops it (fedge.serve sets it too, for onnxruntime imported through fedge)."""
    assert unit_env(UNITS / name)["ORT_DISABLE_TELEMETRY"] == "1"


def test_the_nvidia_uvm_unit_has_only_what_loading_a_module_and_mknod_need() -> None:
    """Finding 5: it ran as root with no sandbox (exposure 8.8). Three capabilities, a
    read-only system, no network, the @module calls on top of @system-service. What
    would break it stays off: a device list (DevicePolicy=, DeviceAllow=, PrivateDevices=,
    or ProtectClock=, which implies DeviceAllow=char-rtc) is resolved before nvidia_uvm
    exists and would forbid the mknod; ProtectKernelModules= forbids the load;
    ProcSubset=pid hides /proc/devices; PrivateUsers= takes real root away."""
    unit = UNITS / "fedge-nvidia-uvm.service"
    s = unit_settings(unit)
    assert s["CapabilityBoundingSet"] == ["CAP_SYS_MODULE CAP_MKNOD CAP_CHOWN"]
    assert s["AmbientCapabilities"] == [""] and "User" not in s
    assert s["SystemCallFilter"][0] == "@system-service @module"
    assert not any("@module" in f or "@chown" in f or "@privileged" in f
                   for f in s["SystemCallFilter"][1:])
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "PrivateNetwork": "yes", "ProtectKernelTunables": "yes",
                       "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
                       "RestrictSUIDSGID": "yes", "NoNewPrivileges": "yes",
                       "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
                       "SystemCallArchitectures": "native"}.items():
        assert s.get(key) == [value], (key, s.get(key))
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK"]
    for breaking in ("DevicePolicy", "DeviceAllow", "PrivateDevices", "ProtectClock",
                     "ProtectKernelModules", "ProcSubset", "PrivateUsers", "DynamicUser"):
        assert breaking not in s, breaking
    assert "ReadOnlyPaths" not in s and "InaccessiblePaths" not in s  # /dev stays writable
    assert exposure(unit) <= 2.5


def _bytes(value: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def _seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def test_serve_memory_is_capped_above_its_own_body_budget_and_start_waits_for_slow_checks() -> None:
    """One client could make fedge serve hold tens of GB of bodies (review servex, H2):
    the server caps buffered bodies; the unit caps the service, so the OOM killer ends
    fedge-serve, not the agent. READY=1 waits for the first load, whose versions each
    get --load-timeout in a child: the start limit leaves room for several."""
    from fedge.serve.runtime import DEFAULT_LOAD_TIMEOUT_S
    from fedge.serve.server import DEFAULT_MAX_BUFFERED_BODY

    s = unit_settings(UNITS / "fedge-serve.service")
    high, cap = _bytes(s["MemoryHigh"][0]), _bytes(s["MemoryMax"][0])
    assert 4 * DEFAULT_MAX_BUFFERED_BODY <= high < cap, (s["MemoryHigh"], s["MemoryMax"])
    assert _seconds(s["TimeoutStartSec"][0]) >= 4 * DEFAULT_LOAD_TIMEOUT_S, s["TimeoutStartSec"]
