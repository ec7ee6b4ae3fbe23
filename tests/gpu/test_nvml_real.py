"""fedge.health against the real NVML: runs only where an NVIDIA driver is present."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pynvml
import pytest

from fedge.health import EligibilityPolicy, HealthReport, XidMonitor, collect, gpu_report_text


def _gpu_count() -> int:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpu_count() == 0, reason="no NVIDIA GPU/driver (NVML unavailable)"),
]


def test_real_nvml_report(tmp_path: Path) -> None:
    report = collect(tmp_path)
    assert report.nvml == "ok" and report.driver_version
    assert len(report.gpus) == _gpu_count()
    for g in report.gpus:
        assert g.errors == {}, g.errors
        assert g.name and g.uuid and g.uuid.startswith(("GPU-", "MIG-"))
        assert g.temperature_c is not None and 5 <= g.temperature_c <= 110
        if g.slowdown_temp_c is not None:
            assert g.temperature_c < (g.shutdown_temp_c or 200)
        assert g.memory_total_bytes and 0 <= (g.memory_used_bytes or 0) <= g.memory_total_bytes
        if g.power_w is not None and g.power_limit_w is not None:
            assert 0 < g.power_w <= 1.5 * g.power_limit_w
        assert g.clocks_event_reasons is None or all(isinstance(r, str)
                                                     for r in g.clocks_event_reasons)
    assert HealthReport.from_dict(msgpack.unpackb(msgpack.packb(report.to_dict()))) == report
    verdict = EligibilityPolicy.from_config({"min_free_gpu_memory": 0}).decide(report)
    assert verdict.reason
    print(gpu_report_text(report))
    print(verdict.reason)


def test_real_xid_event_set_starts_and_stops(tmp_path: Path) -> None:
    monitor = XidMonitor(poll_ms=100)
    started = monitor.start()
    try:
        if not started:  # e.g. a MIG or virtualised GPU without event support
            assert monitor.reason
            return
        assert monitor.registered
        report = collect(tmp_path, xid_monitor=monitor)
        assert isinstance(report.xid_events, list)
    finally:
        monitor.stop()
    assert monitor.reason in ("stopped", "no GPU supports XID events") or monitor.reason.startswith(
        "NVML")
