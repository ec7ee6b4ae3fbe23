"""Scale benchmark: one coordinator, N agents, secure aggregation, d = 1e5.

The coordinator is a real `fedge coordinator` process; the N agents run in a
few host processes, many per process, each one the ordinary agent code
(`fedge.agent.process.run_agent` + `fedge.agent.runtime.Agent`) with its own
CurveZMQ DEALER socket, identity and SecAgg+ client, doing trivial local
training (`SyntheticTrainer`). Everything goes over loopback TCP.

For each N in {10, 100, 500} (``--quick``: {10, 100}) it runs a 2-round job and
reports: round latency (round 2, steady state: train task, SecAgg+ with the
sparse graph above 64 clients, strategy step, evaluation, commit), the
coordinator's CPU time and peak RSS (VmHWM), and bytes on the wire per agent
per round (application frames, both directions, CURVE framing excluded).

Anchors measured in the same run: ``prg_s`` = time for fedge.core to generate
N·d AES-CTR words in this process (the mask material one round needs at the
least), so ``round/prg`` says how far the round is from its compute floor; and
the memory target 3·N·d·4 bytes + 200 MiB, so ``peak/target`` < 1 meets it.
Memory is in MiB (2^20 bytes) although the RESULT key says ``mb``; wire bytes
in MB (10^6). Every agent host must write its traffic file: a host that wrote
none (or missed agents) fails the bench rather than shrink the sample.

Last line: RESULT n500_round_s=... coord_peak_mb=... bytes_per_agent=...
(--quick: n100_round_s for n500_round_s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _coordinator import start_coordinator

from fedge.demo.loopback import wait_for

D = 100_000
HOSTS = 4  # agent host processes


ROUNDS = 2


def plan_text(n: int, rounds: int = ROUNDS) -> str:
    return f"""
