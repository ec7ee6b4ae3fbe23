"""An in-memory federation: real coordinator, real agents, real codec and SecAgg+,
messages moved by a pump instead of ZeroMQ (h11's ConnectionPair, for rounds)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy
from fedge.agent.runtime import Agent
from fedge.agent.trainer import SyntheticTrainer
from fedge.coordinator.service import Coordinator
from fedge.secagg.keys import Identity, Roster
from fedge.wire import codec

# these agents run plans with and without secure aggregation, and sum in pairs (the
# default min_cohort is 3; many tests here run two-site federations)
PLAIN_OK = PrivacyPolicy(require_secure_aggregation=False, min_cohort=2)


def synthetic_secure_plan(*, secagg_stage_s: float) -> str:
    """A one-round secure FedAvg plan over the synthetic data set (min_clients 2, delta
    0.25, seed 11, short deadlines) with the given secure-aggregation stage deadline:
    the plan of the session-15 tests that shrink, stall or poison a secure sum."""
    return f"""
[job]
dataset = "synthetic"
rounds = 1
min_clients = 2
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
cohort_s = 5
train_s = 5
secagg_stage_s = {secagg_stage_s:g}
eval_s = 3
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class SteppingWall:
    """The wall clock of a machine whose time of day steps (an NTP correction, a VM
    resumed): ``mono``'s reading plus an offset that :meth:`step` changes, while
    ``mono`` (the coordinator's monotonic clock) goes on as before."""

    def __init__(self, mono: Clock, start: float = 1_800_000_000.0) -> None:
        self.mono = mono
        self.offset = start - mono.t

    def __call__(self) -> float:
        return self.mono.t + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


class InProcFederation:
    def __init__(self, state_dir, sites, *, dim=8, n_examples=None, clock=None, wall=None):
        """``clock``: the coordinator's monotonic clock (a :class:`Clock`, which
        :meth:`pump` advances); ``wall``: its wall clock (e.g. a :class:`SteppingWall`),
        by default ``clock`` itself."""
        self.clock = clock or Clock()
        self.wall = wall or self.clock
        console = self.console = Identity.generate()
        self.identities = {s: Identity.generate() for s in sites}
        roster = Roster.build({s: i.public_bytes() for s, i in self.identities.items()}, console)
        self.dim = dim
        self.coord = Coordinator(
            state_dir, roster=roster.to_bytes(), roster_public_key=console.public_bytes(),
            heartbeat_timeout_s=30.0, initial_weights=lambda plan: np.zeros(dim, np.float32),
            clock=self.clock, **({} if wall is None else {"wall": wall}))
        self.pool = ThreadPoolExecutor(2)
        self.agents: dict[str, Agent] = {}
        self.inbox: list[tuple[str, list]] = []
        self.dead: set[str] = set()
        self.kill_hook = None  # (site, body) -> bool: drop the agent before it handles body
        n_examples = n_examples or {}
        for i, s in enumerate(sites):
            self.coord.enrol(s, f"{i:040d}", self.identities[s].public_bytes(), actor="test")
            a = Agent(s, SyntheticTrainer(s, n_examples=n_examples.get(s, 10 * (i + 1))),
                      identity=self.identities[s], roster=roster, executor=self.pool,
     policy=PLAIN_OK)
            a.send_frames = self._sender(s)
            self.agents[s] = a

    def restart(self):
        """The coordinator "crashes": everything in memory and in flight is gone, and a
        new one opens the same state dir, on the same clocks. Returns it."""
        old = self.coord
        self.inbox.clear()
        self.coord = Coordinator(old.state_dir, roster=old.roster,
                                 roster_public_key=old.roster_public_key,
                                 heartbeat_timeout_s=30.0,
                                 initial_weights=old.initial_weights, clock=self.clock,
                                 wall=self.wall)
        old.close()
        return self.coord

    def _sender(self, site):
        async def send(frames):
            # frames travel as bytes, as they would over a socket
            self.inbox.append((site, [bytes(f) for f in frames]))
        return send

    async def pump(self, *, until, max_steps=2000, advance=0.5):
        for _ in range(max_steps):
            if until():
                return
            await asyncio.sleep(0.001)
            self.coord.tick()
            while self.inbox:
                site, frames = self.inbox.pop(0)
                if site not in self.dead:
                    self.coord.handle_frames(site, frames)
            outbox, self.coord.outbox = self.coord.outbox, []
            for out in outbox:
                if out.site in self.dead:
                    continue
                if self.kill_hook is not None and self.kill_hook(out.site, out.body):
                    self.dead.add(out.site)
                    continue
                frames = [bytes(f) for f in codec.encode(out.body, sender="coordinator",
                                                         job=out.job, round=out.round)]
                await self.agents[out.site].handle_frames(frames)
            if not self.inbox and not outbox:
                await asyncio.sleep(0.005)
                self.clock.t += advance
        raise AssertionError("federation did not reach the expected state")

    async def heartbeats(self, sites=None):
        for s, a in self.agents.items():
            if s not in self.dead and (sites is None or s in sites):
                await a.heartbeat()

    async def pump_alive(self, *, until, advance=0.5, max_steps=2000, sites=None):
        """pump, one step at a time, the live agents (or ``sites``) heartbeating once a
        second of the coordinator's clock as real ones do (pump sends none by itself,
        and a site silent past the heartbeat timeout is lost, in secure aggregation
        only when the transport says so)."""
        beat = float("-inf")
        for _ in range(max_steps):
            if until():
                return
            if self.clock.t - beat >= 1.0:
                beat = self.clock.t
                await self.heartbeats(sites)
            steps = iter((False,))
            await self.pump(until=lambda steps=steps: next(steps, True), advance=advance)
        raise AssertionError("federation did not reach the expected state")


@pytest.fixture
def federation(tmp_path):
    made = []

    def make(sites, **kw):
        f = InProcFederation(tmp_path / f"coord{len(made)}", sites, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.pool.shutdown(wait=True)
        f.coord.close()
