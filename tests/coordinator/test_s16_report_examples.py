"""report.md shows each site's examples per split, and says when an aggregate covers
fewer sites than gave the split's other metrics, naming the site left out and why: a
site whose test split holds one class has no AUC, and the AUC aggregate is over the
others (review s16 M2). report.json only gains fields."""

from __future__ import annotations

import json

from fedge.coordinator.report import UNDEFINED_WHY, write_job_report
from tests.coordinator.test_report_contents import PLAN, _row, _status


def _one_class_test_status():
    status = _status()  # rounds 1 and 2 on val (10 examples each), test auc for h1, h2
    status["metrics"] = [r for r in status["metrics"] if r["split"] != "test"]
    status["metrics"] += [
        *(_row(rnd, site, "train", "train_loss", 0.5, n)
          for rnd in (1, 2) for site, n in (("h1", 240), ("h2", 180))),
        _row(2, "h1", "test", "auc", 0.87, 80), _row(2, "h1", "test", "loss", 0.45, 80),
        _row(2, "h2", "test", "loss", 0.89, 60),  # one class: no auc
        _row(2, "*", "test", "auc", 0.87, 80), _row(2, "*", "test", "loss", 0.65, 140)]
    return status


def test_an_aggregate_over_fewer_sites_names_the_site_left_out_and_why(tmp_path):
    write_job_report(tmp_path, _one_class_test_status(), PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    test = md[md.index("## Final test"):md.index("## Every round")]
    assert "| h1 | 0.8700 | 0.4500 | 80 |" in test
    assert "| h2 | – | 0.8900 | 60 |" in test
    assert ("- auc: the aggregate and the mean of sites cover 1 of 2 sites; no value "
            "from h2: its evaluation gave no value for this metric.") in test
    assert "- loss:" not in test
    report = json.loads((tmp_path / "report.json").read_text())
    auc = report["final_test"]["metrics"]["auc"]
    assert auc["missing"] == {"h2": "its evaluation gave no value for this metric"}
    assert auc["sites"] == {"h1": 0.87} and auc["aggregate"] == 0.87  # as before
    assert report["final_test"]["metrics"]["loss"]["missing"] == {}


def test_a_roc_auc_left_out_is_said_to_need_both_classes(tmp_path):
    status = _one_class_test_status()
    for r in status["metrics"]:
        if r["split"] == "test" and r["name"] == "auc":
            r["name"] = "roc_auc"
    write_job_report(tmp_path, status, PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    assert f"no value from h2: {UNDEFINED_WHY['roc_auc']}." in md
    assert "roc_auc needs both classes" in UNDEFINED_WHY["roc_auc"]


def test_each_sites_examples_per_split_are_in_report_md_and_json(tmp_path):
    write_job_report(tmp_path, _one_class_test_status(), PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    final = md[md.index("## Final round"):md.index("## Final test")]
    assert "| site | auc | loss | examples |" in final
    assert "| h1 | 0.7000 | 0.8000 | 10 |" in final
    assert "| **aggregate** | 0.8000 | 0.7000 | 20 |" in final
    section = md[md.index("## Examples per site"):]
    assert "| site | train | val | test |" in section
    assert "| h1 | 240 | 10 | 80 |" in section and "| h2 | 180 | 10 | 60 |" in section
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["examples"] == {"h1": {"train": 240, "val": 10, "test": 80},
                                  "h2": {"train": 180, "val": 10, "test": 60}}
    # the fields report.json had are still there, in their shape
    assert report["final"]["auc"] == {"aggregate": 0.8, "sites": {"h1": 0.7, "h2": 0.9}}
    assert report["rounds"]["2"]["auc"]["n_examples"] == {"h1": 10, "h2": 10}