[job]
dataset = "synthetic"
rounds = {rounds}
min_clients = {n}
seed = 1
[model]
name = "linear"
params = {{ in_features = {D - 1} }}
[train]
steps = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = true
alpha = 0.1
delta = 0.0
clip = 1.0
[deadlines]
cohort_s = 300
train_s = 120
secagg_stage_s = 120
eval_s = 60
"""


# -- agent host --------------------------------------------------------------------------


def agent_host(spec_path: Path, stats_path: Path) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from fedge.agent.process import Enrolled, run_agent
    from fedge.agent.runtime import Agent
    from fedge.agent.trainer import SyntheticTrainer
    from fedge.secagg.keys import Identity, Roster
    from fedge.wire import codec

    spec = json.loads(spec_path.read_text())
    roster = Roster.from_bytes(spec["roster"].encode(), bytes.fromhex(spec["console_public"]))
    pool = ThreadPoolExecutor(1)

    class CountingAgent(Agent):
        sent = 0
        received = 0

        async def send(self, body, *, job="", round=0):  # type: ignore[no-untyped-def]
            frames = codec.encode(body, sender=self.site, job=job, round=round)
            self.sent += sum(codec.frame_nbytes(f) for f in frames)
            assert self.send_frames is not None
            await self.send_frames(frames)

        async def handle_frames(self, frames):  # type: ignore[no-untyped-def]
            self.received += sum(codec.frame_nbytes(f) for f in frames)
            await super().handle_frames(frames)

    agents: list[CountingAgent] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        runs = []
        for site in spec["sites"]:
            identity = Identity.from_private_bytes(bytes.fromhex(site["identity"]))
            enrolled = Enrolled(site["site"], site["curve_public"], site["curve_secret"],
                                spec["endpoint"], spec["coordinator_public"], identity, roster)
            agent = CountingAgent(site["site"], SyntheticTrainer(site["site"]),
                                  identity=identity, roster=roster, executor=pool,
                                  roster_key=bytes.fromhex(spec["console_public"]))
            agents.append(agent)
            runs.append(run_agent(agent, enrolled, interval_s=5.0, timeout_s=60.0, stop=stop))
        await asyncio.gather(*runs)

    asyncio.run(main())
    stats_path.write_text(json.dumps({a.site: [a.sent, a.received] for a in agents}))
    return 0


# -- driver ------------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_n(n: int, root: Path, env: dict[str, str]) -> dict[str, float]:
    from fedge.coordinator.store import Store
    from fedge.secagg.keys import Identity, Roster
    from fedge.transport import CurveKeyPair, save_keypair

    root.mkdir(parents=True)
    console = Identity.generate()
    coord_keys = CurveKeyPair.generate()
    save_keypair(root / "keys", "coordinator", coord_keys)
    sites = []
    for i in range(n):
        kp, ident = CurveKeyPair.generate(), Identity.generate()
        sites.append({"site": f"site-{i:03d}", "curve_public": kp.public,
                      "curve_secret": kp.secret, "identity": ident.private_bytes().hex(),
                      "ed": ident.public_bytes()})
    roster = Roster.build({s["site"]: s["ed"] for s in sites}, console).to_bytes()
    (root / "roster.json").write_bytes(roster)
    coord_dir = root / "coordinator"
    store = Store(coord_dir)
    for s in sites:
        store.enrol(s["site"], s["curve_public"], s["ed"], actor="bench")
    store.close()
    coord, endpoint = start_coordinator(root, coord_dir, console.public_bytes().hex(),
                                        heartbeat=(5.0, 60.0), extra="tick_s = 0.01\n",
                                        env=env)
    hosts: list[subprocess.Popen[bytes]] = []
    try:
        k = min(HOSTS, n)
        for h in range(k):
            part = sites[h::k]
            spec = {"endpoint": endpoint, "coordinator_public": coord_keys.public,
                    "console_public": console.public_bytes().hex(), "roster": roster.decode(),
                    "sites": [{kk: v for kk, v in s.items() if kk != "ed"} for s in part]}
            sp = root / f"host-{h}.json"
            sp.write_text(json.dumps(spec))
            hosts.append(subprocess.Popen(
                [sys.executable, __file__, "--agent-host", str(sp), str(root / f"stats-{h}.json")],
                stdout=open(root / f"host-{h}.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                env=env))
        db = coord_dir / "coordinator.sqlite3"

        def q(sql: str, *args: object) -> list[tuple]:  # type: ignore[type-arg]
            c = sqlite3.connect(db, timeout=30)
            try:
                return c.execute(sql, args).fetchall()
            finally:
                c.close()

        t_conn = time.monotonic()
        wait_for(lambda: q("SELECT COUNT(*) FROM appliances WHERE last_seen IS NOT NULL")[0][0]
                 >= n, 300, f"{n} agents to connect")
        connect_s = time.monotonic() - t_conn
        cpu0 = cpu_s(coord.pid)
        job = "bench-job"
        s = Store(coord_dir)
        s.create_job(job, plan_text(n), actor="bench")
        s.close()
        status = wait_for(lambda: (r := q("SELECT status FROM jobs WHERE job_id=?", job))
                          and r[0][0] in ("completed", "failed") and r[0][0], 600, "job")
        cpu = cpu_s(coord.pid) - cpu0
        peak = vm_hwm_mb(coord.pid)
        if status != "completed":
            raise RuntimeError(f"job {status}: {q('SELECT error FROM jobs')}")
        rounds = q("SELECT round, ended_at - started_at FROM rounds WHERE job_id=? AND "
                   "status='committed' ORDER BY round", job)
    finally:
        for h in hosts:
            h.send_signal(signal.SIGTERM)
        for h in hosts:
            try:
                h.wait(60)
            except subprocess.TimeoutExpired:
                h.kill()
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(30)
        except subprocess.TimeoutExpired:
            coord.kill()
    traffic = {}
    for h in range(len(hosts)):
        p = root / f"stats-{h}.json"
        if not p.exists():
            raise RuntimeError(f"agent host {h} wrote no traffic file {p} (exit "
                               f"{hosts[h].returncode}; its log host-{h}.log is kept with "
                               "FEDGE_BENCH_KEEP=DIR): bytes_per_agent would be over the "
                               "other hosts only")
        traffic.update(json.loads(p.read_text()))
    if len(traffic) != n:
        raise RuntimeError(f"traffic files count {len(traffic)} agents, not {n}")
    # per agent and per round: the connection's heartbeats are included, spread over
    # the job's rounds
    per_agent = sum(a + b for a, b in traffic.values()) / max(1, len(traffic)) / ROUNDS
    return {"n": n, "connect_s": connect_s, "round1_s": rounds[0][1], "round_s": rounds[-1][1],
            "coord_cpu_s": cpu, "coord_peak_mb": peak, "bytes_per_agent": per_agent}


def prg_anchor(n: int) -> float:
    from fedge import core

    t = time.perf_counter()
    for i in range(n):
        core.prg(i.to_bytes(16, "little"), D)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N in {10, 100} only")
    ap.add_argument("--n", type=int, action="append", help="run only these N (repeatable)")
    ap.add_argument("--agent-host", nargs=2, metavar=("SPEC", "STATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent_host:
        return agent_host(Path(args.agent_host[0]), Path(args.agent_host[1]))
    ns = args.n or ([10, 100] if args.quick else [10, 100, 500])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    results = []
    keep = os.environ.get("FEDGE_BENCH_KEEP")  # keep logs: FEDGE_BENCH_KEEP=DIR
    with (contextlib.nullcontext(tempfile.mkdtemp(prefix="fedge-scale-", dir=keep)) if keep
          else tempfile.TemporaryDirectory(prefix="fedge-scale-")) as tmp:
        for n in ns:
            r = run_n(n, Path(tmp) / f"n{n}", env)
            r["prg_s"] = prg_anchor(n)
            r["target_mb"] = (3 * n * D * 4) / 2**20 + 200
            results.append(r)
            print(f"N={n:4d} d={D}: connect {r['connect_s']:.1f} s, round 1 "
                  f"{r['round1_s']:.2f} s, round 2 {r['round_s']:.2f} s "
                  f"(anchor prg of N*d words {r['prg_s']:.3f} s, ratio "
                  f"{r['round_s'] / r['prg_s']:.0f}x), coordinator CPU {r['coord_cpu_s']:.1f} s, "
                  f"peak {r['coord_peak_mb']:.0f} MiB (target {r['target_mb']:.0f} MiB, ratio "
                  f"{r['coord_peak_mb'] / r['target_mb']:.2f}), "
                  f"{r['bytes_per_agent'] / 1e6:.2f} MB on the wire per agent per round (model "
                  f"{4 * D / 1e6:.1f} MB)", flush=True)
    last = results[-1]
    key = f"n{last['n']}_round_s"
    print(f"RESULT {key}={last['round_s']:.2f} coord_peak_mb={last['coord_peak_mb']:.0f} "
          f"bytes_per_agent={last['bytes_per_agent']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
