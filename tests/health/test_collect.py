"""collect() and XidMonitor against NVML faked at nvidia-ml-py's functions only."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgpack
import pynvml
import pytest

from fedge.health import (
    EligibilityPolicy,
    HealthReport,
    XidMonitor,
    collect,
    decode_clocks_event_reasons,
    gpu_report_text,
    read_host,
)

from .fake_nvml import NOT_SUPPORTED, FakeNvml, gpu, nvml_error, wait_for


def test_no_driver_gives_a_cpu_only_report(tmp_path: Path) -> None:
    # The real nvidia-ml-py on this machine: there is no libnvidia-ml.so.
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        pass
    else:  # pragma: no cover - only on a GPU machine
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is present here; see tests/gpu")
    report = collect(tmp_path)
    assert report.nvml == "no GPU (NVML: LibraryNotFound)"
    assert report.gpus == [] and not report.gpu_available
    assert report.host.state_dir == str(tmp_path)
    assert 0 < report.host.disk_free_bytes <= report.host.disk_total_bytes
    assert report.host.cpu_count == os.cpu_count()
    assert "no GPU (NVML: LibraryNotFound)" in gpu_report_text(report)


@pytest.mark.parametrize(
    ("code", "name"),
    [(pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "DriverNotLoaded"),
     (pynvml.NVML_ERROR_NO_PERMISSION, "NoPermission")],
)
def test_init_errors_are_named(code: int, name: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([], init_error=code).install(monkeypatch)
    assert collect(tmp_path).nvml == f"no GPU (NVML: {name})"


def test_healthy_gpus_are_read_in_real_units(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeNvml([gpu(), gpu(temperature=44, clocks_event_reasons=0x4 | 0x10)]).install(
        monkeypatch)
    report = collect(tmp_path)
    assert fake.initialised == 0  # every nvmlInit matched by nvmlShutdown
    assert report.nvml == "ok" and report.driver_version == "550.90.07"
    g0, g1 = report.gpus
    assert (g0.index, g0.name, g0.temperature_c, g0.slowdown_temp_c, g0.shutdown_temp_c) == (
        0, "NVIDIA H100 80GB HBM3", 41.0, 90.0, 92.0)
    assert g0.power_w == pytest.approx(118.456) and g0.power_limit_w == 700.0
    assert g0.memory_free_bytes == 84_957_855_744
    assert g0.clocks_event_reasons == ["GpuIdle"]
    assert g1.clocks_event_reasons == ["SwPowerCap", "SyncBoost"]
    assert (g0.remapped_rows_uncorrectable, g0.remapping_pending, g0.remapping_failed) == (
        0, False, False)
    # Hopper does not retire pages: NotSupported on that one metric is tolerated.
    assert g0.unsupported == ["retired_pages"] and g0.retired_pages_sbe is None
    assert g0.errors == {}
    verdict = EligibilityPolicy().decide(report)
    assert verdict.eligible and verdict.reason == "eligible: 2 GPU(s) healthy, hottest 44 °C"


def test_report_is_msgpack_able_and_round_trips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    FakeNvml([gpu()]).install(monkeypatch)
    report = collect(tmp_path)
    wire = msgpack.packb(report.to_dict())
    back = HealthReport.from_dict(msgpack.unpackb(wire))
    assert back == report


def test_each_unsupported_metric_is_tolerated_alone(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = ["temperature", "slowdown_temp", "shutdown_temp", "power", "power_limit", "memory",
               "utilization", "sm_clock", "clocks_event_reasons", "ecc_volatile",
               "ecc_aggregate", "remapped_rows", "pcie_replay", "name", "uuid"]
    names = {"ecc_volatile": "ecc_uncorrected_volatile", "ecc_aggregate":
             "ecc_uncorrected_aggregate", "pcie_replay": "pcie_replay", "memory": "memory"}
    fake = FakeNvml([gpu(**{m: nvml_error(NOT_SUPPORTED)}) for m in metrics]).install(monkeypatch)
    report = collect(tmp_path)
    assert fake.initialised == 0
    for metric, reading in zip(metrics, report.gpus, strict=True):
        assert names.get(metric, metric) in reading.unsupported, metric
        assert reading.errors == {}
        # everything else was still read
        read = [v for v in (reading.temperature_c, reading.power_w, reading.pcie_replay_count,
                            reading.memory_total_bytes) if v is not None]
        assert len(read) >= 3, metric
    # A card without temperature support (e.g. some vGPU profiles) is not refused for it.
    assert EligibilityPolicy().decide(report).eligible


def test_other_nvml_errors_are_recorded_per_metric(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([
        gpu(power=nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)),
        gpu(handle=nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)),
    ]).install(monkeypatch)
    report = collect(tmp_path)
    assert report.gpus[0].errors == {"power": "GpuIsLost"}
    assert report.gpus[0].temperature_c == 41.0
    assert report.gpus[1].errors == {"handle": "GpuIsLost"} and report.gpus[1].name is None
    verdict = EligibilityPolicy().decide(report)
    assert verdict.problems == (
        "GPU 0 (NVIDIA H100 80GB HBM3): NVML error reading power (GpuIsLost)",
        "GPU 1: NVML error reading handle (GpuIsLost)",
    )
    assert "error reading power: GpuIsLost" in gpu_report_text(report)


def test_pre_ampere_retired_pages_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([gpu(name="Tesla V100-SXM2-32GB", retired_sbe=[0x1000, 0x2000],
                  retired_dbe=[0x3000], retired_pending=1,
                  remapped_rows=nvml_error(NOT_SUPPORTED))]).install(monkeypatch)
    g = collect(tmp_path).gpus[0]
    assert (g.retired_pages_sbe, g.retired_pages_dbe, g.retired_pages_pending) == (2, 1, True)
    assert g.unsupported == ["remapped_rows"] and g.remapping_pending is None


def test_a_pre_r535_driver_is_read_through_the_throttle_reasons_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvmlDeviceGetCurrentClocksEventReasons came with driver r535; an older driver
    answers it with FunctionNotFound. Its throttle reasons are the same bits: a healthy
    GPU there stays eligible, and a thermal slowdown is still seen."""
    FakeNvml([gpu(clocks_event_reasons=0x4 | 0x10), gpu(clocks_event_reasons=0x40)],
             driver="470.256.02",
             driver_lacks=("nvmlDeviceGetCurrentClocksEventReasons",)).install(monkeypatch)
    report = collect(tmp_path)
    g0, g1 = report.gpus
    assert g0.clocks_event_reasons == ["SwPowerCap", "SyncBoost"]
    assert g0.errors == {} and "clocks_event_reasons" not in g0.unsupported
    assert g1.clocks_event_reasons == ["HwThermalSlowdown"]
    verdict = EligibilityPolicy().decide(report)
    assert verdict.problems == ("GPU 1 (NVIDIA H100 80GB HBM3) clocks held back by "
                                "HwThermalSlowdown",)
    report.gpus = [g0]
    assert EligibilityPolicy().decide(report).eligible


