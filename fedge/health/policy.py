"""May this appliance join a cohort? An eligibility policy over a HealthReport.

The policy is configuration (the agent's ``[eligibility]`` table; the coordinator
has none), checked when loaded: an unknown key, a wrong type or an
out-of-range value raises ``ValueError`` naming the key, the value and the rule.
``decide`` returns an :class:`Eligibility` whose ``reason`` is one short human
sentence; the agent decides and sends the verdict and the reason with each
heartbeat (no longer eligible once the verdict is older than ``max_report_age_s``,
fedge.agent.runtime), and the coordinator stores them as sent, shows them in the
fleet view and leaves ineligible sites out of the cohort.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from fedge.health.collect import CLOCKS_EVENT_REASONS, STATE_DIR_PROBLEM
from fedge.health.report import GpuReading, HealthReport

__all__ = ["DEFAULT_FATAL_XIDS", "Eligibility", "EligibilityPolicy", "parse_bytes"]

# XIDs that mean the GPU (not the application) is in trouble; NVIDIA's XID catalogue:
# 48 double-bit ECC, 63/64 row-remapping event/failure, 74 NVLink, 79 fell off the bus,
# 92 high single-bit ECC rate, 94/95 contained/uncontained ECC, 119/120 GSP errors.
DEFAULT_FATAL_XIDS: tuple[int, ...] = (48, 63, 64, 74, 79, 92, 94, 95, 119, 120)

_KNOWN_REASONS = {name for _, name in CLOCKS_EVENT_REASONS}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(name: str, value: Any) -> int:
    """A byte count from an int or a string like ``"5 GiB"``/``"512MB"``.

    Raises:
        ValueError: not a non-negative int or ``<number> <unit>`` string, naming ``name``.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be a byte count such as 5368709120 or '5 GiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}={value!r} must be >= 0 bytes")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(
        f"{name}={value!r} must be a byte count such as 5368709120 or '5 GiB' "
        f"(units: {', '.join(u for u in _UNITS if u)})"
    )


@dataclass(frozen=True)
class Eligibility:
    """The verdict: ``reason`` is one sentence; ``problems`` lists every failed rule."""

    eligible: bool
    reason: str
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"eligible": self.eligible, "reason": self.reason, "problems": list(self.problems)}


