"""TorchTrainer: the real local training on Fed-TCGA-BRCA, refusals with reasons."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.trainer import TaskRefusal, TorchTrainer, train_config_dict
from fedge.coordinator.plan import parse_plan
from fedge.coordinator.rounds import train_seed
from fedge.train.accounting import PrivacyLedger, epsilon_for
from fedge.wire import messages as m

DATA = Path(__file__).resolve().parents[2] / "../shared/data/fed_tcga_brca"

PLAN = """
[job]
dataset = "brca"
rounds = 1
seed = 5
[model]
name = "cox_linear"
params = { in_features = 39 }
[train]
steps = 5
batch_size = 32
learning_rate = 0.05
[strategy]
name = "fedprox"
mu = 0.1
"""


@pytest.fixture(scope="module")
def trainer():
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    return TorchTrainer([{"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}])


def test_plan_maps_to_train_config():
    cfg = train_config_dict(parse_plan(PLAN), seed=9)
    assert cfg["lr"] == 0.05 and cfg["steps"] == 5 and cfg["prox_mu"] == 0.1
    assert cfg["seed"] == 9 and cfg["device"] == "cpu"


def test_local_training_is_deterministic_and_moves_the_model(trainer):
    plan = parse_plan(PLAN)
    w0 = np.zeros(40, np.float32)
    seed = train_seed(plan.seed, 1, "site-0")
    a = trainer.train("site-0", "j", plan, w0, round=1, seed=seed)
    b = trainer.train("site-0", "j", plan, w0, round=1, seed=seed)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.n_examples > 100 and not np.array_equal(a.weights, w0)
    n, metrics = trainer.evaluate(plan, a.weights, "test")
    assert n > 0 and 0.0 <= metrics["c_index"] <= 1.0


def test_missing_dataset_and_wrong_model_are_refused(trainer):
    plan = parse_plan(PLAN.replace('dataset = "brca"', 'dataset = "ixi"'))
    with pytest.raises(TaskRefusal, match="'ixi' is not held here"):
        trainer.train("s", "j", plan, np.zeros(40, np.float32), round=1, seed=0)
    # parse_plan refuses an unregistered model at submit; an agent's own check holds
    # whatever a coordinator sends
    plan = dataclasses.replace(parse_plan(PLAN), model_name="no_such_model")
    with pytest.raises(TaskRefusal):
        trainer.train("s", "j", plan, np.zeros(40, np.float32), round=1, seed=0)


def test_a_bad_dataset_table_is_left_out_naming_its_key():
    trainer = TorchTrainer([{"name": "x", "kind": "nope", "path": "/nonexistent"}])
    assert trainer.datasets() == [] and "kind" in trainer.unusable["x"]


# DP-SGD needs public standardisation constants (fedge.agent.trainer.
# refuse_fitted_standardisation); age is Fed-TCGA-BRCA's one continuous column
BOUNDED = {"standardise": "bounds", "feature_bounds": {"age_at_index": [0, 120]}}

DP_PLAN = PLAN.replace("rounds = 1", "rounds = 3").replace(
    'name = "fedprox"\nmu = 0.1\n', 'name = "fedavg"\n'
) + """
[privacy]
min_site_examples = 100
[privacy.dp]
noise_multiplier = 1.5
max_grad_norm = 1.0
delta = 1e-5
target_epsilon = 50.0
cox_per_term = true  # a Cox model: its epsilon bounds one loss term
"""


def test_a_site_smaller_than_the_plan_declares_refuses_before_spending_anything(tmp_path):
    """The plan fits target_epsilon at its declared min_site_examples; this site's
    198 rows sample more per step, so its three rounds would not: it refuses the job
    at round 1, with its numbers, before training or recording anything."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")

    plan = parse_plan(DP_PLAN.replace("min_site_examples = 100", "min_site_examples = 10000")
                      .replace("target_epsilon = 50.0", "target_epsilon = 2.5"))
    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0, **BOUNDED}
    trainer = TorchTrainer([table], state_dir=tmp_path)
    # ε for replacing one record, recomputed by the accountant: 3 rounds of 5 steps
    spent = epsilon_for(noise_multiplier=1.5, sampling_rate=32 / 198, steps=15, delta=1e-5)
    assert spent > 2.5
    with pytest.raises(TaskRefusal, match=rf"this site has 198 training rows, below the plan's "
                       rf"min_site_examples 10000: its 3 rounds .* would spend epsilon "
                       rf"{spent:.3f} > target_epsilon 2\.5 .*nothing was trained or spent"):
        trainer.train("site-0", "job-a", plan, np.zeros(40, np.float32), round=1, seed=1)
    assert PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").entries == []


