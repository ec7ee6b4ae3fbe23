"""A hospital's data-protection officer can tell from the appliance alone when, on
which data set, under which plan and with which settings it trained: each privacy
ledger entry says when it was recorded and released and what its run was trained
under, `fedge agent privacy --runs` (and `--json`) lists every run, plain ones too,
and each charged run leaves one INFO line in the journal. Ledgers saved before these
fields load and account exactly as before. Real ledger files, the real CLI in a
subprocess, real agents over TorchTrainer (Fed-TCGA-BRCA) for a plain round."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.agent.guard import PrivacyPolicy, plan_digest
from fedge.agent.jobstate import JobStateStore
from fedge.agent.trainer import ledger_path
from fedge.coordinator.plan import parse_plan
from fedge.train.accounting import DP_FEDAVG, NO_DP, PrivacyLedger
from fedge.wire import messages as m
from tests.agent.test_guard import JOB, RND, SITES
from tests.agent.test_privacy_release import DP_PLAN, fleet  # noqa: F401 (fixture)

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DELTA = 1e-5

# A ledger file exactly as the release before this one saved it (its PrivacyLedger:
# a DP-SGD round released, a retry pending, a plain job's round, a DP-FedAvg round):
# no at, released_at, data set, plan digest, settings or task id.
OLD_LEDGER = {
    "version": 2, "legacy": False, "legacy_entries": 0, "complete_since": 1764400000.0,
    "entries": [
        {"job": "j-dp", "round": 1, "attempt": 1, "status": "released",
         "mechanism": "dp_sgd", "noise_multiplier": 1.1, "sampling_rate": 0.05,
         "steps": 20, "bound": "per loss term, not a record-level bound"},
        {"job": "j-dp", "round": 2, "attempt": 1, "status": "pending",
         "mechanism": "dp_sgd", "noise_multiplier": 1.1, "sampling_rate": 0.05,
         "steps": 20, "bound": "per loss term, not a record-level bound"},
        {"job": "j-plain", "round": 1, "attempt": 1, "status": "released",
         "mechanism": "none", "noise_multiplier": 0.0, "sampling_rate": 1.0, "steps": 3},
        {"job": "j-fedavg", "round": 1, "attempt": 1, "status": "released",
         "mechanism": "dp_fedavg", "noise_multiplier": 2.0, "sampling_rate": 1.0,
         "steps": 1, "clip_norm": 0.5, "cohort_size": 3},
    ]}
# ε of that ledger at delta 1e-5 as the release before this one computed it
OLD_EPSILON = {"j-dp": 1.9772232062193384, "j-fedavg": 4.377292894388646}


def _privacy(tmp_path: Path, state_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state_dir}"\n')
    return subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                           "--config", str(cfg), *flags],
                          capture_output=True, text=True, timeout=120)


def test_each_entry_records_when_it_was_trained_and_when_it_was_released(tmp_path) -> None:
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    ledger = PrivacyLedger()
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    key = ledger.record(job="j", round=1, noise_multiplier=1.1, sampling_rate=0.1, steps=5,
                        pending=True)
    ledger.save(path)
    saved = json.loads(path.read_text())["entries"][0]
    assert ISO.match(saved["at"]) and before <= saved["at"]
    assert "released_at" not in saved  # pending: never left
    ledger.release(key, path=path, task_id="9f0c1d2e3a4b5c6d", task_attempt=2)
    saved = json.loads(path.read_text())["entries"][0]
    after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    assert saved["status"] == "released"
    assert ISO.match(saved["released_at"]) and saved["at"] <= saved["released_at"] <= after
    assert (saved["task_id"], saved["task_attempt"]) == ("9f0c1d2e3a4b5c6d", 2)
    assert saved["attempt"] == 1  # the site's own numbering stays apart


def test_a_run_says_its_data_set_plan_and_dp_settings_and_its_epsilon_is_unchanged(
        tmp_path) -> None:
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    digest = plan_digest(DP_PLAN)
    described, bare = PrivacyLedger(), PrivacyLedger()
    for ledger in (described, bare):
        key = ledger.record(job="j", round=1, noise_multiplier=1.1, sampling_rate=0.1,
                            steps=5, pending=True)
    described.describe(key, dataset="brca", plan_digest=digest, max_grad_norm=1.0,
                       delta=1e-5, task_id="t-1")
    described.release(key, path=path)
    bare.release(key)
    back = PrivacyLedger.load(path)
    entry = back.entry(key)
    assert entry["dataset"] == "brca" and entry["plan_digest"] == digest.hex()
    assert (entry["max_grad_norm"], entry["delta"], entry["task_id"]) == (1.0, 1e-5, "t-1")
    assert back.epsilon(DELTA) == bare.epsilon(DELTA) > 0
    with pytest.raises(ValueError, match="delta=2"):
        back.describe(key, delta=2)
    with pytest.raises(ValueError, match="plan_digest"):
        back.describe(key, plan_digest="not hex")


def test_a_plain_run_charged_at_training_keeps_the_task_id_the_agent_gives_it_later(
        tmp_path) -> None:
    """A run without DP is charged as it trains (its exact train_loss leaves next); the
    agent's later release, with the coordinator's task id, saves that id still."""
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    ledger = PrivacyLedger()
    key = ledger.record(job="p", round=3, mechanism=NO_DP, steps=4, pending=True)
    ledger.release(key, path=path)
    ledger.release(key, path=path, task_id="abc")
    saved = PrivacyLedger.load(path).entry(key)
    assert saved["task_id"] == "abc" and saved["mechanism"] == NO_DP
    assert PrivacyLedger.load(path).epsilon(DELTA, job="p") == float("inf")


def test_a_ledger_saved_by_the_release_before_loads_and_accounts_as_before(tmp_path) -> None:
    path = ledger_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(OLD_LEDGER))
    ledger = PrivacyLedger.load(path)
    for job, eps in OLD_EPSILON.items():
        assert ledger.epsilon(DELTA, job=job) == pytest.approx(eps, rel=1e-12)
    assert ledger.epsilon(DELTA, job="j-plain") == float("inf")
    # a save by this release adds nothing to entries it did not record
    ledger.save(path)
    assert json.loads(path.read_text())["entries"] == OLD_LEDGER["entries"]


def test_privacy_runs_lists_every_run_with_its_fields_and_epsilon_per_job(tmp_path) -> None:
    """An old ledger's entries show '-' for what it did not record, their plan digest
    from the job state where the appliance kept it; a new entry shows everything."""
    state = tmp_path / "state"
    path = ledger_path(state)
    path.parent.mkdir(parents=True)
    ledger = PrivacyLedger.from_dict(OLD_LEDGER)
    key = ledger.record(job="j-fedavg", round=2, mechanism=DP_FEDAVG, noise_multiplier=2.0,
                        clip_norm=0.5, cohort_size=3, pending=True)
    ledger.describe(key, dataset="brca", plan_digest=b"\x07" * 32, delta=1e-6,
                    task_id="feedface00112233", task_attempt=2)
    ledger.release(key, path=path)
    old_plan = b"\x42" * 32
    JobStateStore(state / "jobs").save("j-dp", "plan",
                                       {"digest": np.frombuffer(old_plan, np.uint8)})

    proc = _privacy(tmp_path, state, "--runs", "--json")
    assert proc.returncode == 0, proc.stderr
    history = json.loads(proc.stdout)
    runs = history["runs"]
    assert [(r["job"], r["round"], r["status"], r["mechanism"]) for r in runs] == [
        ("j-dp", 1, "released", "dp_sgd"), ("j-dp", 2, "pending", "dp_sgd"),
        ("j-plain", 1, "released", "none"), ("j-fedavg", 1, "released", "dp_fedavg"),
        ("j-fedavg", 2, "released", "dp_fedavg")]
    new = runs[-1]
    assert ISO.match(new["at"]) and ISO.match(new["released_at"])
    assert (new["dataset"], new["plan_digest"], new["plan_digest_source"]) == (
        "brca", "07" * 32, "ledger")
    assert (new["task_id"], new["task_attempt"], new["delta"], new["clip_norm"]) == (
        "feedface00112233", 2, 1e-6, 0.5)
    assert (runs[0]["plan_digest"], runs[0]["plan_digest_source"]) == (old_plan.hex(),
                                                                     "job state")
    assert "at" not in runs[0] and "plan_digest" not in runs[2]
    jobs = {j["job"]: j for j in history["jobs"]}
    assert jobs["j-dp"]["epsilon"] == pytest.approx(OLD_EPSILON["j-dp"], rel=1e-12)
    assert (jobs["j-plain"]["epsilon"], jobs["j-plain"]["unbounded"]) == (None, True)
    assert jobs["j-fedavg"]["datasets"] == ["brca"] and jobs["j-fedavg"]["rounds"] == 2
    assert history["total_unbounded"] is True and history["delta"] == DELTA

    proc = _privacy(tmp_path, state, "--runs")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["recorded", "(UTC)", "released", "(UTC)"]
    assert lines[1].split()[:5] == ["-", "-", "j-dp", "-", old_plan.hex()[:11] + "*"]
    last = lines[5].split()
    assert last[2:11] == ["j-fedavg", "brca", "07" * 6, "2", "1", "feedface00112233",
                          "attempt", "2", "released"]
    assert "z=2 S=0.5 cohort=3 delta=1e-06" in lines[5]
    assert any(line.split()[:1] == ["j-plain"] and "unbounded" in line for line in lines)

    helped = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert "--runs" in helped.stdout and "--json" in helped.stdout


def test_plan_digests_are_kept_for_every_job(tmp_path) -> None:
    store = JobStateStore(tmp_path, keep=2)
    for i in range(4):
        store.save(f"job-{i}", "plan", {"digest": np.full(32, i, np.uint8)})
    assert all(store.path(f"job-{i}", "plan").exists() for i in range(4))
    assert store.peek("job-0", "plan")["digest"].tolist() == [0] * 32
    store.path("job-1", "plan").write_bytes(b"torn")
    assert store.peek("job-1", "plan") == {}  # a reader never moves it aside
    assert store.path("job-1", "plan").read_bytes() == b"torn"


PLAIN_PLAN = (DP_PLAN.replace("enabled = true", "enabled = false")
              .replace("dp = { noise_multiplier = 1.1, max_grad_norm = 1.0, delta = 1e-5, "
                       "cox_per_term = true }\n", ""))


def test_a_plain_round_is_recorded_logged_and_listed_on_the_appliance(
        fleet, tmp_path, caplog) -> None:  # noqa: F811 (the fixture)
    """A round without DP, sent as a plain update: the appliance's ledger holds it
    (mechanism none, when), its journal has one INFO line saying so, and `fedge agent
    privacy --runs --json` lists it with its plan's digest."""
    assert "dp =" not in PLAIN_PLAN
    f = fleet(PrivacyPolicy(require_secure_aggregation=False))
    site = SITES[0]
    f.agents[site].job_state = JobStateStore(tmp_path / site / "jobs")

    async def plain_round() -> list[object]:
        await f.train([site], "t1", plan=PLAIN_PLAN)
        await f.deliver(site, m.AggregateBegin(task_id="t1", cohort=SITES,
                                               weight_scale=0.0025, secure=False,
                                               threshold=0))
        return [b for s, b in f.inbox if s == site]

    with caplog.at_level(logging.INFO):
        sent = asyncio.run(plain_round())
    assert isinstance(sent[-1], m.PlainUpdate), f.refusals()
    (entry,) = PrivacyLedger.load(ledger_path(tmp_path / site)).entries
    assert (entry["job"], entry["round"], entry["mechanism"], entry["status"]) == (
        JOB, RND, NO_DP, "released")
    assert ISO.match(entry["at"]) and ISO.match(entry["released_at"])
    # the trainer says what it trained on and under which plan; the agent, for which
    # of the coordinator's tasks the update left
    assert entry["dataset"] == parse_plan(PLAIN_PLAN).dataset
    assert entry["plan_digest"] == plan_digest(PLAIN_PLAN).hex()
    assert entry["task_id"] == "t1"
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.INFO and "privacy ledger" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"job {JOB} round {RND}" in lines[0] and "mechanism none" in lines[0]
    assert "epsilon so far unbounded" in lines[0]

    proc = _privacy(tmp_path, tmp_path / site, "--runs", "--json")
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(proc.stdout)["runs"]
    assert (run["job"], run["round"], run["mechanism"]) == (JOB, RND, "none")
    assert run["plan_digest"] == plan_digest(PLAIN_PLAN).hex()


def test_a_dp_run_records_its_data_set_plan_and_dp_settings_as_it_trains(
        fleet, tmp_path) -> None:  # noqa: F811 (the fixture)
    """A DP-SGD run is on disk pending as soon as it trained, already saying on what,
    under which plan and with which clipping bound and delta (what ε depends on)."""
    f = fleet(PrivacyPolicy(require_secure_aggregation=False))
    site = SITES[0]
    asyncio.run(f.train([site], "t9", plan=DP_PLAN))
    (entry,) = PrivacyLedger.load(ledger_path(tmp_path / site)).entries
    assert entry["status"] == "pending" and entry["mechanism"] == "dp_sgd"
    assert entry["dataset"] == parse_plan(DP_PLAN).dataset
    assert entry["plan_digest"] == plan_digest(DP_PLAN).hex()
    assert (entry["max_grad_norm"], entry["delta"]) == (1.0, 1e-5)
    assert "task_id" not in entry  # not released: no task has sent it yet