@dataclass(frozen=True)
class EligibilityPolicy:
    """Thresholds an appliance must meet to be picked for a cohort (defaults in the fields)."""

    allow_cpu_only: bool = False
    min_gpus: int = 1
    temp_margin_c: float = 5.0  # stay this far below the GPU's own slowdown threshold
    max_temp_c: float = 85.0  # used when the slowdown threshold is not reported
    forbidden_clocks_event_reasons: tuple[str, ...] = (
        "HwSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown", "SwThermalSlowdown",
    )
    max_power_fraction: float | None = None  # power draw / enforced limit
    max_ecc_uncorrected_volatile: int = 0
    max_retired_pages: int = 60  # NVIDIA's RMA guidance: 60 retired pages
    max_pcie_replays: int | None = None
    fatal_xids: tuple[int, ...] = DEFAULT_FATAL_XIDS
    xid_lookback_s: float = 3600.0
    min_free_gpu_memory_bytes: int = 4 * 2**30
    min_free_disk_bytes: int = 5 * 2**30
    min_available_memory_bytes: int = 2 * 2**30
    max_report_age_s: float = 300.0

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> EligibilityPolicy:
        """Build and validate a policy from a config table.

        Byte thresholds are named without the ``_bytes`` suffix in the config
        (``min_free_disk = "20 GiB"``) and accept ints or unit strings.

        Raises:
            ValueError: an unknown key, a wrong type, or a value out of range;
                the message names the key, the value and the rule.
        """
        config = dict(config or {})
        known = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
        aliases = {n.removesuffix("_bytes"): n for n in known if n.endswith("_bytes")}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            target = aliases.get(key, key)
            if target not in known:
                allowed = sorted((known - set(aliases.values())) | set(aliases))
                raise ValueError(f"health policy key {key!r} is unknown; known keys: {allowed}")
            kwargs[target] = _validate(key, target, value)
        return cls(**kwargs)

    def decide(self, report: HealthReport, now: float | None = None) -> Eligibility:
        """Apply every rule to ``report``; eligible only if none fails. A report from
        ``collect`` also says whether its state directory could be written
        (collect.state_dir_problem): one that cannot is not eligible."""
        now = time.time() if now is None else now
        problems: list[str] = []
        age = now - report.time
        if age > self.max_report_age_s:
            problems.append(
                f"health report is {age:.0f} s old (limit {self.max_report_age_s:g} s)"
            )
        cpu_only = not report.gpu_available
        if cpu_only:
            if not self.allow_cpu_only:
                problems.append(f"{report.nvml} and CPU-only training is not allowed by policy")
        elif len(report.gpus) < self.min_gpus:
            problems.append(f"{len(report.gpus)} GPU(s) visible, policy needs {self.min_gpus}")
        for gpu in report.gpus:
            problems.extend(self._gpu_problems(gpu))
        problems.extend(self._xid_problems(report, now))
        host = report.host
        if host.disk_free_bytes < self.min_free_disk_bytes:
            problems.append(
                f"only {_gib(host.disk_free_bytes)} free on {host.state_dir} "
                f"(policy needs {_gib(self.min_free_disk_bytes)})"
            )
        unwritable = getattr(report, STATE_DIR_PROBLEM, "")  # collect's probe
        if unwritable:
            problems.append(str(unwritable))
        if host.memory_available_bytes < self.min_available_memory_bytes:
            problems.append(
                f"only {_gib(host.memory_available_bytes)} host memory available "
                f"(policy needs {_gib(self.min_available_memory_bytes)})"
            )
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            return Eligibility(False, problems[0] + more, tuple(problems))
        if cpu_only:
            why = f"eligible: CPU-only training allowed by policy ({report.nvml})"
            return Eligibility(True, why)
        temps = [g.temperature_c for g in report.gpus if g.temperature_c is not None]
        hottest = f", hottest {max(temps):g} °C" if temps else ""
        return Eligibility(True, f"eligible: {len(report.gpus)} GPU(s) healthy{hottest}")

    def _gpu_problems(self, g: GpuReading) -> list[str]:
        tag = f"GPU {g.index}" + (f" ({g.name})" if g.name else "")
        out = [f"{tag}: NVML error reading {metric} ({err})" for metric, err in g.errors.items()]
        if g.temperature_c is not None:
            if g.slowdown_temp_c is not None:
                limit = g.slowdown_temp_c - self.temp_margin_c
                if g.temperature_c > limit:
                    out.append(
                        f"{tag} at {g.temperature_c:g} °C, within {self.temp_margin_c:g} °C of "
                        f"its {g.slowdown_temp_c:g} °C slowdown threshold"
                    )
            elif g.temperature_c > self.max_temp_c:
                out.append(f"{tag} at {g.temperature_c:g} °C, above {self.max_temp_c:g} °C")
        forbidden = self.forbidden_clocks_event_reasons
        bad = [r for r in (g.clocks_event_reasons or []) if r in forbidden]
        if bad:
            out.append(f"{tag} clocks held back by {', '.join(bad)}")
        if (
            self.max_power_fraction is not None
            and g.power_w is not None
            and g.power_limit_w
            and g.power_w > self.max_power_fraction * g.power_limit_w
        ):
            out.append(
                f"{tag} draws {g.power_w:g} W, above {self.max_power_fraction:g} x its "
                f"{g.power_limit_w:g} W limit"
            )
        if (
            g.ecc_uncorrected_volatile is not None
            and g.ecc_uncorrected_volatile > self.max_ecc_uncorrected_volatile
        ):
            out.append(
                f"{tag} has {g.ecc_uncorrected_volatile} uncorrected ECC error(s) since boot"
            )
        if g.remapping_failed:
            out.append(f"{tag} row remapping failed: the GPU needs service")
        elif g.remapping_pending:
            out.append(f"{tag} has a row remapping pending: reset the GPU")
        if g.retired_pages_pending:
            out.append(f"{tag} has a page retirement pending: reset the GPU")
        retired = (g.retired_pages_sbe or 0) + (g.retired_pages_dbe or 0)
        if retired >= self.max_retired_pages:
            out.append(f"{tag} has {retired} retired pages (limit {self.max_retired_pages})")
        if (
            self.max_pcie_replays is not None
            and g.pcie_replay_count is not None
            and g.pcie_replay_count > self.max_pcie_replays
        ):
            out.append(
                f"{tag} PCIe replay counter {g.pcie_replay_count} above {self.max_pcie_replays}"
            )
        free = g.memory_free_bytes
        if free is not None and free < self.min_free_gpu_memory_bytes:
            out.append(
                f"{tag} has only {_gib(free)} GPU memory free "
                f"(policy needs {_gib(self.min_free_gpu_memory_bytes)})"
            )
        return out

    def _xid_problems(self, report: HealthReport, now: float) -> list[str]:
        """Fatal XIDs within the lookback. An event's age is taken against the report
        (``report.time - e.time``: the collector dates events from the monotonic clock
        against the report's own wall-clock reading, so a wall-clock step before the
        report changes neither), plus the report's age at ``now``, counted as 0 when
        ``now`` reads before the report (the wall clock stepped back since)."""
        out = []
        report_age = max(0.0, now - report.time)
        for e in report.xid_events:
            age = (report.time - e.time) + report_age
            if e.xid in self.fatal_xids and age <= self.xid_lookback_s:
                minutes = max(0, round(age / 60))
                out.append(f"GPU {e.gpu_index} reported XID {e.xid} {minutes} min ago")
        return out


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _validate(key: str, target: str, value: Any) -> Any:
    """Check one config value against its field's type and range."""
    if target.endswith("_bytes"):
        return parse_bytes(key, value)
    if target == "allow_cpu_only":
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r} must be true or false")
        return value
    if target in ("min_gpus", "max_ecc_uncorrected_volatile", "max_retired_pages",
                  "max_pcie_replays"):
        if value is None and target == "max_pcie_replays":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}={value!r} must be an integer >= 0")
        return value
    if target in ("temp_margin_c", "max_temp_c", "xid_lookback_s", "max_report_age_s",
                  "max_power_fraction"):
        if value is None and target == "max_power_fraction":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value
        ):
            raise ValueError(f"{key}={value!r} must be a finite number")
        low = 0.0
        if value < low or (target in ("max_power_fraction", "max_report_age_s") and value == 0):
            raise ValueError(f"{key}={value!r} must be > 0" if target in (
                "max_power_fraction", "max_report_age_s") else f"{key}={value!r} must be >= 0")
        if target == "max_temp_c" and value > 150:
            raise ValueError(f"{key}={value!r} must be <= 150 °C (no GPU runs hotter)")
        return float(value)
    if target == "forbidden_clocks_event_reasons":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key}={value!r} must be a list of reason names")
        unknown = sorted(set(value) - _KNOWN_REASONS)
        if unknown:
            raise ValueError(
                f"{key} names unknown clocks-event reason(s) {unknown}; known: "
                f"{sorted(_KNOWN_REASONS)}"
            )
        return tuple(value)
    if target == "fatal_xids":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ValueError(f"{key}={value!r} must be a list of positive XID numbers")
        return tuple(value)
    raise ValueError(f"health policy key {key!r} cannot be configured")  # pragma: no cover
