"""A finished job's report, beside its checkpoint: what the ML engineer fetches
with ``fedge console jobs fetch`` together with the ONNX model.

Written from the coordinator's own records (``Coordinator.job_status``): every
committed round's federated evaluation (each site and the size-weighted
aggregate, the ``*`` rows), each site's training metrics and DP-SGD spend, and
every attempt with each dropped site's reason (failed attempts with theirs), and,
where the sites evaluated the final model on their ``test`` split after the last
round, that final test (why each site missed it, even when none gave it). A failed
or cancelled job that committed at least one round gets its report too, marked as
such: its model is the last committed one.
Files::

    report.json          every number below, machine-readable
    report.md            the summary: plan, final metrics per site, final test, every
                         round's metrics per site, survivors not evaluated and why,
                         attempts and dropped sites, privacy
    learning_curve.png   one panel per evaluation metric: aggregate and each site
    privacy.png          each site's cumulative epsilon per round (DP-SGD jobs only)

A DP-FedAvg job's sites send no epsilon (its plan names no delta): its report gives
each site's client-level epsilon at CLIENT_DP_DELTA from the sums that held its update:
every attempt whose sum was unmasked, committed or not (a sum rejected out of bounds, or
cut short by a failure, a cancel or a restart, was learned all the same).

Plotting uses matplotlib's object API (no pyplot state), so it may run in a
worker thread of the coordinator's process.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

from fedge.coordinator.rounds import FINAL_TEST_SPLIT
from fedge.update.files import write_atomic

AGGREGATE = "*"  # the site name of the size-weighted aggregate rows


def _plan_settings(plan_toml: str) -> tuple[str | None, float | None]:
    """(eval_split, DP-SGD delta) of the plan, or None where it cannot say."""
    from fedge.coordinator.plan import PlanError, parse_plan

    try:
        plan = parse_plan(plan_toml)
    except PlanError:
        return None, None
    dp = plan.privacy.get("dp")
    delta = None
    if isinstance(dp, dict):
        value = dp.get("delta", 1e-5)  # the plan's default (fedge.coordinator.plan)
        delta = float(value) if isinstance(value, int | float) else None
    return plan.eval_split, delta


# Why a site that evaluated gives no value for a metric: the evaluator
# (fedge.train.api.evaluate) leaves a metric out, never NaN, when its data cannot
# define it. The site sends no reason; these are the only ways it leaves one out.
UNDEFINED_WHY = {
    "roc_auc": "undefined on its data (roc_auc needs both classes in the split)",
    "c_index": "undefined on its data (no comparable pair: no event, or every event "
               "ties the last time)",
    "loss": "undefined on its data (no event's risk set holds anyone else)",
}
NO_VALUE_WHY = "its evaluation gave no value for this metric"


def by_site(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Metric rows of one round and split as
    {metric: {"aggregate": value, "sites": {site: value}, "n_examples": {...},
    "missing": {site: why}}}: "missing" names each site that gave the split's other
    metrics but no (finite) value for this one, so its aggregate leaves the site out."""
    out: dict[str, Any] = {}
    evaluated: set[str] = set()
    for r in rows:
        entry = out.setdefault(r["name"], {"aggregate": None, "sites": {}, "n_examples": {}})
        if r["site"] == AGGREGATE:
            entry["aggregate"] = r["value"]
        else:
            evaluated.add(r["site"])
            entry["sites"][r["site"]] = r["value"]
            entry["n_examples"][r["site"]] = r.get("n_examples")
    for name, entry in out.items():
        entry["missing"] = {
            s: (UNDEFINED_WHY.get(name, NO_VALUE_WHY) if s not in entry["sites"]
                else "its value is not a finite number")
            for s in sorted(evaluated) if not _finite(entry["sites"].get(s))}
    return {name: out[name] for name in sorted(out)}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _examples(rows: list[dict[str, Any]], splits: list[str]) -> dict[str, dict[str, int]]:
    """Each site's examples per split (train, the rounds' evaluation split, test), as it
    last reported them."""
    out: dict[str, dict[str, int]] = {}
    for r in sorted(rows, key=lambda r: r["round"]):
        n = r.get("n_examples")
        if r["site"] != AGGREGATE and r["split"] in splits and isinstance(n, int):
            out.setdefault(r["site"], {})[r["split"]] = n
    return {s: out[s] for s in sorted(out)}


