"""`fedge demo`: Fed-TCGA-BRCA across six regional centres on one machine.

A coordinator and six agent processes on loopback over CurveZMQ, secure
aggregation on, fedge's recipe (examples/demo/plan.toml). Each centre holds
out a seeded ``VAL_FRACTION`` of its training rows as a validation split; the
plan's ``eval_split = "val"`` has every agent score each round's global model
on it, and the progress bar shows that live validation C-index (size-weighted
over the centres). Test rows are not looked at until the job is over. At the
end: a table of each centre's test C-index for the federated model, the
centre's local-only model (same recipe, its own training rows only) and pooled
training (all centres' training rows in one place: the upper reference a
federation tries to reach, impossible in practice); a report directory with
the validation learning curves (PNG), every metric (JSON) and the final model
in ONNX.
"""

from __future__ import annotations

import json
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fedge.demo.loopback import LoopbackFederation
from fedge.demo.tcga import CENTRES, load_centres, per_site_cindex, pooled_test_cindex

__all__ = ["DemoError", "run_demo"]

DEFAULT_PLAN = Path(__file__).resolve().parents[2] / "examples/demo/plan.toml"
STANDARDISE = "continuous"
VAL_FRACTION = 0.2  # of each centre's training rows, held out for the live validation C-index
SPLIT_SEED = 0  # fixes which rows are held out (the agents' [[datasets]] seed)


class DemoError(RuntimeError):
    """The demo cannot run (missing data, bad plan); the message says what to fix."""


def _check_data(data_dir: Path) -> None:
    missing = [f for f in ("brca.csv", "train_test_split.csv") if not (data_dir / f).is_file()]
    if missing:
        raise DemoError(
            f"Fed-TCGA-BRCA not found in {data_dir} (missing {', '.join(missing)}); "
            "pass --data DIR pointing at FLamby's fed_tcga_brca folder"
        )


def _baselines(plan: dict[str, Any], centres: list[Any]) -> tuple[dict[str, float], dict]:
    """Local-only per centre and pooled training, same recipe and budget, in this process."""
    from fedge.demo.sim import train_local_only
    from fedge.train.api import ModelSpec, TrainConfig, evaluate
    from fedge.train.data import pooled

    spec = ModelSpec(plan["model"]["name"], dict(plan["model"]["params"]))
    t = plan["train"]
    cfg = TrainConfig.from_dict(
        {k: t[k] for k in ("steps", "batch_size", "learning_rate", "weight_decay") if k in t}
        | {"seed": plan["job"]["seed"]}
    )
    rounds = int(plan["job"]["rounds"])
    local = {}
    for i, c in enumerate(centres):
        w = train_local_only(spec, c, cfg, rounds)
        local[f"centre-{i}"] = evaluate(spec, w, c, "test").metrics["c_index"]
    pool = pooled(centres)
    wp = train_local_only(spec, pool, cfg, rounds)
    return local, {"per_centre": _test_cindex(plan, wp, centres), "weights": wp}


def _test_cindex(plan: dict[str, Any], weights: np.ndarray, centres: list[Any]) -> dict[str, float]:
    """Each centre's test C-index of a model (its rows standardised as its agent does:
    the same data set table)."""
    from fedge.train.api import ModelSpec, evaluate

    spec = ModelSpec(plan["model"]["name"], dict(plan["model"]["params"]))
    return {
        f"centre-{i}": evaluate(spec, weights, c, "test").metrics["c_index"]
        for i, c in enumerate(centres)
    }


def _learning_curve_figure(curve: list[dict[str, Any]]) -> Any:
    """The validation C-index per round, size-weighted and per centre, as a matplotlib
    ``Figure`` (object API, not yet saved): each centre's line has markers, so a
    1-round demo still shows every centre; whole-number round ticks; the legend right
    of the axes, off the data."""
    from matplotlib.figure import Figure

    from fedge.coordinator.report import legend_outside, round_axis, site_styles

    rounds = [c["round"] for c in curve]
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    ax.plot(rounds, [c["weighted"] for c in curve], "k-o", lw=2, label="size-weighted")
    for i, style in enumerate(site_styles(CENTRES)):
        site = f"centre-{i}"
        values = [c["sites"].get(site, np.nan) for c in curve]
        # a small centre's validation rows may hold no comparable pair (no event):
        # its C-index is undefined every round, and the legend says so
        label = site if np.isfinite(values).any() else f"{site} (no C-index: no comparable pair)"
        ax.plot(rounds, values, lw=1, ms=4, alpha=0.7, label=label, **style)
    ax.set_xlabel("round")
    round_axis(ax, rounds)
    ax.set_ylabel("validation C-index (federated evaluation)")
    ax.set_title("Fed-TCGA-BRCA: global Cox model, per centre")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig


