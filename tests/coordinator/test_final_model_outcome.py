"""A job's final.safetensors says how the job ended, and so does the ONNX model
exported from it (`fedge export`, the coordinator's own export at job end): a
cancelled or failed job's model is its last committed round's, marked partial
("cancelled after round 2 of 4"); a model trained under differential privacy carries
the plan's DP settings and the ε the coordinator recorded. Real coordinator and
agents in memory (tests/coordinator/conftest.py), real checkpoints, real ONNX."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import onnxruntime as ort
import torch

from fedge.agent.trainer import LocalResult, SyntheticTrainer
from fedge.coordinator import checkpoint as ck
from fedge.coordinator.report import CLIENT_DP_DELTA
from fedge.serve.export import read_metadata
from fedge.serve.jobs import export_job
from fedge.serve.runtime import load_model
from fedge.train.accounting import client_epsilon_for
from fedge.train.api import ModelSpec, build_model, load_flat
from tests.coordinator.test_federation_inproc import plan

SITES = ["a", "b", "c"]
DP_SGD = "[privacy]\ndp = { noise_multiplier = 1.3, max_grad_norm = 0.8, delta = 1e-6 }\n"
DP_FEDAVG = ("[privacy]\n"
             "client_dp = { clip_norm = 1.0, noise_multiplier = 0.5, cohort_size = 1 }\n")


def linear_plan(rounds: int, privacy: str = "") -> str:
    """The in-memory federation's plan with an exportable model: 7 inputs and a bias
    are its 8 weights."""
    return plan(rounds=rounds, secure="false").replace(
        'name = "linear"', 'name = "linear"\nparams = { in_features = 7 }') + privacy


class ReportsEpsilon(SyntheticTrainer):
    """A site whose DP-SGD accountant says its ε in the job is 0.25·round·(its rank)."""

    def train(self, site, job, plan, weights, *, round, **kw) -> LocalResult:
        result = super().train(site, job, plan, weights, round=round, **kw)
        result.epsilon = 0.25 * round * (1 + SITES.index(site))
        return result


def submit(fed, text, until):
    async def go():
        await fed.heartbeats()
        job = fed.coord.submit_job(text, actor="test")
        await fed.pump(until=lambda: until(job))
        return job
    return asyncio.run(go())


def onnx_matches_weights(path, weights):
    """The exported graph computes the linear model with these weights."""
    model = build_model(ModelSpec("linear", {"in_features": 7}))
    load_flat(model, weights)
    x = np.random.default_rng(5).standard_normal((6, 7)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x})[0], want, atol=1e-5)


def test_a_cancelled_jobs_model_says_it_is_partial_after_round_2_of_4(federation):
    fed = federation(SITES)
    st = fed.coord.store
    job = submit(fed, linear_plan(rounds=4), until=lambda j: st.job(j).committed_round >= 2
                 and fed.coord.runner is not None and fed.coord.runner.committed == 2)
    fed.coord.cancel_job(job, actor="operator:alice")
    assert st.job(job).status == "cancelled"

    final = ck.load_checkpoint(ck.final_path(fed.coord.state_dir, job))
    assert final.outcome is not None and final.outcome.partial
    assert final.outcome.status == "cancelled"
    assert final.outcome.error.startswith("cancelled by operator:alice at ")
    assert final.outcome.epsilon is None  # no DP

    result = export_job(fed.coord.state_dir, job)
    meta = read_metadata(result.path)
    assert (meta["job_status"], meta["round"], meta["rounds_planned"]) == \
        ("cancelled", "2", "4")
    assert meta["description"].startswith("partial: the job was cancelled after round 2 "
                                          "of 4; this is the model of its last committed "
                                          "round, not the planned final one")
    assert "cancelled by operator:alice at " in meta["description"]
    assert meta["job_error"] == final.outcome.error
    assert json.loads(meta["privacy"])["mechanism"] == "none"
    # the model is round 2's, and fedge serve loads it with the new keys
    assert meta["model_digest"] == st.rounds(job)[1].model_digest == final.model_digest
    onnx_matches_weights(result.path, final.weights)
    served = load_model("job", 1, result.path, threads=1).metadata
    assert served["job_status"] == "cancelled"
    # no column names from the sites: the empty list stays, and the layout is named
    assert json.loads(meta["feature_names"]) == []
    assert "'synthetic'" in meta["input_columns"] and "agent.toml" in meta["input_columns"]


def test_a_completed_dp_sgd_jobs_model_carries_its_privacy_settings_and_epsilon(federation):
    fed = federation(SITES)
    for site, agent in fed.agents.items():
        agent.trainer = ReportsEpsilon(site, n_examples=10)
    st = fed.coord.store
    job = submit(fed, linear_plan(rounds=3, privacy=DP_SGD),
                 until=lambda j: st.job(j).status in ("completed", "failed"))
    assert st.job(job).status == "completed", st.job(job).error

    meta = read_metadata(export_job(fed.coord.state_dir, job).path)
    assert (meta["job_status"], meta["round"], meta["rounds_planned"]) == \
        ("completed", "3", "3")
    assert not meta["description"].startswith("partial")
    privacy = json.loads(meta["privacy"])
    assert privacy["mechanism"] == "dp_sgd"
    assert (privacy["noise_multiplier"], privacy["clip"], privacy["delta"]) == \
        (1.3, 0.8, 1e-6)
    # each site's cumulative epsilon after round 3; the model's is the largest
    assert privacy["epsilon_sites"] == {"a": 0.75, "b": 1.5, "c": 2.25}
    assert privacy["epsilon"] == 2.25 and privacy["epsilon_delta"] == 1e-6
    assert privacy["epsilon_level"] == "per record"
    assert "largest epsilon over the sites" in privacy["epsilon_is"]


def test_a_dp_fedavg_jobs_model_carries_the_client_level_epsilon(federation):
    fed = federation(SITES)
    st = fed.coord.store
    # each site's noise share (std 0.5) clipped at ±3.0 keeps six std (the plan's rule)
    text = linear_plan(rounds=2, privacy=DP_FEDAVG).replace("clip = 1.0", "clip = 3.0")
    job = submit(fed, text, until=lambda j: st.job(j).status in ("completed", "failed"))
    assert st.job(job).status == "completed", st.job(job).error

    privacy = json.loads(read_metadata(export_job(fed.coord.state_dir, job).path)["privacy"])
    assert privacy["mechanism"] == "dp_fedavg"
    assert (privacy["noise_multiplier"], privacy["clip"], privacy["cohort_size"]) == \
        (0.5, 1.0, 1)
    want = client_epsilon_for(noise_multiplier=0.5, rounds=2, delta=CLIENT_DP_DELTA)
    assert math.isfinite(want)
    assert privacy["epsilon_sites"] == {s: want for s in SITES}
    assert privacy["epsilon"] == want and privacy["epsilon_delta"] == CLIENT_DP_DELTA


def test_a_final_checkpoint_from_before_job_status_is_exported_as_unknown(tmp_path):
    """A final.safetensors written before fedge recorded how its job ended: the export
    says it does not know, and a model short of its planned rounds is still partial."""
    weights = np.arange(8, dtype=np.float32) / 10
    ck.save_checkpoint(ck.final_path(tmp_path, "job-old"),
                       ck.Checkpoint(weights=weights, round=2,
                                     plan=linear_plan(rounds=3, privacy=DP_SGD)))
    meta = read_metadata(export_job(tmp_path, "job-old").path)
    assert (meta["job_status"], meta["rounds_planned"]) == ("unknown", "3")
    assert meta["description"].startswith("partial: the job stopped after round 2 of 3")
    privacy = json.loads(meta["privacy"])
    assert privacy["mechanism"] == "dp_sgd" and privacy["epsilon"] is None
    assert privacy["epsilon_is"].startswith("not recorded")
