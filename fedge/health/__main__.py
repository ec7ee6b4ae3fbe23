"""``python -m fedge.health``: print this machine's health report and verdict."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fedge.health import EligibilityPolicy, collect, gpu_report_text


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; exit 0 when eligible under the default policy, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m fedge.health", description=__doc__)
    parser.add_argument("--state-dir", default="/var/lib/fedge")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--allow-cpu-only", action="store_true")
    args = parser.parse_args(argv)
    report = collect(args.state_dir)
    verdict = EligibilityPolicy.from_config({"allow_cpu_only": args.allow_cpu_only}).decide(report)
    if args.json:
        print(json.dumps({"report": report.to_dict(), "eligibility": verdict.to_dict()}, indent=2))
    else:
        print(gpu_report_text(report))
        print(("ELIGIBLE: " if verdict.eligible else "NOT ELIGIBLE: ") + verdict.reason)
    return 0 if verdict.eligible else 1


if __name__ == "__main__":
    sys.exit(main())
