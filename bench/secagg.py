"""SecAgg+ round cost, fedge vs Flower 1.42's SecAgg+, side by side.

For n = 10 and n = 100 (both complete graphs at delta = 0.3), d in {1e6, 1e7}: client time
per round, server time with 0 % and 30 % dropouts (clients that drop after
sharing keys, the costly case: their pairwise masks must be rebuilt), bytes
sent per client (fedge: the wire codec's real frames), peak client memory
(tracemalloc, plus the float32 input the client holds) as a multiple of the
model's float32 size. fedge's times are the best of 3 rounds where a round is
short (n * d <= 1e8), one round otherwise.

The anchor is Flower itself, run in the same process tree: a bench-only
virtualenv ``.venv-flwr`` (created on first run, ``pip install flwr==1.42.0``)
runs ``bench/_flwr_driver.py``, which calls Flower's own per-stage client
functions and its server-side primitives.  Flower's server at d = 1e7 is not
run (minutes): it is run at d = 1e6, where its time splits into length-d vector
work (PRG streams, additions; measured apart) and the rest (Shamir, key
agreement); at 1e7 the vector part is scaled by 10, the rest kept (``*``).

Also the agent's reveal log (``fedge.agent.guard.RevealLog``), which records each
update before its unmasking shares leave: the time of one reveal on a log that
already holds 1 000 and 10 000 reveals (an appliance's life), beside the anchor,
one fsynced append of the same bytes to a plain file in the same directory.

Usage: ``python bench/secagg.py [--quick]`` (quick: d in {1e5, 1e6}).
Last line: ``RESULT client_vs_flower=… server30_vs_flower=… bytes_per_param=…
client_mem_ratio=… reveal_ms_10k=… reveal_vs_fsync=… reveal_10k_vs_1k=… abort_rate_30pct=…
abort_rate_30pct_delta0=…`` (speed ratios: the smallest over the table; bytes and
memory: the largest).

Dropouts are drawn uniformly at random. The abort rates are the fraction of rounds
(400 graph and dropout draws each, n in 10, 100, 200, 500, the worst n reported)
that end when 30 % of the sites drop before advertising keys, with the graph and
threshold derived for this bench's delta = 0.3 and for the plan default delta = 0
(the sparse graph is then sized for 20 % dropouts); a timed round that ends is
redrawn with the next seed and said so. Without its
anchor there is no figure: when Flower cannot be set up, its driver fails, or a
ratio comes out NaN, the reason goes to stderr and the bench exits 1 with no
RESULT line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLWR_VENV = REPO / ".venv-flwr"
FLWR_VERSION = "1.42.0"
ALPHA, DELTA, CLIP = 0.1, 0.3, 1.0
ABORT_COHORTS = (10, 100, 200, 500)


def flwr_python() -> Path | None:
    """The bench venv's python with flwr==1.42.0, creating it on first use."""
    py = FLWR_VENV / "bin" / "python"
    check = [str(py), "-c", f"import flwr; assert flwr.__version__ == '{FLWR_VERSION}'"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating {FLWR_VENV} with flwr=={FLWR_VERSION} (first run only)", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(FLWR_VENV)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", f"flwr=={FLWR_VERSION}"],
            check=True, timeout=600,
        )
        subprocess.run(check, check=True)
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"cannot set up Flower: {exc}", file=sys.stderr, flush=True)
        return None
    return py


def pick_dead(ids, fraction, rng):
    """A dead set of round(fraction * n) sites drawn uniformly at random (no redraws: a
    set that ends the round counts towards the abort rate, it is not hidden)."""
    return set(rng.sample(ids, round(fraction * len(ids))))


