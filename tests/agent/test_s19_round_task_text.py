"""What the fleet's TASK column says of a site through a round, over real CurveZMQ on
127.0.0.1: the coordinator's serve loop and three agents' run_agent loops in one event
loop, secure aggregation on, the fleet read from the coordinator's registry as the
admin channel's ``fleet`` op reads it, and formatted by the console's ``fleet_rows``.

A site that had sent its train result still said "train <job> round <r>" while the
round waited for slower sites, through its secure aggregation and until its next task;
and a site that went away kept its last task in the table as if it were at work."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.process import Enrolled, run_agent
from fedge.agent.runtime import AWAITING_AGGREGATION, AWAITING_EVALUATION, SECAGG_STAGES, Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.console.fleet import COLUMNS, fleet_rows
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.config import CoordinatorConfig
from fedge.coordinator.process import serve
from fedge.coordinator.service import Coordinator
from fedge.secagg.client import CLIENT_TERMINAL_STATES, CLIENT_TRANSITIONS
from fedge.secagg.keys import Identity, Roster
from fedge.transport import CurveKeyPair

TASK = COLUMNS.index("task")
INTERVAL_S = 0.1  # the agents' heartbeat
GATE_S = 60.0  # the longest a gated training waits for the test to open it

PLAN = """
[job]
dataset = "synthetic"
rounds = 1
min_clients = {min_clients}
max_failed_attempts = 1
seed = 11
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "fedavg"
[secagg]
enabled = true
alpha = 0.1
delta = 0.25
clip = 1.0
[deadlines]
cohort_s = 30
train_s = 60
secagg_stage_s = 20
eval_s = 20
"""


class GatedTrainer(SyntheticTrainer):
    """The synthetic trainer, whose training waits until the test opens ``gate``: the
    round then waits for this site while the others' results are in."""

    def __init__(self, site: str, gate: threading.Event) -> None:
        super().__init__(site, n_examples=10)
        self.gate = gate
        self.entered = threading.Event()

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.gate.wait(GATE_S)
        return super().train(*args, **kwargs)


class Loopback:
    """A coordinator served on 127.0.0.1 and its enrolled sites' agents."""

    def __init__(self, tmp_path, sites: list[str]) -> None:
        console = Identity.generate()
        self.identities = {s: Identity.generate() for s in sites}
        self.roster = Roster.build({s: i.public_bytes() for s, i in self.identities.items()},
                                   console)
        self.coord = Coordinator(tmp_path / "coord", roster=self.roster.to_bytes(),
                                 roster_public_key=console.public_bytes(),
                                 heartbeat_timeout_s=30.0,
                                 initial_weights=lambda plan: np.zeros(8, np.float32))
        self.console = console
        self.curves = {s: CurveKeyPair.generate() for s in sites}
        for s in sites:
            self.coord.enrol(s, self.curves[s].public, self.identities[s].public_bytes(),
                             actor="test")
        self.keys = CurveKeyPair.generate()
        # the coordinator's transport drops a site that closed its socket at once; its
        # own link check (30 s) is not what these tests wait for
        self.cfg = CoordinatorConfig(self.coord.state_dir, "tcp://127.0.0.1:0",
                                     self.keys.public, self.keys.secret, b"", b"",
                                     heartbeat_interval_s=INTERVAL_S,
                                     heartbeat_timeout_s=3.0, tick_s=0.02)
        self.gates = {s: threading.Event() for s in sites}
        self.pool = ThreadPoolExecutor(len(sites) + 1)
        self.agents = {s: Agent(s, GatedTrainer(s, self.gates[s]),
                                identity=self.identities[s], roster=self.roster,
                                roster_key=console.public_bytes(), executor=self.pool,
                                policy=PrivacyPolicy(min_cohort=2))
                       for s in sites}
        self.said: dict[str, list[str]] = {s: [] for s in sites}  # each agent's STATUS
        for s, a in self.agents.items():
            a.on_status = self.said[s].append
        self.stops: dict[str, asyncio.Event] = {}
        self.runs: dict[str, asyncio.Future[int]] = {}

    def submit(self, plan: str) -> str:
        """Queue ``plan``, with its starting model kept as the coordinator keeps it
        (a job's round-0 checkpoint; serve would build it with torch otherwise)."""
        job = self.coord.submit_job(plan, actor="test")
        ck.save_checkpoint(ck.round_path(self.coord.state_dir, job, 0),
                           ck.Checkpoint(weights=np.zeros(8, np.float32), round=0, plan=plan))
        return job

    async def start(self) -> None:
        self.stop = asyncio.Event()
        self.served = asyncio.create_task(serve(self.cfg, stop=self.stop,
                                                coordinator=self.coord))
        endpoint_file = self.coord.state_dir / "endpoint"
        await until(endpoint_file.exists, "the coordinator's endpoint file")
        endpoint = endpoint_file.read_text().strip()
        for s, a in self.agents.items():
            enrolled = Enrolled(s, self.curves[s].public, self.curves[s].secret, endpoint,
                                self.keys.public, self.identities[s], self.roster)
            self.stops[s] = asyncio.Event()
            self.runs[s] = asyncio.ensure_future(run_agent(
                a, enrolled, interval_s=INTERVAL_S, timeout_s=3.0, stop=self.stops[s]))
        await until(lambda: all(self.record(s)["connected"] for s in self.agents),
                    "every site connected")

    def record(self, site: str) -> dict[str, Any]:
        """``site``'s entry of the fleet, as the admin channel's fleet op gives it."""
        [entry] = [a for a in self.coord.fleet() if a["site_id"] == site]
        return entry

    def row(self, site: str) -> list[str]:
        [row] = [r for r in fleet_rows(self.coord.fleet()) if r[0] == site]
        return row

    async def beats(self, site: str, n: int) -> None:
        """Until the coordinator has recorded ``n`` more heartbeats of ``site``."""
        for _ in range(n):
            seen = self.record(site)["last_seen"]
            await until(lambda seen=seen: self.record(site)["last_seen"] != seen,
                        f"a heartbeat of {site}")

    async def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        for s in self.runs:
            self.stops[s].set()
        for run in self.runs.values():
            await asyncio.wait_for(run, 20)
        self.stop.set()
        await asyncio.wait_for(self.served, 20)
        self.pool.shutdown(wait=True)


