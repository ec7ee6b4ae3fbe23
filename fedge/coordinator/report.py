"""A finished job's report, beside its checkpoint: what the ML engineer fetches
with ``fedge console jobs fetch`` together with the ONNX model.

Written from the coordinator's own records (``Coordinator.job_status``): every
committed round's federated evaluation (each site and the size-weighted
aggregate, the ``*`` rows), each site's training metrics and DP-SGD spend, and
every attempt, failed ones with their reason. Files::

    report.json          every number below, machine-readable
    report.md            the summary: plan, rounds, final metrics per site, privacy
    learning_curve.png   one panel per evaluation metric: aggregate and each site
    privacy.png          each site's cumulative epsilon per round (DP-SGD jobs only)

Plotting uses matplotlib's object API (no pyplot state), so it may run in a
worker thread of the coordinator's process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedge.update.files import write_atomic

AGGREGATE = "*"  # the site name of the size-weighted aggregate rows


def summarise(status: dict[str, Any], plan_toml: str = "") -> dict[str, Any]:
    """The report's content from ``Coordinator.job_status(job)`` (pure).

    Raises:
        ValueError: `status` lacks the job id, its rounds or its metrics (named).
    """
    try:
        job_id, rows, attempts = status["job_id"], status["metrics"], status["rounds"]
    except KeyError as exc:
        raise ValueError(f"job status lacks {exc}: not from Coordinator.job_status") from exc
    eval_splits = sorted({r["split"] for r in rows if r["site"] == AGGREGATE})
    split = eval_splits[0] if eval_splits else ""
    curves: dict[str, dict[str, Any]] = {}
    privacy: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["split"] == split:
            c = curves.setdefault(r["name"], {"rounds": [], "aggregate": [], "sites": {}})
            if r["site"] == AGGREGATE:
                c["rounds"].append(r["round"])
                c["aggregate"].append(r["value"])
            else:
                c["sites"].setdefault(r["site"], []).append((r["round"], r["value"]))
        elif r["split"] == "privacy" and r["name"] == "epsilon_job":
            privacy.setdefault(r["site"], []).append((r["round"], r["value"]))
    last = max((r["round"] for r in rows), default=0)
    final = {name: {"aggregate": c["aggregate"][-1] if c["aggregate"] else None,
                    "sites": {s: v[-1][1] for s, v in sorted(c["sites"].items())
                              if v[-1][0] == last}}
             for name, c in sorted(curves.items())}
    return {
        "job_id": job_id,
        "status": status.get("status"),
        "rounds_planned": status.get("rounds_planned"),
        "committed_round": status.get("committed_round"),
        "eval_split": split,
        "plan": plan_toml,
        "attempts": attempts,
        "final": final,
        "curves": curves,
        "privacy": {s: v for s, v in sorted(privacy.items())},
        "privacy_bound": privacy_bound(plan_toml) if privacy else None,
        "metrics": rows,
    }


def privacy_bound(plan_toml: str) -> str:
    """What the job's DP-SGD epsilon bounds: one record, or (a Cox model run with
    ``privacy.dp.cox_per_term``) one loss term only."""
    from fedge.coordinator.plan import PlanError, parse_plan
    from fedge.train.accounting import PER_LOSS_TERM

    try:
        dp = parse_plan(plan_toml).privacy.get("dp")
    except PlanError:
        dp = None
    return PER_LOSS_TERM if isinstance(dp, dict) and dp.get("cox_per_term") is True \
        else "per record"


def write_job_report(out_dir: Path, status: dict[str, Any], plan_toml: str = "") -> list[str]:
    """Write the report files into `out_dir` (the job's directory); returns their names.

    Raises:
        ValueError: as `summarise`. OSError: the directory cannot be written.
    """
    report = summarise(status, plan_toml)
    out_dir = Path(out_dir)
    written = []
    if report["curves"]:
        _learning_curve(out_dir / "learning_curve.png", report)
        written.append("learning_curve.png")
    if report["privacy"]:
        _privacy_plot(out_dir / "privacy.png", report["privacy"], report["privacy_bound"])
        written.append("privacy.png")
    write_atomic(out_dir / "report.md", _markdown(report, written).encode(), mode=0o644)
    write_atomic(out_dir / "report.json",
                 (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode(),
                 mode=0o644)
    return ["report.json", "report.md", *written]


def _learning_curve(path: Path, report: dict[str, Any]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted(report["curves"])
    fig = Figure(figsize=(7, 3.2 * len(names)))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        c = report["curves"][name]
        for site, points in sorted(c["sites"].items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], lw=1, alpha=0.6,
                    label=site)
        ax.plot(c["rounds"], c["aggregate"], "k-o", lw=2, label="size-weighted")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} ({report['eval_split']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(f"job {report['job_id']}: federated evaluation of the global model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _privacy_plot(path: Path, privacy: dict[str, list[tuple[int, float]]],
                  bound: str = "per record") -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for site, points in privacy.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", label=site)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cumulative epsilon in this job (DP-SGD)")
    ax.set_title(f"epsilon {bound}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _markdown(report: dict[str, Any], plots: list[str]) -> str:
    names = sorted(report["final"])
    out = [f"# Job {report['job_id']}: {report['status']}", "",
           f"{report['committed_round']} of {report['rounds_planned']} rounds committed; "
           f"evaluation split `{report['eval_split'] or 'none'}`.", ""]
    out += [f"![{p}]({p})" for p in plots]
    if names:
        sites = sorted({s for n in names for s in report["final"][n]["sites"]})
        out += ["", "## Final round, each site and the size-weighted aggregate", "",
                "| site | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
        for s in sites:
            out.append(f"| {s} | " + " | ".join(_fmt(report["final"][n]["sites"].get(s))
                                                 for n in names) + " |")
        out.append("| **aggregate** | " + " | ".join(
            _fmt(report["final"][n]["aggregate"]) for n in names) + " |")
    out += ["", "## Rounds", "", "| round | attempt | status | seconds | cohort | survivors "
            "| dropped | reason |", "|---|---|---|---|---|---|---|---|"]
    for a in report["attempts"]:
        secs = (a.get("ended_at") or 0) - (a.get("started_at") or 0)
        out.append(f"| {a['round']} | {a['attempt']} | {a['status']} | {secs:.1f} | "
                   f"{len(a['cohort'])} | {len(a['survivors'])} | "
                   f"{', '.join(a['dropped']) or '–'} | {a.get('reason') or '–'} |")
    if report["privacy"]:
        out += ["", "## Privacy (DP-SGD), cumulative epsilon per site", "",
                f"Epsilon {report['privacy_bound']}."
                + (" A Cox model's loss terms share risk sets: one record moves other "
                   "terms too, so this does not bound what one patient's record reveals."
                   if report["privacy_bound"] != "per record" else ""), "",
                "| site | epsilon after the last round |", "|---|---|"]
        out += [f"| {s} | {v[-1][1]:.3f} |" for s, v in report["privacy"].items()]
    if report["plan"]:
        out += ["", "## Plan", "", "```toml", report["plan"].strip(), "```"]
    return "\n".join(out) + "\n"