def test_privacy_spent_is_kept_on_disk_per_job_and_in_total(tmp_path):
    """A site's DP-SGD spend (its released runs) survives an agent restart and composes
    across jobs; a run whose update never left is shown apart, not counted."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    import subprocess
    import sys

    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0, **BOUNDED}
    plan = parse_plan(DP_PLAN)
    w0 = np.zeros(40, np.float32)
    first = TorchTrainer([table], state_dir=tmp_path)
    r1 = first.train("site-0", "job-a", plan, w0, round=1, seed=1)
    assert r1.epsilon > 0
    r1.release_privacy()  # its update left the site
    # round 2 trains, then the agent dies before its update leaves
    first.train("site-0", "job-a", plan, r1.weights, round=2, seed=2)
    # a restarted agent continues from the ledger on disk: round 2 spends more
    second = TorchTrainer([table], state_dir=tmp_path)
    r2 = second.train("site-0", "job-a", plan, r1.weights, round=2, seed=2)
    assert r2.epsilon > r1.epsilon
    rb = second.train("site-0", "job-b", plan, w0, round=1, seed=3)
    assert rb.epsilon == pytest.approx(r1.epsilon, rel=1e-6)  # a new job starts at its own 0
    r2.release_privacy()
    rb.release_privacy()
    # two runs of job-a charged, not three
    assert PrivacyLedger.load(tmp_path / "privacy" / "ledger.json").epsilon(
        1e-5, job="job-a") == pytest.approx(r2.epsilon)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:3]}
    assert float(rows["job-a"][2]) == pytest.approx(r2.epsilon, abs=1e-3)
    assert float(rows["job-b"][2]) == pytest.approx(rb.epsilon, abs=1e-3)
    total = float(out.stdout.splitlines()[3].split()[4])
    assert total > r2.epsilon  # both jobs composed
    # a Cox model's epsilon is per loss term (cox_per_term): every line says so
    assert rows["job-a"][3:] == ["per", "loss", "term"]
    assert out.stdout.splitlines()[3].endswith("per loss term")
    assert "not a record-level bound" in out.stdout
    assert rows["job-a"][1] == "2"  # rounds released
    lines = out.stdout.splitlines()
    at = lines.index("pending (trained, never released; not counted in epsilon):")
    assert lines[at + 1].split() == ["job-a", "round", "2", "attempt", "1"]


def test_a_dp_round_whose_privacy_ledger_cannot_be_saved_is_refused_with_its_error_kind(
        tmp_path, caplog):
    """The ledger cannot be written (here a plain file where its directory belongs; a
    full disk fails the same way, with an OSError): the round is refused with one line
    naming the ledger and the kind of error, so the coordinator drops the site at once,
    and no update leaves without its privacy spend on disk. The coordinator keeps the
    reason, so the ledger's path is in this appliance's journal only."""
    import errno
    import logging

    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0, **BOUNDED}
    (tmp_path / "privacy").write_text("not a directory\n")
    trainer = TorchTrainer([table], state_dir=tmp_path)
    ledger = tmp_path / "privacy" / "ledger.json"
    with caplog.at_level(logging.ERROR, logger="fedge.agent"), \
            pytest.raises(TaskRefusal) as info:
        trainer.train("site-0", "job-a", parse_plan(DP_PLAN), np.zeros(40, np.float32),
                      round=1, seed=1)
    assert str(info.value) == (
        f"the privacy ledger cannot be saved: [Errno {errno.EEXIST}] File exists "
        "(details in this appliance's journal); the update is withheld")
    assert f"privacy ledger {ledger} cannot be saved: " in caplog.text
    assert "File exists" in caplog.text


def test_a_corrupt_privacy_ledger_is_named_not_reset(tmp_path):
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "ledger.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"ledger\.json"):
        TorchTrainer([], state_dir=tmp_path)


def test_a_restarted_trainer_resumes_the_epoch_stream_from_disk(tmp_path):
    """steps-based rounds walk one stream of epochs; a new TorchTrainer on the same
    state directory (an agent restart) trains round 3 on the rows an uninterrupted
    one would, and one without the saved cursor does not."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}
    plan = parse_plan(PLAN.replace("rounds = 1", "rounds = 3"))
    w0 = np.zeros(40, np.float32)

    def run(trainers):
        w = w0
        for r, t in zip((1, 2, 3), trainers, strict=True):
            w = t.train("site-0", "job-a", plan, w, round=r, seed=train_seed(5, r, "s0")).weights
        return w

    memory = TorchTrainer([table])
    uninterrupted = run([memory] * 3)
    before = TorchTrainer([table], state_dir=tmp_path)
    after = TorchTrainer([table], state_dir=tmp_path)
    np.testing.assert_array_equal(run([before, before, after]), uninterrupted)
    forgetful = TorchTrainer([table])
    assert not np.array_equal(run([memory, memory, forgetful]), uninterrupted)
    saved = sorted((tmp_path / "jobs").iterdir(), key=lambda p: p.name.split(".", 1)[1])
    # the data cursor, and the standardisation the job trains with (kept for the
    # install of its model after a restart)
    assert [p.name.split(".", 1)[1] for p in saved] == ["cursors.npz", "standardisation.npz"]
    assert {p.stat().st_mode & 0o777 for p in saved} == {0o600}