def summarise(status: dict[str, Any], plan_toml: str = "") -> dict[str, Any]:
    """The report's content from ``Coordinator.job_status(job)`` (pure).

    Raises:
        ValueError: `status` lacks the job id, its rounds or its metrics (named).
    """
    try:
        job_id, rows, attempts = status["job_id"], status["metrics"], status["rounds"]
    except KeyError as exc:
        raise ValueError(f"job status lacks {exc}: not from Coordinator.job_status") from exc
    plan_split, delta = _plan_settings(plan_toml) if plan_toml else (None, None)
    eval_splits = sorted({r["split"] for r in rows if r["site"] == AGGREGATE})
    if plan_split is not None:
        split = plan_split if plan_split in eval_splits else ""
    else:  # no plan: the split every round was evaluated on (not the final test's)
        rounds_of = {sp: {r["round"] for r in rows if r["split"] == sp} for sp in eval_splits}
        split = max(eval_splits, key=lambda sp: (len(rounds_of[sp]), sp != FINAL_TEST_SPLIT),
                    default="")
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
    # the last round's values only: a metric no site reported in it (the sites that
    # could compute it dropped out) has no final value, not an earlier round's
    final = {name: {"aggregate": c["aggregate"][-1] if c["rounds"] and c["rounds"][-1] == last
                    else None,
                    "sites": {s: v[-1][1] for s, v in sorted(c["sites"].items())
                              if v[-1][0] == last}}
             for name, c in sorted(curves.items())}
    per_round: dict[int, dict[str, Any]] = {}
    for rnd in sorted({r["round"] for r in rows if r["split"] == split}):
        per_round[rnd] = by_site([r for r in rows if r["round"] == rnd
                                   and r["split"] == split])
    # the final model's held-out test: the sites' test split after the last round
    # (each round's own evaluation when the plan evaluates on test anyway)
    test_rows = [r for r in rows if r["split"] == FINAL_TEST_SPLIT]
    test_round = max((r["round"] for r in test_rows), default=None)
    # survivors not in it, and why (Coordinator.job_status): when every one missed
    # it there are no rows, and the reasons are all there is to say
    recorded = status.get("final_test") or {}
    missing = dict(recorded.get("missing") or {})
    if test_round is None and missing and isinstance(recorded.get("round"), int):
        test_round = recorded["round"]
    final_test = None
    if test_round is not None:
        final_test = {"round": test_round,
                      "metrics": by_site([r for r in test_rows if r["round"] == test_round]),
                      "missing": missing}
    attempts = [{**a, "dropped_reasons": dict(a.get("dropped_reasons") or {}),
                 "eval_missing": dict(a.get("eval_missing") or {}),
                 "left_out": dict(a.get("left_out") or {})} for a in attempts]
    dropped = {str(a["round"]): a["dropped_reasons"] for a in attempts
               if a.get("status") == "committed" and a["dropped_reasons"]}
    # survivors of a committed round that are not in its evaluation, and why
    not_evaluated = {str(a["round"]): a["eval_missing"] for a in attempts
                     if a.get("status") == "committed" and a["eval_missing"]}
    # enrolled sites a committed round's cohort left out, and why
    left_out = {str(a["round"]): a["left_out"] for a in attempts
                if a.get("status") == "committed" and a["left_out"]}
    state = status.get("status")
    committed = status.get("committed_round")
    return {
        "job_id": job_id,
        "name": str(status.get("name") or ""),  # the plan's job.name ("" for none)
        "status": state,
        # a failed or cancelled job's results are its last committed model, not the
        # planned final one (True also before any round committed: nothing is final)
        "partial": state != "completed",
        "error": status.get("error") or "",
        "rounds_planned": status.get("rounds_planned"),
        "committed_round": committed,
        "eval_split": split,
        "plan": plan_toml,
        "attempts": attempts,
        "dropped": dropped,
        "eval_missing": not_evaluated,
        "left_out": left_out,
        "final_round": last,  # the round of "final" (its last with any metric)
        "final": final,
        "final_test": final_test,
        # each site's examples per split as it last reported them: {site: {split: n}}
        "examples": _examples(rows, ["train", *([split] if split else []),
                                     FINAL_TEST_SPLIT]),
        "rounds": {str(k): v for k, v in per_round.items()},
        "curves": curves,
        "privacy": {s: v for s, v in sorted(privacy.items())},
        "privacy_bound": privacy_bound(plan_toml) if privacy else None,
        "privacy_delta": delta if privacy else None,
        "client_privacy": client_privacy(plan_toml, attempts),
        "metrics": rows,
    }


# The delta of a DP-FedAvg job's client-level epsilon in the report: the plan names
# none (privacy.client_dp has no delta), and `fedge agent privacy` uses this by default
CLIENT_DP_DELTA = 1e-5


