"""`fedge agent privacy` tells a hospital every release of its records: a job without
DP that released exact updates makes the total unbounded, and says which; a DP-FedAvg
job is shown client-level; ε is said to be for replacing one record. On an appliance
upgraded from a release that recorded DP-SGD runs only, the updates its secure
aggregation reveal log shows and the ledger lacks are counted unbounded, and the
footer says what the ledger cannot know. Real TorchTrainer training on a CSV site, the
ledger and the reveal log on disk, the real CLI in a subprocess."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedge.agent.guard import RevealLog, update_digest
from fedge.agent.trainer import TorchTrainer, ledger_path
from fedge.coordinator.plan import parse_plan
from fedge.train.accounting import DP_FEDAVG, DP_SGD, NO_DP, PrivacyLedger

BASE = ('[job]\ndataset = "rows"\nrounds = 3\n'
        '[model]\nname = "logistic"\nparams = { in_features = 2 }\n'
        '[train]\nsteps = 3\nbatch_size = 8\nlearning_rate = 0.1\n'
        '[strategy]\nname = "fedavg"\n')
CLIENT_DP = BASE + ("[privacy]\n"
                    "client_dp = { clip_norm = 0.5, noise_multiplier = 1.2, cohort_size = 3 }\n")
DP_SGD_PLAN = BASE + "[privacy]\ndp = { noise_multiplier = 1.1, delta = 1e-5 }\n"


def _trainer(tmp_path: Path) -> TorchTrainer:
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(64)))
    table = {"name": "rows", "kind": "tabular", "path": str(csv), "task": "binary",
             "features": ["a", "b"], "target": "y", "val_fraction": 0.0,
             # public constants: DP-SGD refuses ones fitted on the rows
             "standardise": "bounds", "feature_bounds": {"a": [0, 64], "b": [0, 2]}}
    return TorchTrainer([table], state_dir=tmp_path / "state")


def _on_disk(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger.load(ledger_path(tmp_path / "state"))


def _privacy_cli(tmp_path: Path) -> list[str]:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    out = subprocess.run([sys.executable, "-m", "fedge.cli", "agent", "privacy",
                          "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_every_run_is_recorded_and_a_job_without_dp_makes_the_total_unbounded(
        tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    w0 = np.zeros(3, np.float32)
    # a job without DP: every run has a release_privacy, and is charged as it trains
    # (its exact train_loss leaves in TrainDone)
    plain = trainer.train("site-0", "job-plain", parse_plan(BASE), w0, round=1, seed=1)
    assert plain.release_privacy is not None
    assert [(e["job"], e["mechanism"], e["status"]) for e in _on_disk(tmp_path).entries] == [
        ("job-plain", NO_DP, "released")]
    plain.release_privacy()  # charges nothing more
    assert len(_on_disk(tmp_path).entries) == 1
    # DP-FedAvg: pending on disk until the agent releases the update
    fl = [trainer.train("site-0", "job-fl", parse_plan(CLIENT_DP), w0, round=r, seed=r)
          for r in (1, 2)]
    assert [e["status"] for e in _on_disk(tmp_path).released(job="job-fl")] == []
    for r in fl:
        r.release_privacy()
    sgd = trainer.train("site-0", "job-sgd", parse_plan(DP_SGD_PLAN), w0, round=1, seed=1)
    sgd.release_privacy()
    ledger = _on_disk(tmp_path)
    assert ledger.mechanisms() == [DP_SGD, DP_FEDAVG, NO_DP]
    assert ledger.epsilon(1e-5) == math.inf and ledger.without_dp() == ["job-plain"]

    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows["job-plain"].split()[1:3] == ["1", "unbounded"]
    assert "without DP" in rows["job-plain"]
    fl_row = rows["job-fl"].split()
    assert fl_row[1] == "2" and fl_row[3] == "client-level"
    assert float(fl_row[2]) == round(ledger.epsilon(1e-5, job="job-fl"), 4)
    sgd_row = rows["job-sgd"].split()
    assert float(sgd_row[2]) == round(ledger.epsilon(1e-5, job="job-sgd"), 4)
    assert sgd_row[3:] == ["per", "record"]
    assert lines[4].split()[4:] == ["unbounded", "job", "job-plain", "released", "updates",
                                    "without", "DP"]
    assert "spend nothing" not in text
    assert "replacing one record with another" in text and "record count" in text


def test_without_a_job_lacking_dp_the_total_is_a_number(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    w0 = np.zeros(3, np.float32)
    trainer.train("site-0", "job-fl", parse_plan(CLIENT_DP), w0, round=1,
                  seed=1).release_privacy()
    trainer.train("site-0", "job-sgd", parse_plan(DP_SGD_PLAN), w0, round=1,
                  seed=1).release_privacy()
    ledger = _on_disk(tmp_path)
    lines = _privacy_cli(tmp_path)
    total = lines[3].split()
    assert total[:4] == ["total", "(all", "jobs", "composed)"]
    assert float(total[4]) == round(ledger.epsilon(1e-5), 4)
    assert 0 < ledger.epsilon(1e-5) < math.inf
    assert total[5:] == ["per", "record"]  # DP-FedAvg bounds each record too
    # a reveal for each released run: nothing unrecorded, and the claim stands
    for seed in (1, 2):
        _reveal(tmp_path, seed)
    text = "\n".join(_privacy_cli(tmp_path))
    assert "not recorded" not in text and "before the upgrade" not in text
    assert "Every training run whose update left this site is counted" in text


# The ledger of site-0 of a federation run by the release before mechanisms (a149b53):
# a DP-SGD Cox job of 2 rounds. That site had also released exact updates in a FedAdam
# job (2 rounds) and a SCAFFOLD job (3 rounds) under secure aggregation: 7 reveals.
OLD_LEDGER = {"entries": [
    {"job": "job-20261130065035-bf60c8", "round": r, "attempt": 1, "status": "released",
     "noise_multiplier": 1.1, "sampling_rate": 0.08080808080808081, "steps": 3,
     "bound": "per loss term, not a record-level bound"} for r in (1, 2)]}
OLD_JOB = "job-20261130065035-bf60c8"


def _reveal(tmp_path: Path, seed: int, job: str | None = None,
            round: int | None = None) -> None:
    """What the agent does before revealing the shares that unmask a sum holding one
    update of this site: the real reveal log records it on disk (with the job and round,
    as today's agent does; without, as earlier releases did)."""
    update = np.random.default_rng(seed).normal(size=40).astype(np.float32)
    log = RevealLog(tmp_path / "state" / "secagg" / "revealed.jsonl")
    log.check_and_record(update_digest(update, 99), ["site-0", "site-1", "site-2"], update,
                         job=job, round=round)


def _row(lines: list[str], name: str) -> list[str]:
    (row,) = [line for line in lines if line.startswith(name)]
    return row[40:].split()


def test_an_upgraded_site_counts_the_updates_its_old_ledger_did_not_record(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    ledger_path(state).parent.mkdir(parents=True)
    ledger_path(state).write_text(json.dumps(OLD_LEDGER))
    for seed in range(7):
        _reveal(tmp_path, seed)

    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    assert _row(lines, OLD_JOB)[:2] == ["2", "1.9947"]
    assert "recorded before the upgrade" in lines[1]
    assert _row(lines, "(not recorded in this ledger)")[:2] == ["5", "unbounded"]
    assert _row(lines, "total (all jobs composed)") == [
        "unbounded", "5", "updates", "of", "jobs", "this", "ledger", "did", "not", "record"]
    assert "shows 7 updates it revealed, and at least 5 of them" in text
    assert "recorded a training run only if it used DP-SGD" in text
    assert "plain (non-secure) updates sent before the upgrade cannot be known from " \
           "this appliance" in text
    assert "Every training run" not in text
    # the epsilon the earlier release showed (RDP, add-or-remove), and today's
    assert f"{OLD_JOB}              1.9947 now, 2.1578 as the earlier release showed" \
        in text

    # the upgraded agent trains a DP-SGD round, released and revealed: the ledger is
    # saved in today's format and stays legacy; the new run has its reveal, so still 5
    trainer = _trainer(tmp_path)
    run = trainer.train("site-0", "job-new", parse_plan(DP_SGD_PLAN), np.zeros(3, np.float32),
                        round=1, seed=1)
    run.release_privacy()
    _reveal(tmp_path, 100)
    saved = json.loads(ledger_path(state).read_text())
    assert (saved["version"], saved["legacy"], saved["legacy_entries"]) == (2, True, 2)
    assert saved["complete_since"] > 0
    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    assert _row(lines, "(not recorded in this ledger)")[:2] == ["5", "unbounded"]
    assert _row(lines, "job-new")[2:] == ["per", "record"]  # not "before the upgrade"
    assert _row(lines, "total (all jobs composed)")[:2] == ["unbounded", "5"]
    assert "this ledger records every run since" in text
    assert "cannot be known from this appliance" in text and "Every training run" not in text
    assert "job-new" not in text.split("recomputed:")[1]


def test_reveals_older_than_the_ledger_are_counted_unbounded(tmp_path: Path) -> None:
    """No ledger file (the earlier release recorded DP-SGD runs only, and this site ran
    none), 3 updates revealed: each left without an entry. Then today's agent trains a
    job without DP and reveals its update: that one is recorded."""
    for seed in range(3):
        _reveal(tmp_path, seed)
    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    assert not ledger_path(tmp_path / "state").exists()
    assert _row(lines, "(not recorded in this ledger)")[:2] == ["3", "unbounded"]
    assert _row(lines, "total (all jobs composed)")[:2] == ["unbounded", "3"]
    assert "this site revealed 3 updates under secure aggregation before this ledger" \
        in text
    assert "cannot be known from this appliance" in text and "Every training run" not in text

    trainer = _trainer(tmp_path)
    trainer.train("site-0", "job-plain", parse_plan(BASE), np.zeros(3, np.float32), round=1,
                  seed=1)
    _reveal(tmp_path, 50)
    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    assert _row(lines, "(not recorded in this ledger)")[:2] == ["3", "unbounded"]
    assert _row(lines, "total (all jobs composed)") == [
        "unbounded", "job", "job-plain", "released", "updates", "without", "DP;", "3",
        "updates", "of", "jobs", "this", "ledger", "did", "not", "record"]
    assert "before this ledger" in text and "Every training run" not in text
    # a reveal today's ledger lacks (every run is recorded before it leaves: a reveal
    # beyond the runs is an update unaccounted for) is counted too
    _reveal(tmp_path, 51)
    assert _row(_privacy_cli(tmp_path), "(not recorded in this ledger)")[:2] == [
        "4", "unbounded"]


def test_a_reveal_log_that_cannot_be_read_is_said_and_nothing_is_claimed(
        tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    trainer.train("site-0", "job-sgd", parse_plan(DP_SGD_PLAN), np.zeros(3, np.float32),
                  round=1, seed=1).release_privacy()
    log = tmp_path / "state" / "secagg" / "revealed.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("not a reveal log\n")
    text = "\n".join(_privacy_cli(tmp_path))
    assert f"reveal log: {log} cannot be read" in text
    assert "Every training run" not in text


def test_a_reveal_without_a_ledger_entry_is_named_by_its_job_and_round(
        tmp_path: Path) -> None:
    """An earlier release revealed one update (its row records no job); today's agent
    trains job-x round 1 under DP-SGD, released and revealed, then reveals job-x round 2
    and job-y round 4 with no released entry: those two are named, with their rounds,
    the old row counted as before."""
    _reveal(tmp_path, 1)  # a row as earlier releases wrote it: no job, no round
    trainer = _trainer(tmp_path)
    trainer.train("site-0", "job-x", parse_plan(DP_SGD_PLAN), np.zeros(3, np.float32),
                  round=1, seed=1).release_privacy()
    _reveal(tmp_path, 2, job="job-x", round=1)  # has its released entry
    _reveal(tmp_path, 3, job="job-x", round=2)  # has none
    _reveal(tmp_path, 4, job="job-y", round=4)  # a job the ledger never saw
    rows = [json.loads(line) for line in (tmp_path / "state" / "secagg" /
                                          "revealed.jsonl").read_text().splitlines()[1:]]
    assert [(r.get("job"), r.get("round")) for r in rows] == [
        (None, None), ("job-x", 1), ("job-x", 2), ("job-y", 4)]

    lines = _privacy_cli(tmp_path)
    text = "\n".join(lines)
    # job-x's own row: an update of it left unrecorded, so no epsilon bounds it
    assert _row(lines, "job-x")[:2] == ["1", "unbounded"]
    assert "round 2 revealed, not recorded" in " ".join(_row(lines, "job-x"))
    assert _row(lines, "(not recorded in this ledger)") == [
        "3", "unbounded", "updates", "revealed", "under", "secure", "aggregation;", "jobs",
        "job-x,", "job-y;", "1", "with", "no", "job", "recorded"]
    assert _row(lines, "total (all jobs composed)")[:2] == ["unbounded", "3"]
    assert "shows 4 updates it revealed, and at least 3 of them" in text
    assert "by job, where the log records it:" in text
    (x,) = [line for line in lines if line.startswith("  job-x ")]
    assert x.split()[1:3] == ["round", "2,"]
    (y,) = [line for line in lines if line.startswith("  job-y ")]
    assert y.split()[1:3] == ["round", "4,"]
    (old,) = [line for line in lines if line.startswith("  (job not recorded in this row)")]
    assert old[40:].split()[:4] == ["1", "update,", "at", "least,"]
    assert "Every training run" not in text
