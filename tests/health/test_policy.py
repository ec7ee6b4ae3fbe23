"""The eligibility policy on recorded readings of real GPU models (tests/health/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedge.health import EligibilityPolicy, HealthReport, parse_bytes

FIXTURES = Path(__file__).resolve().parent / "fixtures"
T = 1796000000.0  # the fixtures' collection time


def load(name: str) -> HealthReport:
    return HealthReport.from_dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def decide(name: str, **config):
    return EligibilityPolicy.from_config(config).decide(load(name), now=T + 5)


def test_healthy_h100_node_is_eligible_and_says_so() -> None:
    verdict = decide("h100_sxm_healthy")
    assert verdict.eligible
    assert verdict.reason == "eligible: 4 GPU(s) healthy, hottest 37 °C"
    assert verdict.problems == ()


def test_h200_in_thermal_slowdown_is_not_eligible() -> None:
    verdict = decide("h200_thermal_slowdown")
    assert not verdict.eligible
    assert verdict.problems == (
        "GPU 1 (NVIDIA H200) at 87 °C, within 5 °C of its 90 °C slowdown threshold",
        "GPU 1 (NVIDIA H200) clocks held back by SwThermalSlowdown, HwThermalSlowdown",
    )
    assert verdict.reason == verdict.problems[0] + " (+1 more)"
    # SwPowerCap on GPU 0 is normal under full load and is not forbidden by default.
    assert not any("GPU 0" in p for p in verdict.problems)


def test_thresholds_are_configurable() -> None:
    # A site that tolerates thermal throttling and runs closer to the limit.
    verdict = decide("h200_thermal_slowdown", temp_margin_c=2,
                     forbidden_clocks_event_reasons=["HwSlowdown"])
    assert verdict.eligible, verdict.problems
    strict = decide("h200_thermal_slowdown", temp_margin_c=2, forbidden_clocks_event_reasons=[],
                    max_power_fraction=0.95)
    assert strict.problems == ("GPU 0 (NVIDIA H200) draws 688.2 W, above 0.95 x its 700 W limit",)


def test_a100_with_pending_row_remap_uncorrected_ecc_and_recent_xid_is_not_eligible() -> None:
    verdict = decide("a100_sxm_remap_pending_xid")
    assert not verdict.eligible
    assert verdict.problems == (
        "GPU 1 (NVIDIA A100-SXM4-80GB) has 2 uncorrected ECC error(s) since boot",
        "GPU 1 (NVIDIA A100-SXM4-80GB) has a row remapping pending: reset the GPU",
        "GPU 1 reported XID 63 4 min ago",
        "GPU 1 reported XID 94 4 min ago",
    )
    assert verdict.reason.endswith("(+3 more)")


def test_old_xid_events_leave_the_lookback_window() -> None:
    report = load("a100_sxm_remap_pending_xid")
    policy = EligibilityPolicy.from_config({"xid_lookback_s": 60})
    problems = policy.decide(report, now=T + 5).problems
    assert not any("XID" in p for p in problems)
    assert any("XID" in p for p in EligibilityPolicy().decide(report, now=T + 5).problems)


def test_xid_age_is_counted_from_the_report_when_the_wall_clock_stepped_back_since() -> None:
    """The wall clock stepped back two hours between collecting and deciding: the
    XIDs are still as old as the report says (4 min), not "0 min"."""
    problems = EligibilityPolicy().decide(load("a100_sxm_remap_pending_xid"),
                                          now=T - 7200).problems
    assert [p for p in problems if "XID" in p] == ["GPU 1 reported XID 63 4 min ago",
                                                   "GPU 1 reported XID 94 4 min ago"]


def test_low_disk_and_little_gpu_memory_free() -> None:
    verdict = decide("a100_pcie_low_disk_busy")
    assert verdict.problems == (
        "GPU 0 (NVIDIA A100-PCIE-40GB) has only 2.7 GiB GPU memory free (policy needs 4.0 GiB)",
        "only 3.0 GiB free on /var/lib/fedge (policy needs 5.0 GiB)",
    )
    relaxed = decide("a100_pcie_low_disk_busy", min_free_disk="2 GiB", min_free_gpu_memory="2GiB")
    assert relaxed.eligible
    assert decide("a100_pcie_low_disk_busy", min_free_disk="2 GiB", min_free_gpu_memory="2GiB",
                  max_pcie_replays=2).problems == (
        "GPU 0 (NVIDIA A100-PCIE-40GB) PCIe replay counter 3 above 2",)


def test_no_gpu_host_is_refused_unless_policy_allows_cpu_only() -> None:
    refused = decide("no_gpu_host")
    assert not refused.eligible
    assert refused.reason == (
        "no GPU (NVML: LibraryNotFound) and CPU-only training is not allowed by policy"
    )
    allowed = decide("no_gpu_host", allow_cpu_only=True)
    assert allowed.eligible
    assert allowed.reason == (
        "eligible: CPU-only training allowed by policy (no GPU (NVML: LibraryNotFound))"
    )


def test_min_gpus_and_stale_reports() -> None:
    assert decide("h100_sxm_healthy", min_gpus=8).reason == "4 GPU(s) visible, policy needs 8"
    stale = EligibilityPolicy().decide(load("h100_sxm_healthy"), now=T + 301)
    assert stale.reason == "health report is 301 s old (limit 300 s)"


def test_gpu_metric_errors_make_the_node_ineligible() -> None:
    report = load("h100_sxm_healthy")
    report.gpus[2].errors["temperature"] = "GpuIsLost"
    verdict = EligibilityPolicy().decide(report, now=T)
    assert verdict.reason == (
        "GPU 2 (NVIDIA H100 80GB HBM3): NVML error reading temperature (GpuIsLost)"
    )


def test_missing_slowdown_threshold_falls_back_to_max_temp() -> None:
    report = load("h100_sxm_healthy")
    report.gpus[0].slowdown_temp_c = None
    report.gpus[0].temperature_c = 86.0
    assert EligibilityPolicy().decide(report, now=T).reason == (
        "GPU 0 (NVIDIA H100 80GB HBM3) at 86 °C, above 85 °C"
    )
    assert EligibilityPolicy.from_config({"max_temp_c": 88}).decide(report, now=T).eligible


def test_retired_pages_limit() -> None:
    report = load("h100_sxm_healthy")
    report.gpus[3].retired_pages_sbe, report.gpus[3].retired_pages_dbe = 50, 10
    report.gpus[3].retired_pages_pending = True
    assert EligibilityPolicy().decide(report, now=T).problems == (
        "GPU 3 (NVIDIA H100 80GB HBM3) has a page retirement pending: reset the GPU",
        "GPU 3 (NVIDIA H100 80GB HBM3) has 60 retired pages (limit 60)",
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"temp_margin": 5}, "health policy key 'temp_margin' is unknown; known keys: "),
        ({"allow_cpu_only": "yes"}, "allow_cpu_only='yes' must be true or false"),
        ({"min_gpus": -1}, "min_gpus=-1 must be an integer >= 0"),
        ({"min_gpus": 1.5}, "min_gpus=1.5 must be an integer >= 0"),
        ({"temp_margin_c": -3}, "temp_margin_c=-3 must be >= 0"),
        ({"max_temp_c": 400}, "max_temp_c=400 must be <= 150 °C"),
        ({"max_temp_c": float("nan")}, "max_temp_c=nan must be a finite number"),
        ({"max_power_fraction": 0}, "max_power_fraction=0 must be > 0"),
        ({"min_free_disk": "lots"}, "min_free_disk='lots' must be a byte count"),
        ({"min_free_disk": -5}, "min_free_disk=-5 must be >= 0 bytes"),
        ({"forbidden_clocks_event_reasons": ["TooHot"]},
         "forbidden_clocks_event_reasons names unknown clocks-event reason(s) ['TooHot']"),
        ({"fatal_xids": [79, "48"]}, "fatal_xids=[79, '48'] must be a list of positive XID"),
    ],
)
def test_bad_config_names_key_value_and_rule(config: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        EligibilityPolicy.from_config(config)
    assert str(info.value).startswith(message)


def test_parse_bytes_units() -> None:
    assert parse_bytes("x", "5 GiB") == 5 * 2**30
    assert parse_bytes("x", "512MB") == 512 * 10**6
    assert parse_bytes("x", "1.5gib") == int(1.5 * 2**30)
    assert parse_bytes("x", 1234) == 1234
    with pytest.raises(ValueError, match="x=True"):
        parse_bytes("x", True)


def test_policy_defaults_match_from_empty_config() -> None:
    assert EligibilityPolicy.from_config({}) == EligibilityPolicy()
    assert EligibilityPolicy.from_config(None) == EligibilityPolicy()
    assert EligibilityPolicy.from_config({"min_free_disk_bytes": 10}).min_free_disk_bytes == 10