async def until(pred, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_site_says_it_awaits_aggregation_after_its_train_result_then_each_stage(tmp_path):
    """b and c hand in their train results while a still trains: from their next
    heartbeat on, the fleet says they await the aggregation (not "train"), and their
    heartbeats come as often as while they trained. Once a is done, each site's status
    goes through each stage of its secure aggregation, awaits its evaluation, evaluates,
    and says nothing when the round is over for it."""
    fed = Loopback(tmp_path, ["a", "b", "c"])
    fed.gates["b"].set()
    fed.gates["c"].set()

    async def go() -> tuple[str, dict[str, str], list[str]]:
        await fed.start()
        try:
            job = fed.submit(PLAN.format(min_clients=3))
            rnd = await until(lambda: fed.coord.runner is not None and fed.coord.runner.round,
                              "the round")
            await until(lambda: {"b", "c"} <= set(rnd.trained), "b's and c's train results")
            assert fed.agents["a"].trainer.entered.is_set() and not rnd.trained.get("a")
            for s in ("b", "c"):
                await fed.beats(s, 2)  # a heartbeat sent after its result left
            waiting = {s: fed.record(s)["current_task"] for s in ("b", "c")}
            # heartbeats as often as before: the waiting sites' keep coming, each
            # recorded within a few intervals of the last
            seen = []
            for _ in range(10):
                seen.append(fed.record("b")["last_seen"])
                await asyncio.sleep(INTERVAL_S)
            assert len(set(seen)) >= 5, seen
            assert fed.row("a")[TASK] == f"train {job} round 1"
            fed.gates["a"].set()
            await until(lambda: fed.coord.store.job(job).status in ("completed", "failed"),
                        f"job {job} to end", timeout=60)
            assert fed.coord.store.job(job).status == "completed", \
                fed.coord.store.job(job).error
            for s in fed.agents:
                await fed.beats(s, 2)
            return job, waiting, [fed.row(s)[TASK] for s in fed.agents]
        finally:
            await fed.close()

    job, waiting, tasks = asyncio.run(go())
    for s in ("b", "c"):
        assert waiting[s] == f"{AWAITING_AGGREGATION} {job} round 1", waiting
        assert "train" not in waiting[s]
    # what each agent said, each change once (its heartbeats carry the same text)
    stages = [f"secagg {SECAGG_STAGES[st]} {job} round 1"
              for st in ("R0AdvertiseKeys", "R1ShareKeys", "R2MaskedInput",
                         "R3ConsistencyCheck", "R4Unmasking")]
    for s in fed.agents:
        said = [t for i, t in enumerate(fed.said[s]) if i == 0 or fed.said[s][i - 1] != t]
        assert said == [f"train {job} round 1", f"{AWAITING_AGGREGATION} {job} round 1",
                        *stages, f"{AWAITING_EVALUATION} {job} round 1",
                        f"eval {job} round 1", "idle"], (s, fed.said[s])
    # the round over: nothing in the fleet's TASK column (the last heartbeats after it)
    assert tasks == ["-", "-", "-"]


def test_every_secagg_client_state_that_waits_has_its_words():
    waiting = {state for state, _ in CLIENT_TRANSITIONS} - set(CLIENT_TERMINAL_STATES)
    assert set(SECAGG_STAGES) == waiting


def test_a_site_gone_mid_training_shows_no_task_in_the_fleet(tmp_path):
    """a trains (gated) and its heartbeats say so; its agent stops, closing its socket:
    the registry keeps its last heartbeat's task, but the fleet's TASK column says "-"
    for a site not connected, not "train ..." as if it were still at it."""
    fed = Loopback(tmp_path, ["a", "b"])

    async def go() -> tuple[str, dict[str, Any], list[str], list[str]]:
        await fed.start()
        try:
            job = fed.submit(PLAN.format(min_clients=2))
            training = f"train {job} round 1"
            await until(lambda: fed.record("a")["current_task"] == training,
                        "a's heartbeat saying it trains")
            assert fed.row("a")[TASK] == training  # connected: its task stands
            fed.stops["a"].set()
            await asyncio.wait_for(fed.runs.pop("a"), 20)
            await until(lambda: not fed.record("a")["connected"], "a disconnected")
            return job, fed.record("a"), fed.row("a"), fed.row("b")
        finally:
            await fed.close()

    job, record, row_a, row_b = asyncio.run(go())
    assert record["current_task"] == f"train {job} round 1"  # the registry's last word
    assert row_a[2] == "no" and row_a[TASK] == "-", row_a
    assert row_b[2] == "yes" and row_b[TASK] == f"train {job} round 1", row_b
