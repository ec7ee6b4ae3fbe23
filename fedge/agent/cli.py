"""`fedge agent`: run the appliance agent, or install an enrolment file.

    fedge agent [run] --config FILE [--connect-timeout S]
    fedge agent [--config FILE] enrol FILE [--state-dir DIR] [--console-key FINGERPRINT]
                [--replace]                         (fedge.agent.enrol; into the config's
                                                    state_dir when --config is given)
    fedge agent privacy --config FILE [--delta D]   the privacy budget this site spent
                                                    (every released update, with DP or
                                                    without; pending runs apart)

Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("agent", help="run the appliance agent")
    p.add_argument("--config", type=Path, help="agent config (TOML)")
    p.add_argument("--connect-timeout", type=float, default=None,
                   help="exit with status 3 if no connection to the coordinator within S "
                        "seconds (refused, impostor or unreachable); default: retry forever")
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="agent_command", metavar="ACTION")
    r = sub.add_parser("run", help="run the agent (what the systemd unit starts)")
    r.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    r.add_argument("--connect-timeout", type=float, default=argparse.SUPPRESS)
    r.set_defaults(func=_run)
    pv = sub.add_parser("privacy", help="the privacy budget (epsilon) this site has spent, "
                                        "per job and in total")
    pv.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    pv.add_argument("--delta", type=float, default=1e-5, help="delta for epsilon (1e-5)")
    pv.set_defaults(func=_privacy)
    try:
        from fedge.agent.enrol import register_enrol
    except ModuleNotFoundError:  # pragma: no cover - console engineer's module absent
        return
    register_enrol(sub)


def _run(args: argparse.Namespace) -> int:
    if args.config is None:
        print("fedge agent: --config FILE is required", file=sys.stderr)
        return 2
    from fedge.agent.process import AgentConfigError, load_config, run
    from fedge.systemd import setup_logging

    setup_logging("fedge-agent")
    try:
        cfg = load_config(args.config)
        return run(cfg, connect_timeout_s=args.connect_timeout)
    except AgentConfigError as exc:
        print(f"fedge agent: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a [[datasets]] table fedge.train refuses
        print(f"fedge agent: invalid configuration: {exc}", file=sys.stderr)
        return 2


def _privacy(args: argparse.Namespace) -> int:
    if args.config is None:
        print("fedge agent privacy: --config FILE is required", file=sys.stderr)
        return 2
    from fedge.agent.process import AgentConfigError, load_config
    from fedge.agent.trainer import ledger_path
    from fedge.train.accounting import PrivacyLedger

    try:
        cfg = load_config(args.config)
        ledger = PrivacyLedger.load(ledger_path(cfg.state_dir))
    except (AgentConfigError, ValueError) as exc:
        print(f"fedge agent privacy: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.delta < 1:
        print(f"fedge agent privacy: --delta {args.delta} must lie in (0, 1)", file=sys.stderr)
        return 2
    print_privacy(ledger, args.delta)
    return 0


def print_privacy(ledger: Any, delta: float) -> None:
    """``fedge agent privacy``'s table: per job and in total, the ε of the released runs
    at ``delta``; pending runs apart; then what the numbers bound.

    A job whose update left without DP has an unbounded ε, and so has the total: said
    plainly, naming the jobs. ε is for replacing one record (DP-SGD, "per record") or
    the site's data (DP-FedAvg, "client-level"), the site's record count being released
    with its updates (fedge.train.accounting's docstring)."""
    from fedge.train.accounting import DP_FEDAVG, DP_SGD, NO_DP

    jobs = sorted({e["job"] for e in ledger.entries})
    without_dp = ledger.without_dp()

    def bound(job: str | None = None) -> str:
        released = {e.get("mechanism", DP_SGD) for e in ledger.released(job=job)}
        kinds = released or set(ledger.mechanisms(job=job))
        if NO_DP in released:
            if job is None:
                return (f"job{'s' if len(without_dp) > 1 else ''} "
                        f"{', '.join(without_dp)} released updates without DP")
            return "none: exact updates released without DP"
        if kinds == {NO_DP}:
            return "none (nothing released)"
        if kinds <= {DP_FEDAVG}:
            return "client-level"
        return "per loss term" if ledger.per_loss_term(job=job) else "per record"

    def number(eps: float) -> str:
        return f"{eps:>10.4f}" if eps != float("inf") else f"{'unbounded':>10}"

    # rounds and epsilon count released runs only: an update that left this site (or
    # was about to: the ledger is marked first); a run whose update never left is pending
    print(f"{'job':<40} {'rounds':>6} {'epsilon':>10}  bound")
    for job in jobs:
        rounds = len({e["round"] for e in ledger.released(job=job)})
        print(f"{job:<40} {rounds:>6} {number(ledger.epsilon(delta, job=job))}  {bound(job)}")
    print(f"{'total (all jobs composed)':<40} {'':>6} {number(ledger.epsilon(delta))}  "
          f"{bound()}")
    pending = ledger.pending()
    if pending:
        print("pending (trained, never released; not counted in epsilon):")
        for job in sorted({e["job"] for e in pending}):
            runs = ", ".join(f"round {e['round']} attempt {e['attempt']}"
                             for e in sorted(ledger.pending(job=job),
                                             key=lambda e: (e["round"], e["attempt"])))
            print(f"  {job:<38} {runs}")
    if ledger.per_loss_term():
        print("per loss term: DP-SGD on a Cox model (privacy.dp.cox_per_term); a record also "
              "sits in other events' risk sets, so this epsilon is not a record-level bound")
    if DP_FEDAVG in ledger.mechanisms():
        print("client-level: DP-FedAvg (privacy.client_dp); epsilon bounds replacing this "
              "site's whole data in each round's sum (the cohort is public: sensitivity "
              "2 x clip_norm against noise noise_multiplier x clip_norm), so every record "
              "of it too; the total composes it with the record-level runs")
    if without_dp:
        print(f"without DP: {', '.join(without_dp)} released exact updates computed from "
              "this site's records; no epsilon bounds them, so the total is unbounded")
    print(f"delta = {delta:g}; epsilon is for replacing one record with another (or, "
          "client-level, this site's data), not for adding or removing one: this site's "
          "record count leaves with its updates. Every training run whose update left "
          "this site is counted, with DP or without")
