"""`fedge demo`: the oncology demo (Fed-TCGA-BRCA, 6 centres, one machine).

Nothing heavy is imported here: torch, zmq and matplotlib load only when the
demo runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a whole federation on loopback: Fed-TCGA-BRCA, 6 hospital agents, SecAgg on",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="FLamby fed_tcga_brca folder (default: <repo>/../shared/data/fed_tcga_brca)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("reports/demo"),
        help="report directory (PNG curves, metrics.json, model.onnx)",
    )
    p.add_argument(
        "--plan", type=Path, default=None, help="job plan (default: examples/demo/plan.toml)"
    )
    p.add_argument("--rounds", type=int, default=None, help="override the plan's rounds")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.report.exists() and not args.report.is_dir():
        print(f"fedge demo: --report {args.report} exists and is not a directory (the "
              "report is a directory of curves, metrics.json and model.onnx)", file=sys.stderr)
        return 2
    # before the heavy imports and the federation: the default is relative, so run from
    # a folder the user cannot write (/, a system folder) it fails here, and says where
    created = not args.report.exists()
    try:
        args.report.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"fedge demo: cannot create the report folder {_where(args.report)}: "
              f"{exc.strerror or exc}; give --report DIR, a folder you can write",
              file=sys.stderr)
        return 1

    from fedge.demo.loopback import FederationError
    from fedge.demo.run import DEFAULT_PLAN, DemoError, run_demo
    from fedge.demo.tcga import default_data_dir

    try:
        run_demo(
            args.data or default_data_dir(),
            args.report,
            plan_path=args.plan or DEFAULT_PLAN,
            rounds=args.rounds,
        )
    except (DemoError, FederationError, ValueError, OSError) as exc:
        print(f"fedge demo: {exc}", file=sys.stderr)
        if created:  # made above for this run, and still empty: leave nothing behind
            with contextlib.suppress(OSError):
                args.report.rmdir()
        return 1
    return 0


def _where(path: Path) -> str:
    """``path``, and for a relative one the folder it is relative to."""
    if path.is_absolute():
        return str(path)
    try:
        return f"{path} (relative to the current directory, {os.getcwd()})"
    except OSError:  # the current directory was removed
        return f"{path} (relative to the current directory)"
