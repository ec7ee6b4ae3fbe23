"""The compromised-site harness the test_s15_* files share, and its own check.

A compromised enrolled site is a real Agent (tests/coordinator/conftest.py's
InProcFederation) whose outgoing messages pass through a tamper hook: decoded, edited
and encoded again with the real codec, as a modified appliance holding its own valid
keys would send them. Everything else is real: coordinator, agents, SecAgg+, quantiser.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from fedge.coordinator import checkpoint as ck
from fedge.core import quant_bits
from fedge.wire import codec

DIM = 8

PLAN = """
[job]
dataset = "synthetic"
rounds = {rounds}
min_clients = {min_clients}
max_failed_attempts = {attempts}
seed = 11
[model]
name = "linear"
[train]
epochs = 1
batch_size = 1
learning_rate = 0.5
[strategy]
name = "{strategy}"
[secagg]
enabled = {secure}
alpha = 0.1
delta = 0.25
clip = {clip}
[deadlines]
cohort_s = 5
train_s = 5
secagg_stage_s = 3
eval_s = 3
"""


def plan(*, rounds=1, min_clients=2, attempts=1, secure=True, clip=1.0, strategy="fedavg"):
    return PLAN.format(rounds=rounds, min_clients=min_clients, attempts=attempts,
                       secure="true" if secure else "false", clip=clip, strategy=strategy)


def tamper(fed, site, hook):
    """Every message ``site`` sends goes through ``hook(body) -> body`` (None: dropped)."""
    async def send_frames(frames):
        env = codec.decode([bytes(f) for f in frames], max_bytes=1 << 30)
        body = hook(env.body)
        if body is not None:
            fed.inbox.append((site, [bytes(f) for f in codec.encode(
                body, sender=site, job=env.header.job, round=env.header.round)]))
    fed.agents[site].send_frames = send_frames


def steps_per_unit(cohort: int, clip: float = 1.0) -> float:
    """Quantisation steps in one unit of value, for an aggregation cohort of ``cohort``."""
    return ((1 << quant_bits(cohort)) - 1) / (2 * clip)


def run_job(fed, text, max_steps=4000):
    """Submit ``text`` and pump until the job completes or fails; its id."""
    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(text, actor="test")
        await fed.pump_alive(
            until=lambda: fed.coord.store.job(job).status in ("completed", "failed"),
            max_steps=max_steps)
        return job
    return asyncio.run(go())


def honest_mean(fed, sites, clip=1.0, lr=0.5, dim=DIM):
    """The example-weighted FedAvg update of ``sites`` from a zero model."""
    n = {s: fed.agents[s].trainer.n_examples for s in sites}
    total = sum(n.values())
    return sum(np.clip(fed.agents[s].trainer.target(dim) * lr, -clip, clip) * n[s] / total
               for s in sites)


def final_weights(fed, job):
    return ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job)).weights


def audited(fed, action, job):
    """The details of the coordinator's audit rows ``action`` for ``job``."""
    return [json.loads(r["detail"]) for r in fed.coord.store.audit_log(action=action, job=job)]


def test_a_hook_that_changes_nothing_changes_nothing(federation):
    """Decoding and encoding again is transparent: the same job with every site's
    messages through an identity hook commits the same model as without."""
    sites = {"a": 311, "b": 51, "c": 196}
    plain, hooked = (federation(list(sites), dim=DIM, n_examples=sites) for _ in range(2))
    for s in sites:
        tamper(hooked, s, lambda body: body)
    models = [final_weights(f, run_job(f, plan())) for f in (plain, hooked)]
    np.testing.assert_array_equal(models[0], models[1])
    np.testing.assert_allclose(models[0], honest_mean(plain, list(sites)), atol=1e-6)