def abort_rate(n: int, delta: float, fraction: float, trials: int = 400) -> float:
    """The fraction of rounds of n sites (the graph and threshold ``derive`` gives for
    alpha = ALPHA, ``delta``) that end when round(fraction * n) sites drawn uniformly
    at random drop before advertising keys: the server's rule, every kept site needs t
    of its neighbourhood kept (ServerSession._prune), until fewer than t remain."""
    from fedge.secagg.config import SecAggConfig, neighbours

    cfg = SecAggConfig.derive(n, alpha=ALPHA, delta=delta, clip=CLIP, vector_length=1)
    ids = [f"hospital-{i:03d}" for i in range(n)]
    ended = 0
    for trial in range(trials):
        rng = random.Random(trial)
        graph = {c: v | {c} for c, v in neighbours(ids, cfg.degree, rng.randbytes(32)).items()}
        alive = set(ids) - pick_dead(ids, fraction, rng)
        while short := {c for c in alive if len(graph[c] & alive) < cfg.threshold}:
            alive -= short
        ended += len(alive) < cfg.threshold
    return ended / trials


def run_fedge(n: int, d: int, fraction: float, x: np.ndarray, seed: int) -> dict:
    """One real round: n clients (one shared input array, to keep memory at O(d)),
    the clients in the dead set stop answering after sharing keys."""
    import fedge.wire.messages  # noqa: F401  registers the secagg messages
    from fedge.secagg import (
        ClientSession,
        Identity,
        Roster,
        RoundContext,
        SecAggConfig,
        ServerSession,
    )
    from fedge.secagg import messages as msgs
    from fedge.wire.codec import encode, frame_nbytes

    ids = [f"hospital-{i:03d}" for i in range(n)]
    console = Identity.generate()
    identities = {c: Identity.generate() for c in ids}
    roster = Roster.build({c: i.public_bytes() for c, i in identities.items()}, console)
    cfg = SecAggConfig.derive(n, alpha=ALPHA, delta=DELTA, clip=CLIP, vector_length=d)
    ctx = RoundContext("bench-job", 1, hashlib.sha256(b"model").digest())
    clients = {c: ClientSession(cfg, ctx, c, identities[c], roster, x) for c in ids}
    server = ServerSession(cfg, ctx, ids, roster)
    dead = pick_dead(ids, fraction, random.Random(seed))
    traced = next(c for c in ids if c not in dead)
    client_s = dict.fromkeys(ids, 0.0)
    sent = dict.fromkeys(ids, 0)
    server_s = 0.0
    peak = 0
    now = 0.0
    t0 = time.perf_counter()
    queue = list(server.start(now))
    server_s += time.perf_counter() - t0
    for _ in range(10):
        while queue:
            cid, message = queue.pop(0)
            if cid in dead and not isinstance(message, (msgs.AdvertiseRequest,
                                                        msgs.AdvertisedKeys)):
                continue
            if cid == traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            replies = clients[cid].receive(message, now)
            client_s[cid] += time.perf_counter() - t0
            if cid == traced:
                peak = max(peak, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
            for reply in replies:
                frames = encode(reply, sender=cid, job=ctx.job_id, round=ctx.round)
                sent[cid] += sum(frame_nbytes(f) for f in frames)
                del frames
                t0 = time.perf_counter()
                queue += server.receive(cid, reply, now)
                server_s += time.perf_counter() - t0
            del replies
        if server.done:
            break
        now += cfg.stage_timeout + 1
        t0 = time.perf_counter()
        queue += server.tick(now)
        server_s += time.perf_counter() - t0
    if server.result is None:
        return {"aborted": f"{type(server.failure).__name__}: {server.failure}"}
    n_alive = len(server.result.survivors)
    plain = np.clip(x.astype(np.float64), -CLIP, CLIP) * n_alive
    step = 2 * CLIP / (2 ** cfg.bits - 1)
    err = float(np.abs(server.result.total - plain).max())
    assert err <= n_alive * step, f"sum is off by {err}"
    alive = [c for c in ids if c not in dead and c != traced]
    return {
        "client_s": sum(client_s[c] for c in alive) / len(alive),
        "server_s": server_s,
        "bytes": max(sent[c] for c in ids if c not in dead),
        "peak": peak,
        "threshold": cfg.threshold,
        "degree": cfg.degree,
    }


def timed_round(n: int, d: int, fraction: float, x: np.ndarray, seed: int) -> dict:
    """The first round that completes, over dead sets drawn from seed, seed + 1, ...
    (a round that ends costs no unmasking to time; the abort rate is measured apart)."""
    for attempt in range(20):
        run = run_fedge(n, d, fraction, x, seed=seed + attempt)
        if "aborted" not in run:
            return run
        print(f"fedge n={n} drop={fraction:.0%} seed={seed + attempt}: round ended, "
              f"{run['aborted'][:120]}", flush=True)
    raise RuntimeError(f"20 rounds of n={n} at {fraction:.0%} dropouts all ended")


FLOWER_TIMEOUT_S = 1800


def run_flower(py: Path, n: int, sizes: list[int], server_sizes: list[int], threshold: int,
               degree: int) -> dict | None:
    """Flower's figures from its driver, or None (the reason on stderr)."""
    args = {
        "n": n, "ds": sizes, "server_ds": server_sizes, "num_shares": degree + 1,
        "threshold": threshold, "measure_clients": 2 if n <= 10 else 1,
        "validate": n <= 10, "drop_fractions": [0.0, DELTA], "seed": 1,
    }
    try:  # about 6 minutes on a quiet 2-core machine at n=100; more on a busy one
        proc = subprocess.run(
            [str(py), str(REPO / "bench" / "_flwr_driver.py"), json.dumps(args)],
            capture_output=True, text=True, timeout=FLOWER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        print(f"Flower driver did not finish within {FLOWER_TIMEOUT_S} s (a busy machine?): "
              "no Flower figures this run", file=sys.stderr, flush=True)
        return None
    if proc.returncode != 0:
        print(f"Flower driver failed (exit {proc.returncode}): {proc.stderr[-2000:]}",
              file=sys.stderr, flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reveal_log_cost(d: int = 1000, reps: int = 30) -> dict[str, float]:
    """Milliseconds per reveal at 1 000 and 10 000 earlier reveals, and the fsync anchor
    (median of ``reps``; ``d`` coordinates per update)."""
    import statistics
    import tempfile

    from fedge.agent.guard import RevealLog

    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        log = RevealLog(Path(tmp) / "revealed.jsonl")
        done = 0
        for mark in (1000, 10_000):
            for i in range(done, mark):
                log.check_and_record(i.to_bytes(32, "big"), ["a", "b"],
                                     rng.standard_normal(d) if i >= mark - 1024 else None)
            done = mark
            times = []
            for _ in range(reps):
                u = rng.standard_normal(d)
                t = time.perf_counter()
                log.check_and_record(done.to_bytes(32, "big"), ["a", "b"], u)
                times.append(time.perf_counter() - t)
                done += 1
            out[f"ms_{mark // 1000}k"] = statistics.median(times) * 1e3
        line = (Path(tmp) / "revealed.jsonl").read_bytes().splitlines()[-1] + b"\n"
        anchor = []
        fd = os.open(Path(tmp) / "plain", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for _ in range(reps):
                t = time.perf_counter()
                os.write(fd, line)
                os.fsync(fd)
                anchor.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        out["fsync_ms"] = statistics.median(anchor) * 1e3
        out["bytes"] = float((Path(tmp) / "revealed.jsonl").stat().st_size)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d in {1e5, 1e6} instead")
    opts = parser.parse_args()
    sizes = [100_000, 1_000_000] if opts.quick else [1_000_000, 10_000_000]
    cohorts = [10, 100]
    abort = {(n, delta): abort_rate(n, delta, DELTA)
             for n in ABORT_COHORTS for delta in (DELTA, 0.0)}
    for (n, delta), rate in abort.items():
        print(f"abort rate: n={n} [secagg] delta={delta}: {rate:.1%} of rounds end when "
              f"{DELTA:.0%} of sites, drawn uniformly, drop before advertising keys",
              flush=True)
    reveal = reveal_log_cost()
    print(f"reveal log: {reveal['ms_1k']:.2f} ms per reveal after 1 000 reveals, "
          f"{reveal['ms_10k']:.2f} ms after 10 000 ({reveal['bytes'] / 1e6:.1f} MB on disk); "
          f"anchor: one fsynced append of the same line {reveal['fsync_ms']:.2f} ms",
          flush=True)
    py = flwr_python()
    if py is None:
        return no_anchor("Flower (the anchor) cannot run in this environment")
    rows = []
    for n in cohorts:
        ours = {}
        for d in sizes:
            x = np.random.default_rng(d).uniform(-1, 1, d).astype(np.float32)
            for fraction in (0.0, DELTA):
                # best of 3 where a round is short (n * d <= 1e8: under a second), so
                # one stray pause cannot set the figure; the long rounds run once
                runs = [timed_round(n, d, fraction, x, seed=n)
                        for _ in range(3 if n * d <= 100_000_000 else 1)]
                ours[(d, fraction)] = {
                    **runs[0],
                    "client_s": min(r["client_s"] for r in runs),
                    "server_s": min(r["server_s"] for r in runs),
                    "peak": max(r["peak"] for r in runs),
                }
                print(f"fedge n={n} d={d:.0e} drop={fraction:.0%}: "
                      f"client {ours[(d, fraction)]['client_s']:.3f}s "
                      f"server {ours[(d, fraction)]['server_s']:.3f}s", flush=True)
            del x
        t, k = ours[(sizes[0], 0.0)]["threshold"], ours[(sizes[0], 0.0)]["degree"]
        t0 = time.perf_counter()
        server_sizes = sizes[:1]
        flower_sizes = sizes
        flower = run_flower(py, n, flower_sizes, server_sizes, t, k)
        if flower is None:
            return no_anchor(f"Flower's driver failed for n={n}")
        print(f"Flower n={n}: driver ran {time.perf_counter() - t0:.0f}s", flush=True)
        val = flower["sizes"][str(flower_sizes[0])]["server"]["0.0"]["max_abs_error"]
        if val is not None:
            print(f"Flower n={n}: unmasked mean max error {val:.2e} (driver check)", flush=True)
        for d in sizes:
            rows.append(table_row(n, d, server_sizes, ours, flower))
    print_table(rows)
    missing = [f"{key} at n={r['n']} d={r['d']:.0e}" for r in rows
               for key in ("client_x", "server30_x") if not math.isfinite(r[key])]
    if missing:
        return no_anchor("no ratio for " + ", ".join(missing))
    print(
        "RESULT "
        f"client_vs_flower={min(r['client_x'] for r in rows):.1f} "
        f"server30_vs_flower={min(r['server30_x'] for r in rows):.1f} "
        f"bytes_per_param={max(r['bytes_per_param'] for r in rows):.4f} "
        f"client_mem_ratio={max(r['mem_ratio'] for r in rows):.2f} "
        f"reveal_ms_10k={reveal['ms_10k']:.2f} "
        f"reveal_vs_fsync={reveal['ms_10k'] / reveal['fsync_ms']:.2f} "
        f"reveal_10k_vs_1k={reveal['ms_10k'] / reveal['ms_1k']:.2f} "
        f"abort_rate_30pct={max(r for (_, dl), r in abort.items() if dl == DELTA):.3f} "
        f"abort_rate_30pct_delta0={max(r for (_, dl), r in abort.items() if dl == 0):.3f}"
    )
    return 0


def no_anchor(reason: str) -> int:
    """A ratio without its anchor is no figure: say why on stderr, print no RESULT."""
    print(f"secagg bench: {reason}; no RESULT line", file=sys.stderr, flush=True)
    return 1


def flower_server_s(flower: dict, d: int, server_sizes: list[int], fraction: float) -> float:
    """Measured at d; else the measured run's fixed part plus its vector part scaled to d."""
    d0 = d if d in server_sizes else server_sizes[-1]
    run = flower["sizes"][str(d0)]["server"][str(fraction)]
    fixed = run["server_s"] - run["server_vector_s"]
    return fixed + run["server_vector_s"] * d / d0


def table_row(n, d, server_sizes, ours, flower) -> dict:
    o0, o30 = ours[(d, 0.0)], ours[(d, DELTA)]
    row = {
        "n": n, "d": d, "k": o0["degree"], "t": o0["threshold"],
        "client_s": o0["client_s"], "server0_s": o0["server_s"], "server30_s": o30["server_s"],
        "bytes_per_param": o0["bytes"] / d, "mem_ratio": (4 * d + o0["peak"]) / (4 * d),
        "f_client_s": float("nan"), "f_server0_s": float("nan"), "f_server30_s": float("nan"),
        "f_bytes_per_param": float("nan"), "f_mem_ratio": float("nan"), "extrapolated": False,
    }
    if flower:
        f = flower["sizes"][str(d)]
        unmask = flower["sizes"][str(server_sizes[-1])]["client_unmask_s"]
        row.update(
            f_client_s=f["client_setup_s"] + f["client_masked_input_s"] + unmask,
            f_server0_s=flower_server_s(flower, d, server_sizes, 0.0),
            f_server30_s=flower_server_s(flower, d, server_sizes, DELTA),
            f_bytes_per_param=f["client_bytes"] / d,
            f_mem_ratio=(4 * d + f["client_peak_bytes"]) / (4 * d),
            extrapolated=d not in server_sizes,
        )
    row["client_x"] = row["f_client_s"] / row["client_s"]
    row["server30_x"] = row["f_server30_s"] / row["server30_s"]
    return row


def print_table(rows) -> None:
    head = (f"{'n':>4} {'d':>6} {'k':>3} {'t':>3} | {'client s':>17} {'x':>6} | "
            f"{'server s 0%':>18} | {'server s 30%':>18} {'x':>6} | {'bytes/param':>13} | "
            f"{'peak mem / 4d':>13}")
    print()
    print("fedge vs Flower 1.42 SecAgg+ (each cell: fedge / Flower; x = Flower/fedge)")
    print(head)
    print("-" * len(head))
    for r in rows:
        star = "*" if r["extrapolated"] else " "
        print(
            f"{r['n']:>4} {r['d']:>6.0e} {r['k']:>3} {r['t']:>3} | "
            f"{r['client_s']:>7.3f} / {r['f_client_s']:>7.3f} {r['client_x']:>6.1f} | "
            f"{r['server0_s']:>7.3f} / {r['f_server0_s']:>7.2f}{star} | "
            f"{r['server30_s']:>7.3f} / {r['f_server30_s']:>7.2f}{star} {r['server30_x']:>6.1f} | "
            f"{r['bytes_per_param']:>5.3f} / {r['f_bytes_per_param']:>5.3f} | "
            f"{r['mem_ratio']:>5.2f} / {r['f_mem_ratio']:>5.2f}"
        )
    print("* Flower server not run at this d: its run at the smaller d, with the length-d")
    print("  vector work (PRG, additions; timed apart) scaled by the ratio of sizes.")
    print("Flower client = setup + share keys + masked vector + unmask, its own functions;")
    print("fedge client = every ClientSession.receive of the round (1 thread); the fedge")
    print(f"server removes masks with the core's kernel on all {os.cpu_count()} cores; Flower's")
    print("numpy runs on one.  30% of clients drop after sharing keys (masks to rebuild).")


if __name__ == "__main__":
    sys.exit(main())
