"""`fedge agent privacy` tells a hospital every release of its records: a job without
DP that released exact updates makes the total unbounded, and says which; a DP-FedAvg
job is shown client-level; ε is said to be for replacing one record. Real TorchTrainer
training on a CSV site, the ledger on disk, the real CLI in a subprocess."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np

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
             "features": ["a", "b"], "target": "y", "val_fraction": 0.0}
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