def test_the_trainer_holds_its_last_jobs_states_and_a_dropped_job_resumes_from_disk(
        tmp_path):
    """Jobs end without telling the agent: the trainer keeps the ClientState of its
    last ``held_jobs`` jobs only, and a job it dropped trains on from its saved cursor
    as if it had never been dropped."""
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}
    plan = parse_plan(PLAN.replace("rounds = 1", "rounds = 3"))
    w0 = np.zeros(40, np.float32)

    def rnd(t, job, r, w):
        return t.train("site-0", job, plan, w, round=r, seed=train_seed(5, r, "s0")).weights

    alone = TorchTrainer([table])
    w = w0
    for r in (1, 2, 3):
        w = rnd(alone, "job-a", r, w)
    busy = TorchTrainer([table], state_dir=tmp_path, held_jobs=1)
    v = rnd(busy, "job-a", 1, w0)
    rnd(busy, "job-b", 1, w0)  # job-a's state leaves memory
    assert list(busy._states) == ["job-b"]
    v = rnd(busy, "job-a", 2, v)
    v = rnd(busy, "job-a", 3, v)
    np.testing.assert_array_equal(v, w)
    assert list(busy._states) == ["job-a"]
    with pytest.raises(ValueError, match="held_jobs=0"):
        TorchTrainer([table], held_jobs=0)