def client_privacy(plan_toml: str, attempts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A DP-FedAvg job's (``privacy.client_dp`` without ``privacy.dp``) client-level
    epsilon per site at CLIENT_DP_DELTA, from the coordinator's side: each round
    attempt whose sum held the site's update (it survived to the sum) is one release,
    whatever the attempt's status: a failed attempt's too, when its sum was unmasked
    before it failed (the coordinator learned it; its row keeps the sum's survivors).
    None for other jobs (with ``privacy.dp`` too, the sites report DP-SGD's epsilon,
    the bound they record).

    A site's own ledger (`fedge agent privacy`) is the authority: it charges an update
    when it leaves, so one lost on the way counts there and not here."""
    from fedge.coordinator.plan import PlanError, parse_plan
    from fedge.train.accounting import client_epsilon_for

    try:
        privacy = parse_plan(plan_toml).privacy
    except PlanError:
        return None
    cdp = privacy.get("client_dp")
    if not isinstance(cdp, dict) or privacy.get("dp") is not None:
        return None
    z = float(cdp.get("noise_multiplier", 0.0))
    releases: dict[str, int] = {}
    for a in attempts:
        for site in a.get("survivors") or ():
            releases[site] = releases.get(site, 0) + 1
    sites = {}
    for site, n in sorted(releases.items()):
        eps = client_epsilon_for(noise_multiplier=z, rounds=n, delta=CLIENT_DP_DELTA) \
            if z > 0 else math.inf
        sites[site] = {"releases": n, "epsilon": eps}
    return {"delta": CLIENT_DP_DELTA, "noise_multiplier": z, "sites": sites}


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


# The job's ONNX model beside its report (fedge.coordinator.process export_final_model)
MODEL_FILE = "model.onnx"
# The dtype of the exported model's input: fedge.serve.jobs.export_job builds the model
# with fedge.train.models.build_model (``.float()``) and traces it on float32 rows
MODEL_INPUT_DTYPE = "float32"
# The name of the exported model's batch axis (fedge.serve.export: dynamic_axes)
BATCH_AXIS = "batch"
MODEL_FILE_AUTHORITY = (
    f"the metadata of {MODEL_FILE} (its `output` and `preprocessing` entries, and "
    "`feature_names` or `input_columns` for the column order): written by the same "
    "export from the same plan, it is the authority")


def model_file(out_dir: Path, status: dict[str, Any], plan_toml: str) -> dict[str, Any]:
    """What the job's ``model.onnx`` takes and returns, and whether it is there.

    The export (fedge.serve.jobs.export_job, run by the coordinator before it writes
    this report: fedge.coordinator.process finish_job) writes what the model's input
    needs and what its output means into the file's metadata (``preprocessing``,
    ``output``), from the plan's model and data set. This derives the same from the
    plan with the same functions (``_site_preprocessing``, ``_output_description``,
    and the model's input shape as fedge.coordinator.plan.model_input_shape gives it
    without torch), so a report can say it even when the export failed; the file's
    metadata stays the authority. A report is written after the export was tried
    (or skipped, having failed the same way before: admin.export_given_up), so a
    ``model.onnx`` absent from ``out_dir`` then is an export that failed: ``export``
    names the command that writes it by hand, and ``status["onnx_export"]`` (the
    ``{"failed": why, "retry": what gets it done}`` that ``jobs status`` gives) the
    reason, where the caller has it.

    Never raises for a plan it cannot read: ``input`` and ``output`` are then None and
    ``unknown`` says why (the file's metadata says what they are).
    """
    from fedge.coordinator.plan import model_input_shape, plan_labels
    from fedge.serve.jobs import (
        CheckpointError,
        _output_description,
        _site_preprocessing,
        model_spec_from_plan,
    )
    from fedge.train.model_names import ModelParamError

    job_id = str(status.get("job_id") or "")
    out_dir = Path(out_dir)
    present = (out_dir / MODEL_FILE).is_file()
    entry: dict[str, Any] = {"file": MODEL_FILE, "present": present,
                             "round": status.get("committed_round"),
                             "authority": MODEL_FILE_AUTHORITY,
                             "model": None, "input": None, "output": None, "unknown": "",
                             "export": None}
    try:
        name, params = model_spec_from_plan(plan_toml)
        shape = model_input_shape(name, params)
        if shape is None:
            raise ValueError(f"model {name!r}: a parameter its input shape needs is "
                             "missing or not an integer")
        dataset = plan_labels(plan_toml)["dataset"]
        entry["model"] = {"name": name, "params": params}
        entry["input"] = {
            "dtype": MODEL_INPUT_DTYPE, "shape": [BATCH_AXIS, *shape],
            # a tabular model's rows have this many features; an image model has none
            "features": shape[0] if len(shape) == 1 else None,
            "dataset": dataset,
            # fedge.serve.jobs.export_job: the rank of one example is its shape's length
            "preprocessing": _site_preprocessing(dataset, len(shape)),
        }
        entry["output"] = _output_description(name, params)
    except (CheckpointError, KeyError, ModelParamError, ValueError) as exc:
        entry["model"] = entry["input"] = entry["output"] = None
        entry["unknown"] = (f"the job's plan does not say ({exc}); " if plan_toml else
                            "no plan was given to the report; ") + MODEL_FILE_AUTHORITY
    if not present:
        # ck.job_dir: <state_dir>/jobs/<job>, the directory the report is written in
        state_dir = str(out_dir.parent.parent) if out_dir.parent.name == "jobs" \
            and out_dir.name == job_id else "STATE_DIR"
        recorded = status.get("onnx_export")
        recorded = recorded if isinstance(recorded, dict) else {}
        entry["export"] = {
            "failed": str(recorded.get("failed") or ""),
            "retry": str(recorded.get("retry") or ""),
            "command": f"fedge export --job {job_id} --state-dir {state_dir}",
        }
    return entry


def write_job_report(out_dir: Path, status: dict[str, Any], plan_toml: str = "") -> list[str]:
    """Write the report files into `out_dir` (the job's directory); returns their names.

    Written after the job's ONNX export was tried (fedge.coordinator.process
    finish_job): its "model_file" (`model_file`) says whether ``model.onnx`` is there.

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
    report["model_file"] = model_file(out_dir, status, plan_toml)
    write_atomic(out_dir / "report.json",
                 (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode(),
                 mode=0o644)
    # report.md last: its presence says every other file is in place (`jobs watch`
    # announces the results, and `jobs fetch` takes them, once it is listed)
    write_atomic(out_dir / "report.md", _markdown(report, written).encode(), mode=0o644)
    return ["report.json", "report.md", *written]


def _learning_curve(path: Path, report: dict[str, Any]) -> None:
    _save_png(_learning_curve_figure(report), path)


# The learning curve's title is wrapped to lines of at most this many characters,
# fewer where the rendered text is still wider than the figure (wide letters): a job
# id and a long job.name used to run off both edges of the 7-inch figure
TITLE_FONTSIZE = 11
TITLE_LINE_CHARS = 70


# A site's name in a plot's legend is cut to this many characters (a name may hold
# 128; report.md has it whole), and the legend sits right of the axes, off the data.
LEGEND_NAME_CHARS = 24
# Colours of matplotlib's default cycle; past them a site gets the next line style
# and marker, so up to 40 sites are each drawn in their own (colour, style) pair.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def site_styles(n: int) -> list[dict[str, str]]:
    """``n`` distinct line styles (colour, dashes, marker) for ``ax.plot``, in order."""
    return [{"color": _COLOURS[i % len(_COLOURS)],
             "linestyle": _STYLES[i // len(_COLOURS) % len(_STYLES)][0],
             "marker": _STYLES[i // len(_COLOURS) % len(_STYLES)][1]} for i in range(n)]


# A cut name keeps this many of its last characters: names of one federation often
# differ only at the end ("...-site-07"), which a cut after the head left out
LEGEND_NAME_TAIL = 8


def legend_label(name: str) -> str:
    """A site's name for a legend: at most LEGEND_NAME_CHARS characters, a longer one
    as its head, "…" and its last LEGEND_NAME_TAIL characters."""
    if len(name) <= LEGEND_NAME_CHARS:
        return name
    return name[:LEGEND_NAME_CHARS - LEGEND_NAME_TAIL - 1] + "…" + name[-LEGEND_NAME_TAIL:]


def legend_outside(ax: Any, ncol: int = 1) -> Any:
    """The legend right of the axes, where it covers no point (inside, it hid a site's
    only point in a 1-round job), in ``ncol`` columns."""
    return ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                     borderaxespad=0.0, ncol=ncol)


# A legend column holds at most this many entries; more sites get more columns (one
# column of 18 ran off the bottom of a 3.2-inch panel), and the figure widens for them
LEGEND_ROWS = 16
# Past this many sites their (colour, style) pairs would repeat, and the legend could
# not tell them apart: each site is then a thin grey line under one legend entry
# (report.md has every site's values)
SITE_KEY_MAX = len(_COLOURS) * len(_STYLES)
# The axes keep at least this width (inches) beside a legend of several columns
AXES_MIN_WIDTH = 4.5


def plot_sites(ax: Any, series: dict[str, tuple[list[Any], list[float]]],
               **kw: Any) -> int:
    """Each site's line in ``series`` (site: its x and y values) on ``ax``: up to
    SITE_KEY_MAX sites each in its own style and legend entry, more all in grey under
    one entry. Returns the number of legend entries drawn."""
    if len(series) <= SITE_KEY_MAX:
        for (site, (x, ys)), style in zip(series.items(), site_styles(len(series)),
                                          strict=True):
            ax.plot(x, ys, label=legend_label(site), **style, **kw)
        return len(series)
    for i, (x, ys) in enumerate(series.values()):
        ax.plot(x, ys, color="0.55", linestyle="-", marker=".", **kw,
                label=f"each of the {len(series)} sites" if i == 0 else "_nolegend_")
    return 1


def legend_columns(entries: int) -> int:
    """Columns for a legend of ``entries``: at most LEGEND_ROWS in each."""
    return max(1, math.ceil(entries / LEGEND_ROWS))


def fit_legends(fig: Any, width: float, panel_height: float) -> None:
    """Size ``fig`` (one column of panels, each with a legend_outside) so that every
    legend lies inside it: at least ``width`` wide, wider where a legend of several
    columns needs it beside AXES_MIN_WIDTH of axes, each panel at least
    ``panel_height`` tall and taller than its legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [ax.get_legend().get_window_extent(renderer) for ax in fig.axes
             if ax.get_legend() is not None]
    legend_w = max((b.width for b in boxes), default=0.0) / fig.dpi
    legend_h = max((b.height for b in boxes), default=0.0) / fig.dpi
    # about an inch of tick labels and y label left of the axes, a little between
    fig.set_size_inches(max(width, AXES_MIN_WIDTH + legend_w + 1.3),
                        max(panel_height, legend_h + 1.2) * len(fig.axes))


def round_axis(ax: Any, rounds: list[int]) -> None:
    """Whole-number round ticks. A job of one or two rounds gets a tick on each and half
    a round of margin: MaxNLocator alone gave 0.95..1.05 and no label on round 1."""
    from matplotlib.ticker import MaxNLocator

    if rounds and max(rounds) - min(rounds) < 2:
        ax.set_xticks(list(range(min(rounds), max(rounds) + 1)))
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(points: list[tuple[int, float]] | list[list[Any]], axis: list[int]) -> list[float]:
    """A site's values on every round of ``axis``, NaN where it has none: the line
    breaks at a round the site missed instead of running straight across it."""
    by_round = {int(p[0]): float(p[1]) for p in points}
    return [by_round.get(r, math.nan) for r in axis]


def _learning_curve_figure(report: dict[str, Any]) -> Any:
    """The learning curve as a matplotlib ``Figure`` (not yet saved)."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted(report["curves"])
    fig = Figure(figsize=(7, 3.2 * len(names)))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names, strict=True):
        c = report["curves"][name]
        seen = set(c["rounds"]) | {int(p[0]) for pts in c["sites"].values() for p in pts}
        axis = list(range(min(seen), max(seen) + 1)) if seen else []
        # markers: a site evaluated in one round only (the others it dropped out of)
        # is one point, which a line alone does not draw
        entries = plot_sites(ax, {site: (axis, _series(points, axis)) for site, points
                                  in sorted(c["sites"].items())}, ms=3, lw=1, alpha=0.6)
        ax.plot(axis, _series(list(zip(c["rounds"], c["aggregate"], strict=True)), axis),
                "k-o", lw=2, label="size-weighted")
        ax.set_xlabel("round")
        round_axis(ax, axis)
        ax.set_ylabel(f"{name} ({report['eval_split']})")
        ax.grid(alpha=0.3)
        legend_outside(ax, legend_columns(entries + 1))
    fit_legends(fig, 7, 3.2)
    label = _drawable(str(report.get("name") or ""))
    name = f" ({label})" if label else ""
    text = f"job {report['job_id']}{name}: federated evaluation of the global model"
    title = fig.suptitle("", fontsize=TITLE_FONTSIZE)
    renderer = FigureCanvasAgg(fig).get_renderer()
    for chars in range(TITLE_LINE_CHARS, 9, -10):
        # "$" escaped: a name holding two would be parsed as mathtext (may not parse)
        title.set_text("\n".join(textwrap.wrap(text, chars, break_long_words=True,
                                                break_on_hyphens=False)).replace("$", r"\$"))
        if title.get_window_extent(renderer).width <= 0.96 * fig.bbox.width:
            break
    fig.tight_layout()
    return fig


def _drawable(text: str) -> str:
    """``text`` with each character the plots' font has no glyph for (the default
    DejaVu Sans has no CJK), and each one not printable (an ESC of a terminal colour
    code, a line break), written as its ``\\uXXXX`` escape: drawn, it would be an
    empty box, or nothing. report.md and report.json keep the name as it is."""
    charmap = _font_charmap()
    return "".join(c if ord(c) in charmap and c.isprintable()
                   else f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"
                   for c in text)


@functools.cache
def _font_charmap() -> frozenset[int]:
    """The code points the plots' default font draws."""
    from matplotlib.font_manager import FontProperties, findfont
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(findfont(FontProperties())).get_charmap())


def _privacy_plot(path: Path, privacy: dict[str, list[tuple[int, float]]],
                  bound: str = "per record") -> None:
    _save_png(_privacy_figure(privacy, bound), path)


def _privacy_figure(privacy: dict[str, list[tuple[int, float]]],
                    bound: str = "per record") -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    entries = plot_sites(ax, {site: ([p[0] for p in points], [p[1] for p in points])
                              for site, points in privacy.items()})
    ax.set_xlabel("round")
    round_axis(ax, sorted({int(p[0]) for pts in privacy.values() for p in pts}))
    ax.set_ylabel("cumulative epsilon in this job (DP-SGD)")
    ax.set_title(f"epsilon {bound}", fontsize=9)
    ax.grid(alpha=0.3)
    legend_outside(ax, legend_columns(entries))
    fit_legends(fig, 7, 3.5)
    fig.tight_layout()
    return fig


def _save_png(fig: Any, path: Path) -> None:
    """Render ``fig`` and write it as ``path`` with write_atomic (temporary file, fsync,
    rename, directory fsync): after a power cut the plot that report.md (written
    after it) lists is whole, never a torn or empty file under its name.

    Raises:
        OSError: the directory cannot be written.
    """
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_atomic(path, buf.getvalue(), mode=0o644)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _cell(text: str, *, markers: bool = False) -> str:
    """Text for one table cell: a site's words may hold '|', line breaks, or HTML (a
    report rendered in a browser shows '<b>' as text, not as markup). With `markers`
    (a name: the plan's job.name), each markdown inline marker is backslash-escaped
    too, and a backslash where it would escape the next character (elsewhere
    CommonMark shows a backslash as it is)."""
    text = " ".join(str(text).split())
    if markers:
        text = _MARKDOWN_MARKERS.sub(lambda m: "\\" + m.group(0), text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|") or "–"


# Markdown's inline markers: a name is shown as the text it is, not as emphasis, a
# link, an image, code, or maths ('$x$' on GitHub and GitLab).
_MARKDOWN_MARKERS = re.compile(r"[`*_\[\]!~#$]|\\(?=[!-/:-@\[-`{-~])")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, so it cannot end early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _site_table(by_site: dict[str, Any], first: str = "site") -> list[str]:
    """One row per site and the aggregates, a last column with each site's examples in
    this split, and a note under it for each metric whose aggregate leaves a site out."""
    names = list(by_site)
    missing = {n: by_site[n].get("missing") or {} for n in names}
    sites = sorted({s for n in names for s in (*by_site[n]["sites"], *missing[n])})
    counts: dict[str, int] = {}
    for n in names:
        for s, k in (by_site[n].get("n_examples") or {}).items():
            if isinstance(k, int):
                counts[s] = max(counts.get(s, 0), k)
    n_col = [" examples |"] if counts else []
    out = [f"| {first} | " + " | ".join(names) + " |" + "".join(n_col),
           "|---|" + "---|" * (len(names) + len(n_col))]
    for s in sites:
        out.append(f"| {s} | " + " | ".join(_fmt(by_site[n]["sites"].get(s))
                                             for n in names) + " |"
                   + (f" {_fmt(counts.get(s))} |" if counts else ""))
    # the aggregate row's examples: the sum of the site rows' for the sites each
    # metric's aggregate covers (a site without a finite value is left out of it), one
    # number where every metric's is the same, else "–" and a note with each metric's
    weighed = {n: sum(counts.get(s, 0) for s in sites if s not in missing[n]) for n in names}
    same = len(set(weighed.values())) == 1
    out.append("| **aggregate** | " + " | ".join(_fmt(by_site[n]["aggregate"])
                                                 for n in names) + " |"
               + ((f" {next(iter(weighed.values()))} |" if same else " – |")
                  if counts else ""))
    if len(sites) > 1:  # each site counted once, as FLamby's per-client mean does
        out.append("| mean of sites | " + " | ".join(
            _fmt(_unweighted_mean(by_site[n]["sites"].values())) for n in names) + " |"
            + (" – |" if counts else ""))
    notes = [f"{n}: the aggregate and the mean of sites cover {len(sites) - len(missing[n])}"
             f" of {len(sites)} sites; no value from " + "; ".join(
                 f"{_cell(s)}: {_cell(w)}" for s, w in sorted(missing[n].items())) + "."
             for n in names if missing[n]]
    if counts and not same:
        notes.append("the aggregates cover different sites, so their examples differ by "
                     "metric: " + "; ".join(f"{n}: {k}" for n, k in weighed.items()) + ".")
    return out + (["", *(f"- {line}" for line in notes)] if notes else [])


def _with_counts(final: dict[str, Any], last_round: dict[str, Any] | None) -> dict[str, Any]:
    """The final round's values with that round's example counts and left-out sites
    (report.json's "final" keeps its own shape; its round's table has them)."""
    last_round = last_round or {}
    return {name: {**entry,
                   "n_examples": {s: n for s, n in (last_round.get(name) or {}).get(
                       "n_examples", {}).items() if s in entry["sites"]},
                   "missing": dict((last_round.get(name) or {}).get("missing") or {})}
            for name, entry in final.items()}


def _not_evaluated(report: dict[str, Any], rnd: str) -> list[str]:
    """The line after round ``rnd``'s table naming its survivors not in it, and why."""
    missing = report["eval_missing"].get(rnd)
    if not missing:
        return []
    return ["", "Not evaluated: " + "; ".join(
        f"{_cell(s)}: {_cell(w)}" for s, w in sorted(missing.items())) + "."]


def _unweighted_mean(values: Any) -> float | None:
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(present) / len(present) if present else None


def _sentence(text: str) -> str:
    """``text`` (a description fedge wrote) as a sentence of report.md: one line,
    capitalised, ending in a full stop."""
    text = _cell(text).rstrip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _sentences(description: dict[str, Any], keys: dict[str, str]) -> str:
    """The description's str entries ``keys`` (each after its lead-in), as sentences."""
    return " ".join(_sentence(lead + description[k]) for k, lead in keys.items()
                    if isinstance(description.get(k), str) and description[k])


def _model_file_section(report: dict[str, Any]) -> list[str]:
    """report.md's "Model file": what model.onnx takes and returns (`model_file`), or
    that it is absent and the command that writes it."""
    entry = report.get("model_file")
    if not entry:  # a summary written without its directory (summarise alone)
        return []
    partial = report["status"] != "completed"
    which = (f"the job's last committed model (round {entry['round']}), not a finished "
             "training" if partial else f"the job's final model (round {entry['round']})")
    out = ["", "## Model file", ""]
    export = entry.get("export")
    if export is None:
        out += [f"`{MODEL_FILE}`, beside this report: {which}.", ""]
    else:
        why = f": {_cell(export['failed'])}" if export.get("failed") else (
            " (the audit log's model_export_failed and model_export_skipped records, and "
            "`jobs status`, say why)")
        retry = export.get("retry") or ""
        # jobs status's retry names the command where it is the way (a cause that
        # does not pass); a restart's retry does not, and the command is said here
        out += [f"**`{MODEL_FILE}` is absent: its ONNX export failed{why}.**"
                + (f" {_sentence(retry)}" if retry else "")
                + (" Written, it holds " if export["command"] in retry else
                   f" Once the cause is fixed, `{export['command']}`, run on the "
                   "coordinator's host, writes it: ")
                + f"{which}, with what follows in its metadata.", ""]
    if entry.get("input") is None or entry.get("output") is None:
        return [*out, "What it takes and returns: "
                      f"{entry.get('unknown') or MODEL_FILE_AUTHORITY}."]
    inp, output = entry["input"], entry["output"]
    shape = ", ".join(str(d) for d in inp["shape"])
    rows = (f"each row the {inp['features']} features of data set "
            f"`{_cell(inp['dataset'], markers=True)}`, in the order of its metadata's "
            "`feature_names` or `input_columns`" if inp.get("features") is not None
            else f"images of data set `{_cell(inp['dataset'], markers=True)}`")
    prep = inp.get("preprocessing") or {}
    where = "not in the graph" if prep.get("in_graph") is False else "in the graph"
    out += [f"- **Input**: one {inp['dtype']} tensor of shape [{shape}] (`{BATCH_AXIS}`: "
            f"any number of examples); {rows}.",
            f"- **Preprocessing** ({_cell(prep.get('kind') or 'unstated')}, {where}): "
            + _sentences(prep, {"input": "", "transform": "Transform: ",
                                "fitted": "Fitted "}),
            f"- **Output** ({_cell(output.get('kind') or 'unstated')}"
            + (f", {_cell(output['task'])}" if output.get("task") else "") + "): "
            + _sentences(output, {"meaning": "", "class_names": ""}),
            "", f"Derived from the job's plan as the export derives it; "
                f"{MODEL_FILE_AUTHORITY}."]
    return out


def _markdown(report: dict[str, Any], plots: list[str]) -> str:
    names = sorted(report["final"])
    state, committed = report["status"], report["committed_round"]
    name = f" ({_cell(report['name'], markers=True)})" if report.get("name") else ""
    title = f"# Job {report['job_id']}{name}: {state}"
    if state in ("failed", "cancelled"):
        title += f", last committed round {committed} of {report['rounds_planned']}"
    out = [title, ""]
    if state in ("failed", "cancelled"):
        out += [f"**This job {state} after {committed} of {report['rounds_planned']} "
                f"rounds were committed: its model and metrics are those of its last "
                f"committed global model (round {committed}), not of a finished "
                "training.**" + (f" Why: {_cell(report['error'])}" if report["error"]
                                 else ""), ""]
    out += [f"{committed} of {report['rounds_planned']} rounds committed; "
            f"evaluation split `{report['eval_split'] or 'none'}`.", ""]
    out += [f"![{p}]({p})" for p in plots]
    if names:
        out += ["", "## Final round, each site and the size-weighted aggregate", "",
                "The aggregate weighs each site by its examples (a C-index or an AUC "
                "of the pooled records would differ); the mean of sites counts each "
                "site once, as FLamby's per-client mean does.", "",
                *_site_table(_with_counts(report["final"],
                                          report["rounds"].get(str(report["final_round"]))))]
        out += _not_evaluated(report, str(report["final_round"]))
    test = report["final_test"]
    if test is None and state in ("failed", "cancelled") and committed:
        # the sites score the final model on test after the last planned round only
        out += ["", f"**Not scored on the final test:** the job {state} before its last "
                f"round, so its last committed model (round {committed}) was never "
                f"evaluated on the sites' `{FINAL_TEST_SPLIT}` split."]
    if test is not None:
        out += ["", f"## Final test: round {test['round']}'s model on each site's "
                f"`{FINAL_TEST_SPLIT}` split", ""]
        if report["eval_split"] == FINAL_TEST_SPLIT:
            out += ["The plan evaluates every round on the test split: this is the last "
                    "round's evaluation.", ""]
        else:
            out += ["Evaluated once, after the last round; no round's training or model "
                    "choice saw these numbers. Sites without a test split are not in it.",
                    ""]
        if test["metrics"]:
            out += _site_table(test["metrics"])
        else:
            out += ["No site gave a result: the final model has no test metrics."]
        if test["missing"]:
            out += ["", "Not in the final test: " + "; ".join(
                f"{s}: {_cell(w)}" for s, w in sorted(test["missing"].items())) + "."]
    out += _model_file_section(report)
    if len(report["rounds"]) > 1 or (report["rounds"] and not names):
        out += ["", f"## Every round, each site (`{report['eval_split']}` split)", ""]
        for rnd, by_site in report["rounds"].items():
            out += ["", f"Round {rnd}:", "", *_site_table(by_site)]
    if report.get("examples"):
        splits = [sp for sp in ("train", report["eval_split"], FINAL_TEST_SPLIT)
                  if sp and any(sp in v for v in report["examples"].values())]
        splits = list(dict.fromkeys(splits))
        out += ["", "## Examples per site", "",
                "Each site's rows in each split, as it last reported them.", "",
                "| site | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        out += [f"| {s} | " + " | ".join(_fmt(v.get(sp)) for sp in splits) + " |"
                for s, v in report["examples"].items()]
    if report["eval_missing"]:
        out += ["", "## Survivors not evaluated, and why", "",
                "Each trained and was aggregated, but its evaluation gave no value; "
                "it is in no evaluation table of its round.", "",
                "| round | site | why |", "|---|---|---|"]
        out += [f"| {rnd} | {_cell(s)} | {_cell(w)} |"
                for rnd, sites in sorted(report["eval_missing"].items(),
                                         key=lambda kv: int(kv[0]))
                for s, w in sorted(sites.items())]
    if report.get("left_out"):
        out += ["", "## Sites left out of a round's cohort, and why", "",
                "Enrolled, but not asked to train in that round.", "",
                "| round | site | why |", "|---|---|---|"]
        out += [f"| {rnd} | {_cell(s)} | {_cell(w)} |"
                for rnd, sites in sorted(report["left_out"].items(), key=lambda kv: int(kv[0]))
                for s, w in sorted(sites.items())]
    out += ["", "## Rounds", "", "| round | attempt | status | seconds | cohort | survivors "
            "| dropped | reason |", "|---|---|---|---|---|---|---|---|"]
    for a in report["attempts"]:
        secs = (a.get("ended_at") or 0) - (a.get("started_at") or 0)
        reasons = a["dropped_reasons"]
        # a failed attempt's reason names its refusals; a committed one's dropped
        # sites each have their own
        why = a.get("reason") or "; ".join(f"{s}: {r}" for s, r in sorted(reasons.items()))
        out.append(f"| {a['round']} | {a['attempt']} | {a['status']} | {secs:.1f} | "
                   f"{len(a['cohort'])} | {len(a['survivors'])} | "
                   f"{', '.join(sorted(set(a['dropped']) | set(reasons))) or '–'} | "
                   f"{_cell(why)} |")
    if report["privacy"]:
        delta = report["privacy_delta"]
        out += ["", "## Privacy (DP-SGD), cumulative epsilon per site", "",
                f"Epsilon {report['privacy_bound']}."
                + (f" Each is an (epsilon, delta) bound with delta = {delta:g} (the "
                   "plan's privacy.dp.delta)." if delta is not None else "")
                + (" A Cox model's loss terms share risk sets: one record moves other "
                   "terms too, so this does not bound what one patient's record reveals."
                   if report["privacy_bound"] != "per record" else ""), "",
                "| site | epsilon after the last round |", "|---|---|"]
        out += [f"| {s} | " + (f"{v[-1][1]:.3f}" if math.isfinite(v[-1][1]) else
                               "unbounded (noise too small to bound anything)") + " |"
                for s, v in report["privacy"].items()]
    client = report.get("client_privacy")
    if client and client["sites"]:
        out += ["", "## Privacy (DP-FedAvg), client-level epsilon per site", "",
                f"Each is an (epsilon, delta) bound with delta = {client['delta']:g}, for "
                "replacing one site's whole data (so every record of it too), over the "
                "round sums that held the site's update (noise multiplier "
                f"{client['noise_multiplier']:g}). The site's own ledger (`fedge agent "
                "privacy`) is the authority: it also counts an update that left and was "
                "lost on the way.", "",
                "| site | sums holding its update | epsilon |", "|---|---|---|"]
        out += [f"| {s} | {v['releases']} | "
                + (f"{v['epsilon']:.3f}" if math.isfinite(v["epsilon"]) else "unbounded")
                + " |" for s, v in client["sites"].items()]
    if report["plan"]:
        fence = _fence(report["plan"])
        out += ["", "## Plan", "", f"{fence}toml", report["plan"].strip(), fence]
    return "\n".join(out) + "\n"
