"""The health report: plain data, msgpack/JSON-able, sent with every heartbeat.

A :class:`HealthReport` is what one appliance knows about itself at one
moment: each GPU's NVML readings, the XID critical events seen since the agent
started, and the host (CPU, memory, free disk of the state directory). Every
GPU metric is optional: ``None`` means the device does not support it (listed
in ``unsupported``) or reading it failed (the NVML error name in ``errors``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GpuReading", "HealthReport", "HostReading", "XidEvent", "gpu_report_text"]

REPORT_VERSION = 1


@dataclass(frozen=True)
class XidEvent:
    """One NVML XID critical-error event (``nvmlEventTypeXidCriticalError``)."""

    gpu_index: int | None
    xid: int
    time: float  # UNIX seconds when the event set delivered it


@dataclass
class GpuReading:
    """NVML readings of one GPU; units in the field names."""

    index: int
    name: str | None = None
    uuid: str | None = None
    temperature_c: float | None = None
    slowdown_temp_c: float | None = None
    shutdown_temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_gpu_pct: float | None = None
    utilization_memory_pct: float | None = None
    sm_clock_mhz: int | None = None
    clocks_event_reasons: list[str] | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapping_pending: bool | None = None
    remapping_failed: bool | None = None
    pcie_replay_count: int | None = None
    unsupported: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def memory_free_bytes(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_used_bytes is None:
            return None
        return self.memory_total_bytes - self.memory_used_bytes


@dataclass
class HostReading:
    """Host resources from psutil."""

    cpu_count: int
    cpu_percent: float
    load_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    state_dir: str
    disk_total_bytes: int
    disk_free_bytes: int


@dataclass
class HealthReport:
    """One appliance's health at ``time``.

    ``nvml`` is ``"ok"`` when NVML answered, else the reason no GPU is visible,
    e.g. ``"no GPU (NVML: LibraryNotFound)"``.
    """

    time: float
    nvml: str
    driver_version: str | None
    gpus: list[GpuReading]
    host: HostReading
    xid_events: list[XidEvent] = field(default_factory=list)
    version: int = REPORT_VERSION

    @property
    def gpu_available(self) -> bool:
        return self.nvml == "ok" and bool(self.gpus)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of str/int/float/bool/None/list/dict: msgpack- and JSON-able."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealthReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a heartbeat or a fixture).

        Raises:
            ValueError: a missing or unknown field, or an unsupported report version.
        """
        if not isinstance(data, dict):
            raise ValueError(f"health report must be a dict, got {type(data).__name__}")
        version = data.get("version", REPORT_VERSION)
        if version != REPORT_VERSION:
            raise ValueError(f"health report version {version!r} is not {REPORT_VERSION}")
        try:
            return cls(
                time=float(data["time"]),
                nvml=str(data["nvml"]),
                driver_version=data.get("driver_version"),
                gpus=[_build(GpuReading, g, "gpus[]") for g in data.get("gpus", [])],
                host=_build(HostReading, data["host"], "host"),
                xid_events=[
                    _build(XidEvent, e, "xid_events[]") for e in data.get("xid_events", [])
                ],
            )
        except KeyError as exc:
            raise ValueError(f"health report lacks field {exc.args[0]!r}") from None


def _build(kind: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"health report {where} must be a dict, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"health report {where} has unknown field(s) {unknown}")
    try:
        return kind(**data)
    except TypeError as exc:
        raise ValueError(f"health report {where}: {exc}") from None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.1f} GiB"


def _opt(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{unit}" if isinstance(value, float) else (
        f"{value}{unit}"
    )


def gpu_report_text(report: HealthReport | None = None, state_dir: str = "/var/lib/fedge") -> str:
    """One human-readable health report; collects a fresh one when ``report`` is None."""
    if report is None:
        from fedge.health.collect import collect

        report = collect(state_dir)
    lines = [f"fedge health  NVML: {report.nvml}  driver: {report.driver_version or 'n/a'}"]
    for g in report.gpus:
        lines.append(f"GPU {g.index}: {g.name or 'unknown'}  {g.uuid or ''}".rstrip())
        lines.append(
            f"  temperature {_opt(g.temperature_c, ' C')} (slowdown {_opt(g.slowdown_temp_c, ' C')}"
            f", shutdown {_opt(g.shutdown_temp_c, ' C')})"
        )
        lines.append(f"  power {_opt(g.power_w, ' W')} of {_opt(g.power_limit_w, ' W')} enforced")
        lines.append(
            f"  memory {_fmt_bytes(g.memory_used_bytes)} used of {_fmt_bytes(g.memory_total_bytes)}"
            f"; utilisation gpu {_opt(g.utilization_gpu_pct, '%')}"
            f" mem {_opt(g.utilization_memory_pct, '%')}; SM clock {_opt(g.sm_clock_mhz, ' MHz')}"
        )
        reasons = g.clocks_event_reasons
        lines.append(
            "  clocks-event reasons: "
            + ("n/a" if reasons is None else ", ".join(reasons) if reasons else "none")
        )
        lines.append(
            f"  ECC uncorrected volatile {_opt(g.ecc_uncorrected_volatile)}"
            f" aggregate {_opt(g.ecc_uncorrected_aggregate)}; retired pages sbe"
            f" {_opt(g.retired_pages_sbe)} dbe {_opt(g.retired_pages_dbe)}"
            f" pending {_opt(g.retired_pages_pending)}"
        )
        lines.append(
            f"  remapped rows correctable {_opt(g.remapped_rows_correctable)} uncorrectable"
            f" {_opt(g.remapped_rows_uncorrectable)} pending {_opt(g.remapping_pending)}"
            f" failed {_opt(g.remapping_failed)}; PCIe replays {_opt(g.pcie_replay_count)}"
        )
        if g.unsupported:
            lines.append("  not supported: " + ", ".join(g.unsupported))
        for metric, err in g.errors.items():
            lines.append(f"  error reading {metric}: {err}")
    if report.xid_events:
        lines.append(
            "XID events: "
            + ", ".join(f"GPU {e.gpu_index} XID {e.xid}" for e in report.xid_events)
        )
    h = report.host
    lines.append(
        f"host: {h.cpu_count} CPUs at {h.cpu_percent:g}% (load {h.load_1m:.2f}), memory"
        f" {_fmt_bytes(h.memory_available_bytes)} available of {_fmt_bytes(h.memory_total_bytes)},"
        f" disk {_fmt_bytes(h.disk_free_bytes)} free of {_fmt_bytes(h.disk_total_bytes)}"
        f" at {h.state_dir}"
    )
    return "\n".join(lines)