def test_bindings_without_the_clocks_event_reasons_call_use_the_throttle_reasons_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-ml-py before 12.535 has no nvmlDeviceGetCurrentClocksEventReasons at all."""
    FakeNvml([gpu(clocks_event_reasons=0x1)]).install(monkeypatch)
    monkeypatch.delattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons")
    report = collect(tmp_path)
    assert report.gpus[0].clocks_event_reasons == ["GpuIdle"]
    assert report.gpus[0].errors == {}
    assert EligibilityPolicy().decide(report).eligible


@pytest.mark.parametrize("bindings_lack_it", [False, True])
def test_clocks_event_reasons_nowhere_to_be_read_are_unsupported_not_an_error(
        bindings_lack_it: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ("nvmlDeviceGetCurrentClocksEventReasons",
             "nvmlDeviceGetCurrentClocksThrottleReasons")
    FakeNvml([gpu()], driver_lacks=() if bindings_lack_it else calls).install(monkeypatch)
    if bindings_lack_it:
        for name in calls:
            monkeypatch.delattr(pynvml, name)
    report = collect(tmp_path)
    g = report.gpus[0]
    assert g.clocks_event_reasons is None and g.errors == {}
    assert "clocks_event_reasons" in g.unsupported
    assert EligibilityPolicy().decide(report).eligible


def test_device_count_failure_and_zero_devices(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([gpu()], count_error=pynvml.NVML_ERROR_UNKNOWN).install(monkeypatch)
    assert collect(tmp_path).nvml == "no GPU (NVML: Unknown)"
    assert fake.initialised == 0
    FakeNvml([]).install(monkeypatch)
    assert collect(tmp_path).nvml == "no GPU (NVML: no devices)"


def test_decode_clocks_event_reasons() -> None:
    assert decode_clocks_event_reasons(0) == []
    assert decode_clocks_event_reasons(0x48) == ["HwSlowdown", "HwThermalSlowdown"]
    assert decode_clocks_event_reasons(0x80 | 0x400) == ["HwPowerBrakeSlowdown", "0x400"]
    with pytest.raises(ValueError, match="-1 must be >= 0"):
        decode_clocks_event_reasons(-1)


def test_host_reading_of_a_state_dir_not_created_yet(tmp_path: Path) -> None:
    host = read_host(tmp_path / "not" / "yet")
    assert host.state_dir == str(tmp_path / "not" / "yet") and host.disk_free_bytes > 0


def test_xid_monitor_collects_critical_events_from_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml([gpu(), gpu()]).install(monkeypatch)
    monitor = XidMonitor(poll_ms=20)
    assert monitor.start() and monitor.registered == [0, 1]
    try:
        fake.events.put((1, 79))  # GPU has fallen off the bus
        fake.events.put((0, 13))  # graphics engine exception (an application fault)
        assert wait_for(lambda: len(monitor.events()) == 2)
        report = collect(tmp_path, xid_monitor=monitor)
    finally:
        monitor.stop()
    assert [(e.gpu_index, e.xid) for e in report.xid_events] == [(1, 79), (0, 13)]
    assert fake.event_sets_freed == 1 and fake.initialised == 0
    verdict = EligibilityPolicy().decide(report)
    # XID 13 is the application's fault, not the GPU's: only 79 counts.
    assert verdict.problems == ("GPU 1 reported XID 79 0 min ago",)
    assert "GPU 1 XID 79" in gpu_report_text(report)


def test_xid_monitor_stops_on_an_nvml_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([gpu()]).install(monkeypatch)
    monitor = XidMonitor(poll_ms=20)
    assert monitor.start()
    fake.events.put(nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST))
    assert wait_for(lambda: monitor.reason == "stopped: NVML: GpuIsLost")
    monitor.stop()
    assert fake.initialised == 0


def test_xid_monitor_without_nvml_or_support(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    with XidMonitor() as monitor:
        assert monitor.reason == "NVML: LibraryNotFound" and monitor.events() == []
    fake = FakeNvml([gpu(register_events=nvml_error(NOT_SUPPORTED))]).install(monkeypatch)
    monitor = XidMonitor()
    assert not monitor.start()
    assert monitor.reason == "no GPU supports XID events" and fake.initialised == 0
    with pytest.raises(ValueError, match="poll_ms 0 must be > 0"):
        XidMonitor(poll_ms=0)


def test_gpu_report_text_lists_every_metric(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    FakeNvml([gpu()]).install(monkeypatch)
    text = gpu_report_text(state_dir=str(tmp_path))
    for needle in ("NVML: ok", "GPU 0: NVIDIA H100 80GB HBM3", "temperature 41 C (slowdown 90 C",
                   "power 118.456 W of 700 W enforced", "clocks-event reasons: GpuIdle",
                   "ECC uncorrected volatile 0", "remapped rows correctable 0",
                   "PCIe replays 0", "not supported: retired_pages", "host: "):
        assert needle in text, needle


def test_from_dict_rejects_malformed_reports() -> None:
    with pytest.raises(ValueError, match="lacks field 'host'"):
        HealthReport.from_dict({"time": 1.0, "nvml": "ok"})
    with pytest.raises(ValueError, match=r"gpus\[\] has unknown field\(s\) \['fan'\]"):
        HealthReport.from_dict({"time": 1.0, "nvml": "ok", "gpus": [{"index": 0, "fan": 3}],
                                "host": {}})
    with pytest.raises(ValueError, match="version 7 is not 1"):
        HealthReport.from_dict({"version": 7})
    with pytest.raises(ValueError, match="must be a dict"):
        HealthReport.from_dict([1, 2])  # type: ignore[arg-type]


def test_python_m_fedge_health_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fedge.health", "--state-dir", str(tmp_path),
                          "--allow-cpu-only"], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 60
    assert out.returncode == 0, out.stderr
    assert "ELIGIBLE: eligible:" in out.stdout


def test_python_m_fedge_health_with_the_agents_config_gives_the_agents_verdict(
        tmp_path: Path) -> None:
    """IT checks an appliance with the agent's own config: its [eligibility] decides
    (here CPU-only allowed, no GPU on this machine), as in the agent's heartbeats; the
    default policy would refuse. A bad policy key is exit 2, named."""
    import subprocess
    import sys

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fedge.health", *argv],
                              capture_output=True, text=True, timeout=60)

    conf = tmp_path / "agent.toml"
    conf.write_text(f'state_dir = "{tmp_path}"\n[eligibility]\nallow_cpu_only = true\n')
    if not collect(tmp_path).gpus:  # the default policy needs a GPU
        assert run("--state-dir", str(tmp_path)).returncode == 1
    out = run("--config", str(conf))
    assert out.returncode == 0 and "ELIGIBLE: eligible:" in out.stdout, out.stderr
    conf.write_text('[eligibility]\nmin_gpus = "two"\n')
    out = run("--config", str(conf))
    assert out.returncode == 2 and "min_gpus" in out.stderr


def test_the_agent_starts_an_xid_monitor_and_its_heartbeats_carry_the_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `fedge agent` wires up: start_xid_monitor() then health_probe(cfg, monitor).
    A GPU that falls off the bus (XID 79) reaches the report and makes the appliance
    ineligible; without NVML there is no monitor and the probe still works."""
    from fedge.agent.process import AgentConfig, health_probe, start_xid_monitor

    fake = FakeNvml([gpu(), gpu()]).install(monkeypatch)
    cfg = AgentConfig(state_dir=tmp_path)
    monitor = start_xid_monitor()
    assert monitor is not None and monitor.registered == [0, 1]
    try:
        probe = health_probe(cfg, monitor)
        report, eligible, _ = probe()
        assert report["xid_events"] == [] and eligible
        fake.events.put((1, 79))
        assert wait_for(lambda: len(monitor.events()) == 1)
        report, eligible, reason = probe()
    finally:
        monitor.stop()
    assert [(e["gpu_index"], e["xid"]) for e in report["xid_events"]] == [(1, 79)]
    assert not eligible and "XID 79" in reason
    FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND).install(monkeypatch)
    assert start_xid_monitor() is None
    assert health_probe(cfg, None)()[0]["xid_events"] == []


