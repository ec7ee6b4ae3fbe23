"""fedge.health: NVML and host health of an appliance, and the eligibility policy.

Public API (docs/CONTRACTS.md):

* ``collect(state_dir, *, xid_monitor=None) -> HealthReport`` — NVML readings per
  GPU, XID events, host CPU/memory/disk; ``report.to_dict()`` is msgpack-able,
  ``HealthReport.from_dict`` reads it back.
* ``EligibilityPolicy.from_config(dict).decide(report) -> Eligibility(eligible, reason)``.
* ``XidMonitor`` — the event-set thread collecting XID critical errors.
* ``gpu_report_text(report=None) -> str`` — one human-readable health report.

``python -m fedge.health [--state-dir DIR] [--json]`` prints it.
"""

from fedge.health.collect import (
    XidMonitor,
    collect,
    decode_clocks_event_reasons,
    read_host,
)
from fedge.health.policy import Eligibility, EligibilityPolicy, parse_bytes
from fedge.health.report import GpuReading, HealthReport, HostReading, XidEvent, gpu_report_text

__all__ = [
    "Eligibility",
    "EligibilityPolicy",
    "GpuReading",
    "HealthReport",
    "HostReading",
    "XidEvent",
    "XidMonitor",
    "collect",
    "decode_clocks_event_reasons",
    "gpu_report_text",
    "parse_bytes",
    "read_host",
]
