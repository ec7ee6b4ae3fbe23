"""Fed-TCGA-BRCA through the real federation, beside FLamby's published numbers.

One coordinator and six agent processes (`fedge coordinator`, `fedge agent`)
on loopback over CurveZMQ; every federated number below comes from jobs
submitted to that federation, with SecAgg+ on unless stated.

1. FLamby's protocol: Linear(39,1) Cox, batch 8, 100 local SGD steps per round,
   5 rounds, FLamby's per-strategy learning rates, seeds 42-46, raw features;
   FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad; pooled and local-only
   baselines (not federated: trained in this process, 500 SGD steps, lr 0.1).
2. fedge's recipe: the candidate grid of fedge.demo.recipe scored by federated
   3-fold cross-validation inside each centre's training split (jobs on the
   ``tcga_cv<k>_<std>`` data sets, whose evaluated split is the held-out fold;
   test rows are not loaded), the schedule (rounds) picked from the same jobs;
   then the winner is trained with seeds 42-46 and tested.
3. Secure aggregation on vs off, seed 42, every strategy.

Anchor: FLamby's published per-client C-index for each strategy; the ratio is
fedge / FLamby. Last line: RESULT best_cindex best_pooled_cindex fedavg_cindex
secagg_delta (plus the recipe chosen).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedge.demo.loopback import FederationError, LoopbackFederation  # noqa: E402
from fedge.demo.recipe import CHECK_ROUNDS  # noqa: E402
from fedge.demo.tcga import (  # noqa: E402
    FLAMBY_PUBLISHED,
    FLAMBY_STRATEGIES,
    SEEDS,
    JobPlan,
    default_data_dir,
    load_centres,
    per_site_cindex,
    pooled_test_cindex,
    site_tables,
)

STDS = ("continuous",)
FOLDS = 3
CV_ROUNDS = 20


def candidates() -> list[dict]:
    """fedge.demo.recipe's default survival grid, as plan pieces."""
    from fedge.demo.recipe import survival_candidates

    return [
        {
            "name": c.name,
            "std": c.standardise,
            "wd": c.train.weight_decay,
            "strategy": c.strategy.name,
            "lr": c.train.lr,
            "params": dict(c.strategy.params),
        }
        for c in survival_candidates(CV_ROUNDS)
    ]


def run_job(fed: LoopbackFederation, plan: JobPlan, timeout: float = 600):
    """Submit, wait; returns {round: {site: c_index, "*": size-weighted}} and final weights."""
    per_round: dict[int, dict[str, float]] = {}

    def on_round(r: int, rows: list[dict]) -> None:
        sites = per_site_cindex(rows)
        for x in rows:
            if x["site"] == "*" and x["name"] == "c_index" and x["split"] == "test":
                sites["*"] = float(x["value"])
        per_round[r] = sites

    job = fed.submit(plan.text())
    fed.wait_job(job, timeout, on_round=on_round)
    return per_round, fed.final_weights(job)


def client_mean(sites: dict[str, float]) -> float:
    return float(np.mean([v for k, v in sites.items() if k != "*"]))


