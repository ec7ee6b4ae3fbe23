"""End-to-end federations: real `fedge coordinator` and `fedge agent` processes."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.coordinator import checkpoint as ck

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PLAN = """
[job]
dataset = "fed_tcga_brca"
rounds = {rounds}
min_clients = {min_clients}
seed = 42
[model]
name = "cox_linear"
params = {{ in_features = 39 }}
[train]
steps = 3
batch_size = 16
learning_rate = 0.05
[strategy]
name = "fedadam"
server_learning_rate = 0.05
beta1 = 0.9
beta2 = 0.99
tau = 0.001
[secagg]
enabled = true
alpha = 0.1
delta = 0.25
clip = 1.0
[deadlines]
cohort_s = 60
train_s = {train_s}
secagg_stage_s = {stage_s}
eval_s = 10
"""


def plan(rounds=3, min_clients=3, train_s=60, stage_s=10):
    return PLAN.format(rounds=rounds, min_clients=min_clients, train_s=train_s, stage_s=stage_s)


def in_process_reference(plan_text, sites):
    """The same job without secure aggregation or processes: local_train per site,
    clipped weighted mean, strategy step."""
    import torch

    from fedge.agent.trainer import TorchTrainer
    from fedge.coordinator.plan import parse_plan
    from fedge.coordinator.rounds import train_seed, weight_scale
    from fedge.coordinator.strategies import Strategy, mean_update
    from fedge.train.api import ModelSpec, build_model, flatten

    p = parse_plan(plan_text)
    torch.manual_seed(p.seed)
    w = np.ascontiguousarray(flatten(build_model(ModelSpec(p.model_name, p.model_params))),
                             dtype=np.float32)
    strategy = Strategy(p.strategy)
    trainers = {s: TorchTrainer([ds]) for s, ds in sites.items()}
    for r in range(1, p.rounds + 1):
        outs = {s: t.train(s, "ref", p, w, round=r, seed=train_seed(p.seed, r, s))
                for s, t in sorted(trainers.items())}
        scale = weight_scale(p.secagg.clip, max(o.n_examples for o in outs.values()))
        total = np.zeros(w.size + 1)
        for o in outs.values():
            wi = scale * o.n_examples
            delta = np.clip(o.weights.astype(np.float64) - w, -p.secagg.clip, p.secagg.clip)
            total[:-1] += wi * delta
            total[-1] += wi
        w = strategy.step(w, mean_update(total[:-1], total[-1]))
    return w


def test_three_agents_three_rounds_with_secure_aggregation(federation, brca):
    fed = federation()
    sites = {f"site-{i}": brca(i) for i in range(3)}
    for s, ds in sites.items():
        fed.add_site(s, [ds])
    fed.enrol_in_store()
    fed.start_coordinator()
    for s in sites:
        fed.start_agent(s)
    text = plan()
    job = fed.submit(text)
    row = fed.wait_job(job, 180)
    assert row["status"] == "completed", fed.dump()
    rounds = fed.query("SELECT round, status, survivors_json FROM rounds WHERE job_id = ? "
                       "ORDER BY round", job)
    assert [(r["round"], r["status"]) for r in rounds] == [
        (1, "committed"), (2, "committed"), (3, "committed")]
    final = ck.load_checkpoint(ck.final_path(fed.coord_dir, job))
    assert final.model_digest == row["final_digest"]
    expect = in_process_reference(text, sites)
    # SecAgg+ quantises each coordinate of the weighted update to a step of
    # 2c/(2^b - 1), b = quant_bits(3) = 30; three inputs, three rounds, and
    # FedAdam's step bounded by server_learning_rate per coordinate: the
    # difference stays far below 1e-5.
    np.testing.assert_allclose(final.weights, expect, atol=1e-5)
    assert not np.allclose(final.weights, ck.load_checkpoint(
        ck.round_path(fed.coord_dir, job, 0)).weights)
    metrics = fed.query("SELECT * FROM metrics WHERE job_id = ? AND site = '*' AND "
                        "name = 'c_index'", job)
    assert len(metrics) == 3 and all(0 <= m["value"] <= 1 for m in metrics)
    # agents stop cleanly on SIGTERM
    assert all(p.stop() == 0 for p in fed.procs.values()), fed.dump()