def _plots(report: Path, curve: list[dict[str, Any]]) -> list[str]:
    from matplotlib.figure import Figure

    from fedge.coordinator.report import round_axis

    _learning_curve_figure(curve).savefig(report / "learning_curve.png", dpi=110)
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    rounds = [c["round"] for c in curve]
    loss = [c.get("loss", np.nan) for c in curve]
    ax.plot(rounds, loss, "b-o")
    ax.set_xlabel("round")
    round_axis(ax, rounds)
    ax.set_ylabel("Cox partial-likelihood loss (validation, weighted)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "loss_curve.png", dpi=110)
    return ["learning_curve.png", "loss_curve.png"]


def _export(
    report: Path, weights: np.ndarray, plan: dict[str, Any], digest: str, centres: list[Any]
) -> list[str]:
    """The final model in ONNX: ``model.onnx`` on standardised features, and one
    ``model-centre-<i>.onnx`` per centre with that centre's own standardisation folded
    into the graph, so each appliance serves raw features.

    Each file's metadata says what ``fedge export`` says of a federated job's model
    (fedge.serve.jobs): its output, its feature names in input order, and for
    ``model.onnx`` that each site standardises its own rows (``per-site
    standardisation``), so that an appliance it is pushed to prepends its own
    constants instead of serving raw rows to a model trained on standardised ones."""
    try:
        from fedge.serve import export_onnx
        from fedge.serve.export import Standardisation
        from fedge.serve.jobs import _output_description, _site_preprocessing
    except ImportError:
        return []
    import torch

    from fedge.train.api import ModelSpec, build_model, load_flat

    spec = ModelSpec(plan["model"]["name"], dict(plan["model"]["params"]))
    model = build_model(spec)
    load_flat(model, weights)
    model.eval()
    n_in = int(spec.params["in_features"])
    dataset = str(plan["job"]["dataset"])
    names = [list(c.feature_names) for c in centres]
    if any(n != names[0] for n in names):  # one loader, one column order: a bug if not
        raise DemoError("the centres' feature columns differ; the demo's data cannot be "
                        "one federated model's input")
    meta = {"model": spec.name, "dataset": dataset, "model_digest": digest,
            "feature_names": json.dumps(names[0]),
            "output": json.dumps(_output_description(spec.name, dict(spec.params)))}
    export_onnx(
        model,
        torch.zeros(2, n_in),
        {**meta, "inputs": "features standardised by each centre with its own constants"},
        report / "model.onnx",
        preprocessing=_site_preprocessing(dataset, 1),
    )
    files = ["model.onnx"]
    for i, c in enumerate(centres):
        name = f"model-centre-{i}.onnx"
        prep = Standardisation(c.standardiser.mean.tolist(), c.standardiser.scale.tolist())
        export_onnx(
            model,
            torch.zeros(2, n_in),
            {**meta, "site": f"centre-{i}", "inputs": "raw FLamby features"},
            report / name,
            preprocessing=prep,
        )
        files.append(name)
    return files


def run_demo(
    data_dir: Path,
    report: Path,
    *,
    plan_path: Path = DEFAULT_PLAN,
    rounds: int | None = None,
    out: Any = None,
) -> dict[str, Any]:
    """Run the whole demo; returns the metrics written to ``report/metrics.json``.

    Raises:
        DemoError: missing data or plan.
        FederationError: a process failed or the job did not complete.
    """
    import sys

    from tqdm import tqdm

    out = out or sys.stdout
    t0 = time.monotonic()
    data_dir = Path(data_dir).resolve()
    _check_data(data_dir)
    if not plan_path.is_file():
        raise DemoError(f"plan {plan_path} not found")
    plan_text = plan_path.read_text()
    if rounds is not None:
        if rounds < 1:
            raise DemoError(f"--rounds {rounds} must be >= 1")
        plan_text = plan_text.replace(
            f"rounds = {tomllib.loads(plan_text)['job']['rounds']}", f"rounds = {rounds}", 1
        )
    plan = tomllib.loads(plan_text)
    n_rounds = int(plan["job"]["rounds"])
    eval_split = str(plan["job"].get("eval_split", "test"))
    report.mkdir(parents=True, exist_ok=True)
    dataset = plan["job"]["dataset"]
    sites = {
        f"centre-{c}": [
            {
                "name": dataset,
                "kind": "fed_tcga_brca",
                "path": str(data_dir),
                "site": c,
                "val_fraction": VAL_FRACTION,
                "seed": SPLIT_SEED,
                "standardise": STANDARDISE,
            }
        ]
        for c in range(CENTRES)
    }
    centres = load_centres(data_dir, STANDARDISE, val_fraction=VAL_FRACTION)
    curve: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="fedge-demo-") as tmp,
        LoopbackFederation(Path(tmp), sites) as fed,
    ):
        print(
            f"starting a coordinator and {CENTRES} hospital agents on loopback "
            "(CurveZMQ, secure aggregation on) ...",
            file=out,
            flush=True,
        )
        fed.start(timeout=150)
        print(
            f"federation up in {time.monotonic() - t0:.0f} s; submitting the plan "
            f"({plan['strategy']['name']}, {n_rounds} rounds)",
            file=out,
            flush=True,
        )
        job = fed.submit(plan_text)
        bar = tqdm(total=n_rounds, desc="rounds", unit="round", file=out, leave=True)

        def on_round(r: int, rows: list[dict[str, Any]]) -> None:
            agg = {x["name"]: float(x["value"]) for x in rows if x["site"] == "*"}
            entry = {
                "round": r,
                "weighted": agg.get("c_index", float("nan")),
                "loss": agg.get("loss", float("nan")),
                "sites": per_site_cindex(rows, eval_split),
            }
            curve.append(entry)
            bar.set_postfix_str(f"{eval_split} C-index {entry['weighted']:.3f}")
            bar.update(1)

        row = fed.wait_job(job, 600, on_round=on_round)
        bar.close()
        weights = fed.final_weights(job)
        digest = str(row.get("final_digest", ""))
    fed_time = time.monotonic() - t0
    local, pooled_res = _baselines(plan, centres)
    final_sites = _test_cindex(plan, weights, centres)
    print(
        f"\ntest C-index per centre (federated: the final global model; the test rows "
        f"trained and chose nothing: the job's final test scores this model only)\n"
        f"{'centre':10s} {'n test':>6s} {'federated':>10s} {'local-only':>11s} {'pooled':>8s}",
        file=out,
    )
    for i, c in enumerate(centres):
        s = f"centre-{i}"
        print(
            f"{s:10s} {len(c.test):6d} {final_sites.get(s, float('nan')):10.3f} "
            f"{local[s]:11.3f} {pooled_res['per_centre'][s]:8.3f}",
            file=out,
        )
    mean_fed = float(np.mean(list(final_sites.values()))) if final_sites else float("nan")
    mean_local = float(np.mean(list(local.values())))
    mean_pooled = float(np.mean(list(pooled_res["per_centre"].values())))
    print(f"{'mean':10s} {'':6s} {mean_fed:10.3f} {mean_local:11.3f} {mean_pooled:8.3f}", file=out)
    pooled_test = pooled_test_cindex(weights, centres)
    print(f"federated model on all test rows together: C-index {pooled_test:.3f}", file=out)
    files = _plots(report, curve)
    files += _export(report, weights, plan, digest, centres)
    metrics = {
        "plan": plan,
        "eval_split": eval_split,
        "val_fraction": VAL_FRACTION,
        "rounds": curve,
        "final": {
            "per_centre": final_sites,
            "mean_per_centre": mean_fed,
            "pooled_test_cindex": pooled_test,
        },
        "local_only": {"per_centre": local, "mean_per_centre": mean_local},
        "pooled_training": {"per_centre": pooled_res["per_centre"], "mean_per_centre": mean_pooled},
        "secure_aggregation": bool(plan["secagg"]["enabled"]),
        "model_digest": digest,
        "seconds": {"federation": fed_time, "total": time.monotonic() - t0},
        "files": files,
    }
    (report / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    print(
        f"report: {report}/ ({', '.join(['metrics.json', *files])}); {time.monotonic() - t0:.0f} s",
        file=out,
    )
    return metrics