class SteppedClock:
    """The `time` module as fedge.health.collect sees it: a wall clock that a test
    steps (NTP, an RTC put right) and a monotonic clock that never steps."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 5_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


@pytest.mark.parametrize("step", [2 * 3600.0, -2 * 3600.0])
def test_a_wall_clock_step_neither_forgets_nor_prolongs_a_fatal_xid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    """A GPU falls off the bus (XID 79); a minute later the wall clock steps by two
    hours. The XID is a minute old: the GPU stays ineligible (it used to be forgotten
    after a +2 h step). An hour later by the monotonic clock it has left the lookback
    (a -2 h step used to keep it for three hours)."""
    import importlib

    # fedge.health's `collect` (the function) hides the module of that name
    collect_module = importlib.import_module("fedge.health.collect")
    clock = SteppedClock()
    monkeypatch.setattr(collect_module, "time", clock)
    fake = FakeNvml([gpu()]).install(monkeypatch)
    monitor = XidMonitor(poll_ms=20)
    assert monitor.start()
    try:
        fake.events.put((0, 79))
        assert wait_for(lambda: len(monitor.events()) == 1)
        clock.advance(60)
        clock.wall += step
        report = collect(tmp_path, xid_monitor=monitor)
        policy = EligibilityPolicy()
        verdict = policy.decide(report, now=clock.wall)
        assert "GPU 0 reported XID 79 1 min ago" in verdict.problems, verdict.problems
        assert report.time - report.xid_events[0].time == 60  # its age, for display too
        clock.advance(policy.xid_lookback_s)
        later = collect(tmp_path, xid_monitor=monitor)
        assert not any("XID" in p for p in policy.decide(later, now=clock.wall).problems)
    finally:
        monitor.stop()