def test_a_trainer_opened_on_a_state_dir_removes_temps_that_killed_writes_left(tmp_path):
    """A write_atomic killed before its rename leaves ``.<name>.<random>`` beside the
    job state and the privacy ledger; the next agent start removes it, and nothing
    else."""
    import os
    import time

    jobs, privacy = tmp_path / "jobs", tmp_path / "privacy"
    jobs.mkdir()
    privacy.mkdir()
    stale = [jobs / ".0123abcd.controls.npz.k2_9zzzz", privacy / ".ledger.json.abcdefgh"]
    kept = [jobs / "0123abcd.controls.npz", privacy / "ledger.json.corrupt"]
    for p in stale + kept:
        p.write_bytes(b"{}")
        os.utime(p, (time.time() - 3600,) * 2)
    TorchTrainer([], state_dir=tmp_path)
    assert [p.exists() for p in stale + kept] == [False, False, True, True]


def test_a_saved_cursor_that_does_not_fit_is_named_and_the_stream_starts_afresh(
        tmp_path, caplog):
    if not DATA.exists():
        pytest.skip(f"Fed-TCGA-BRCA not found at {DATA}")
    import logging

    from fedge.agent.jobstate import JobStateStore

    table = {"name": "brca", "kind": "fed_tcga_brca", "path": str(DATA), "site": 0}
    plan = parse_plan(PLAN.replace("rounds = 1", "rounds = 3"))
    JobStateStore(tmp_path / "jobs").save("job-a", "cursors",
                                          {"order2": np.arange(5), "pos2": np.array(99)})
    w0 = np.zeros(40, np.float32)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        got = TorchTrainer([table], state_dir=tmp_path).train(
            "site-0", "job-a", plan, w0, round=2, seed=train_seed(5, 2, "s0"))
    assert "saved data cursor ignored" in caplog.text and "'order2'" in caplog.text
    fresh = TorchTrainer([table]).train("site-0", "job-a", plan, w0, round=2,
                                        seed=train_seed(5, 2, "s0"))
    np.testing.assert_array_equal(got.weights, fresh.weights)


def test_a_data_set_table_this_release_refuses_is_left_out_not_fatal(tmp_path, caplog):
    """An agent.toml written for an older release (a tabular data set without
    `features`, which this release requires) must not stop the appliance: that data
    set is not offered, a task naming it is refused with the rule, the others work."""
    csv = tmp_path / "rows.csv"
    csv.write_text("age,size,y\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(40)))
    old = {"name": "old_rows", "kind": "tabular", "path": str(csv), "task": "binary",
           "target": "y"}
    good = {**old, "name": "rows", "features": ["age", "size"]}
    with caplog.at_level("ERROR", logger="fedge.agent"):
        trainer = TorchTrainer([old, good, {"kind": "tabular"}], state_dir=tmp_path)
    assert trainer.datasets() == ["rows"]
    assert set(trainer.unusable) == {"old_rows", "[[datasets]] #3"}
    assert "old_rows" in caplog.text and "datasets.features" in caplog.text
    plan = parse_plan(PLAN.replace('dataset = "brca"', 'dataset = "old_rows"'))
    with pytest.raises(TaskRefusal, match=r"declared in this appliance's agent\.toml but "
                                          r"refused: .*datasets\.features"):
        trainer.train("site-0", "job", plan, np.zeros(3, np.float32), round=1, seed=1)
    assert trainer.standardisation("rows") is not None
    with pytest.raises(TaskRefusal, match=r"refused: .*datasets"):
        trainer.standardisation("old_rows")  # a pushed model for it says why too

    # and through the agent, as the coordinator's task meets it
    import asyncio

    from fedge.agent.guard import PrivacyPolicy
    from fedge.agent.runtime import Agent
    from tests.agent.test_runtime import Link, deliver, task

    agent = Agent("site-0", trainer, policy=PrivacyPolicy(require_secure_aggregation=False))
    link = Link(agent)
    old_plan = PLAN.replace('dataset = "brca"', 'dataset = "old_rows"')
    asyncio.run(deliver(agent, task(plan=old_plan, d=3)))
    (refused,) = link.bodies(m.TaskRefused)
    assert "declared in this appliance's agent.toml but refused" in refused.reason
    assert "datasets.features" in refused.reason
