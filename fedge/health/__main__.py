"""``python -m fedge.health``: print this machine's health report and verdict."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fedge.health import EligibilityPolicy, collect, gpu_report_text


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; exit 0 when eligible, 1 when not, 2 for a bad agent config.

    With ``--config`` (the agent's agent.toml) the verdict is the agent's: its
    ``[eligibility]`` policy and state dir; without it, the default policy."""
    parser = argparse.ArgumentParser(prog="python -m fedge.health", description=__doc__)
    parser.add_argument("--config", default=None,
                        help="the agent's config (e.g. /etc/fedge/agent.toml): use its "
                             "[eligibility] policy and state_dir, as the agent does")
    parser.add_argument("--state-dir", default=None, help="default /var/lib/fedge")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--allow-cpu-only", action="store_true")
    args = parser.parse_args(argv)
    policy: dict[str, object] = {}
    state_dir = "/var/lib/fedge"
    if args.config:
        from fedge.agent.process import AgentConfigError, load_config

        try:
            cfg = load_config(args.config)
            EligibilityPolicy.from_config(cfg.eligibility)
        except (AgentConfigError, ValueError) as exc:
            print(f"python -m fedge.health: {exc}", file=sys.stderr)
            return 2
        policy, state_dir = dict(cfg.eligibility), str(cfg.state_dir)
    if args.allow_cpu_only:
        policy["allow_cpu_only"] = True
    report = collect(args.state_dir or state_dir)
    verdict = EligibilityPolicy.from_config(policy).decide(report)
    if args.json:
        print(json.dumps({"report": report.to_dict(), "eligibility": verdict.to_dict()}, indent=2))
    else:
        print(gpu_report_text(report))
        print(("ELIGIBLE: " if verdict.eligible else "NOT ELIGIBLE: ") + verdict.reason)
    return 0 if verdict.eligible else 1


if __name__ == "__main__":
    sys.exit(main())