class Supervised:
    """Jobs on a loopback federation; if a process dies (as when the compiled core is
    rebuilt in place under running processes), a fresh federation is started and that
    job rerun once. Restarts are printed."""

    def __init__(self, root: Path, tables: dict) -> None:
        self.root, self.tables, self.starts = root, tables, 0
        self.fed = self._start()

    def _start(self) -> LoopbackFederation:
        self.starts += 1
        fed = LoopbackFederation(self.root / f"federation-{self.starts}", self.tables)
        try:
            fed.start(timeout=180)
        except BaseException:
            fed.close()
            raise
        return fed

    def run(self, plan: JobPlan):
        try:
            return run_job(self.fed, plan)
        except FederationError as exc:
            print(
                f"  ! {str(exc).splitlines()[0]}: restarting the federation, rerunning the job",
                flush=True,
            )
            self.fed.close()
            self.fed = self._start()
            return run_job(self.fed, plan)

    def close(self) -> None:
        self.fed.close()

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def baselines(data_dir: Path, seeds: tuple[int, ...]) -> tuple[float, float]:
    """Pooled and local-only (FLamby-style: raw features, lr 0.1, batch 8, 500 steps)."""
    from fedge.demo.sim import train_local_only
    from fedge.train.api import ModelSpec, TrainConfig, evaluate
    from fedge.train.data import pooled

    centres = load_centres(data_dir, "none")
    pool = pooled(centres)
    pooled_scores, local_scores = [], []
    for seed in seeds:
        spec = ModelSpec("cox_linear", {"in_features": 39, "seed": seed})
        cfg = TrainConfig(steps=100, batch_size=8, lr=0.1, seed=seed)
        w = train_local_only(spec, pool, cfg, 5)
        pooled_scores.append(
            np.mean([evaluate(spec, w, c, "test").metrics["c_index"] for c in centres])
        )
        local_scores.append(
            np.mean(
                [
                    evaluate(spec, train_local_only(spec, c, cfg, 5), c, "test").metrics["c_index"]
                    for c in centres
                ]
            )
        )
    return float(np.mean(pooled_scores)), float(np.mean(local_scores))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 seeds, FedAvg and FedAdam only, 2 CV candidates (smoke run)",
    )
    args = ap.parse_args(argv)
    seeds = SEEDS[:2] if args.quick else SEEDS
    strategies = ["fedavg", "fedadam"] if args.quick else list(FLAMBY_STRATEGIES)
    grid = candidates()[:2] if args.quick else candidates()
    t0 = time.monotonic()

    variants = (
        [("tcga_raw", "none", None)]
        + [(f"tcga_{s}", s, None) for s in STDS]
        + [(f"tcga_cv{k}_{s}", s, (FOLDS, k)) for s in STDS for k in range(FOLDS)]
    )
    raw_centres = load_centres(args.data, "none")
    std_centres = {s: load_centres(args.data, s) for s in STDS}
    with (
        tempfile.TemporaryDirectory(prefix="fedge-bench-") as tmp,
        Supervised(Path(tmp), site_tables(args.data, variants)) as sup,
    ):
        print(
            f"federation up: coordinator + {len(sup.fed.agents)} agents on loopback "
            f"({time.monotonic() - t0:.0f} s)",
            flush=True,
        )

        # 1. FLamby's protocol, secure aggregation on
        table: dict[str, tuple[float, float, float]] = {}
        finals42: dict[str, float] = {}
        weights42: dict[str, np.ndarray] = {}
        for strat in strategies:
            lr, params = FLAMBY_STRATEGIES[strat]
            client, pooled_ = [], []
            for seed in seeds:
                rounds, w = sup.run(JobPlan("tcga_raw", 5, seed, strat, params, lr))
                sites = rounds[max(rounds)]
                client.append(client_mean(sites))
                pooled_.append(pooled_test_cindex(w, raw_centres))
                if seed == seeds[0]:
                    finals42[strat] = client[-1]
                    weights42[strat] = w
            table[strat] = (float(np.mean(client)), float(np.std(client)), float(np.mean(pooled_)))
            print(
                f"  {strat:10s} per-client {table[strat][0]:.4f} ± {table[strat][1]:.4f}  "
                f"pooled-test {table[strat][2]:.4f}  seeds {np.round(client, 3).tolist()} "
                f"({time.monotonic() - t0:.0f} s)",
                flush=True,
            )

        # 3. secure aggregation off, first seed
        deltas, wdiff = {}, {}
        for strat in strategies:
            lr, params = FLAMBY_STRATEGIES[strat]
            rounds, w_off = sup.run(
                JobPlan("tcga_raw", 5, seeds[0], strat, params, lr, secagg=False)
            )
            off = client_mean(rounds[max(rounds)])
            deltas[strat] = abs(off - finals42[strat])
            wdiff[strat] = float(np.max(np.abs(w_off - weights42[strat])))

        # 2. federated cross-validation inside the training splits
        print(
            f"\nfederated {FOLDS}-fold CV inside each centre's training split "
            "(score: size-weighted C-index of the held-out folds):",
            flush=True,
        )
        scores: dict[tuple[int, int], float] = {}
        for i, cand in enumerate(grid):
            per_fold = []
            for k in range(FOLDS):
                rounds, _ = sup.run(
                    JobPlan(
                        f"tcga_cv{k}_{cand['std']}",
                        CV_ROUNDS,
                        0,
                        cand["strategy"],
                        cand["params"],
                        cand["lr"],
                        weight_decay=cand["wd"],
                    ),
                )
                per_fold.append({r: rounds[r].get("*", float("nan")) for r in CHECK_ROUNDS})
            for r in CHECK_ROUNDS:
                scores[(i, r)] = float(np.mean([f[r] for f in per_fold]))
            print(
                f"  {cand['strategy']} std={cand['std']:10s} wd={cand['wd']:<5g} "
                + " ".join(f"R{r}={scores[(i, r)]:.4f}" for r in CHECK_ROUNDS),
                flush=True,
            )
        best_i, best_r = max(scores, key=lambda k: (scores[k], -k[1]))
        best = grid[best_i]
        print(
            f"  chosen: {best['strategy']} std={best['std']} wd={best['wd']:g} "
            f"rounds={best_r} (CV score {scores[(best_i, best_r)]:.4f})",
            flush=True,
        )

        recipe_client, recipe_pooled = [], []
        for seed in seeds:
            rounds, w = sup.run(
                JobPlan(
                    f"tcga_{best['std']}",
                    best_r,
                    seed,
                    best["strategy"],
                    best["params"],
                    best["lr"],
                    weight_decay=best["wd"],
                ),
            )
            recipe_client.append(client_mean(rounds[max(rounds)]))
            recipe_pooled.append(pooled_test_cindex(w, std_centres[best["std"]]))

    pooled_base, local_base = baselines(args.data, seeds)
    print(
        "\nFed-TCGA-BRCA, mean per-client test C-index over 6 centres x "
        f"{len(seeds)} seeds (fedge: real federation, SecAgg+ on)"
    )
    print(
        f"{'method':24s} {'fedge':>8s} {'± sd':>7s} {'pooled-test':>12s} {'FLamby':>8s} "
        f"{'ratio':>6s}"
    )
    for strat, (mean, sd, pooled_) in table.items():
        pub = FLAMBY_PUBLISHED[strat]
        print(f"{strat:24s} {mean:8.4f} {sd:7.4f} {pooled_:12.4f} {pub:8.3f} {mean / pub:6.3f}")
    print(
        f"{'pooled (in-process)':24s} {pooled_base:8.4f} {'':7s} {'':12s} "
        f"{FLAMBY_PUBLISHED['pooled']:8.3f} {pooled_base / FLAMBY_PUBLISHED['pooled']:6.3f}"
    )
    print(f"{'local-only (in-process)':24s} {local_base:8.4f} {'':7s} {'':12s} {'n/a':>8s}")
    rc, rp = float(np.mean(recipe_client)), float(np.mean(recipe_pooled))
    print(
        f"{'fedge recipe':24s} {rc:8.4f} {float(np.std(recipe_client)):7.4f} {rp:12.4f} "
        f"{max(FLAMBY_PUBLISHED.values()):8.3f} {rc / max(FLAMBY_PUBLISHED.values()):6.3f}"
    )
    print(
        "secure aggregation on vs off, |delta C-index| (seed "
        f"{seeds[0]}): " + ", ".join(f"{s}={d:.5f}" for s, d in deltas.items())
    )
    print(
        "  (final weights on vs off differ by at most "
        + ", ".join(f"{s}={d:.1e}" for s, d in wdiff.items())
        + ": SecAgg+ stochastic quantisation; adaptive servers with tau=1e-8 amplify it on"
        " coordinates whose mean update is ~0, i.e. rare features, without changing the ranking)"
    )
    print(
        "note: FedAvg/FedProx follow FLamby on raw features (age in years) with client lr 0.1;"
        " the age coefficient flips sign between rounds, so the seed decides whether round 5"
        " lands on a good or an inverted model (see the per-seed values); standardising per"
        " centre removes this (fedge recipe)."
    )
    print(f"total {time.monotonic() - t0:.0f} s")
    recipe = f"{best['strategy']}/std={best['std']}/wd={best['wd']:g}/rounds={best_r}"
    print(
        f"RESULT best_cindex={rc:.4f} best_pooled_cindex={rp:.4f} "
        f"fedavg_cindex={table['fedavg'][0]:.4f} secagg_delta={max(deltas.values()):.5f} "
        f"recipe={recipe}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
