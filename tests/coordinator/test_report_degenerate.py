"""The report of a federation whose data leaves metrics undefined: a metric that no
site could compute in the last round, sites that were not evaluated, a final test
that every site missed. Each says what it is, never an earlier round's number."""

from __future__ import annotations

import json

from fedge.coordinator.report import summarise, write_job_report


def _row(rnd, site, split, name, value, n=50):
    return {"round": rnd, "site": site, "split": split, "name": name, "value": value,
            "n_examples": n}


def _attempt(rnd, survivors, dropped_reasons=None, **extra):
    cohort = ["site-a", "site-b"]
    return {"job_id": "j", "round": rnd, "attempt": 1, "status": "committed",
            "started_at": 10.0 * rnd, "ended_at": 10.0 * rnd + 1, "cohort": cohort,
            "survivors": survivors, "dropped": sorted(set(cohort) - set(survivors)),
            "model_digest": "", "reason": "", "dropped_reasons": dict(dropped_reasons or {}),
            **extra}


def _stale_status():
    """Round 1: site-a's c_index (only it has comparable pairs) and both sites' loss;
    round 2: site-a is gone, so no site reports c_index."""
    rows = [_row(1, "site-a", "val", "c_index", 0.71), _row(1, "*", "val", "c_index", 0.71),
            _row(1, "site-a", "val", "loss", 2.0), _row(1, "site-b", "val", "loss", 1.0),
            _row(1, "*", "val", "loss", 1.5, 100),
            _row(2, "site-b", "val", "loss", 0.9), _row(2, "*", "val", "loss", 0.9)]
    rounds = [_attempt(1, ["site-a", "site-b"]),
              _attempt(2, ["site-b"], {"site-a": "connection lost during training"})]
    return {"job_id": "j", "status": "completed", "rounds_planned": 2,
            "committed_round": 2, "rounds": rounds, "metrics": rows}


def test_a_metric_no_site_reported_in_the_last_round_has_no_final_aggregate(tmp_path):
    write_job_report(tmp_path, _stale_status())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["c_index"] == {"aggregate": None, "sites": {}}
    assert report["final"]["loss"] == {"aggregate": 0.9, "sites": {"site-b": 0.9}}
    # round 1's value stays where it belongs: its round's table and the curve
    assert report["rounds"]["1"]["c_index"]["aggregate"] == 0.71
    assert report["curves"]["c_index"]["rounds"] == [1]
    assert report["curves"]["c_index"]["aggregate"] == [0.71]
    md = (tmp_path / "report.md").read_text()
    final = md[md.index("## Final round"):md.index("## Every round")]
    assert "| **aggregate** | – | 0.9000 |" in final
    assert "0.7100" not in final


def test_every_aggregate_in_the_report_is_paired_with_its_own_round():
    report = summarise(_stale_status())
    for rnd, table in report["rounds"].items():
        for name, entry in table.items():
            star = [r["value"] for r in report["metrics"] if r["site"] == "*"
                    and r["round"] == int(rnd) and r["name"] == name and r["split"] == "val"]
            assert entry["aggregate"] == (star[0] if star else None)
    for name, c in report["curves"].items():
        assert len(c["rounds"]) == len(c["aggregate"])
        for rnd, value in zip(c["rounds"], c["aggregate"], strict=True):
            assert report["rounds"][str(rnd)][name]["aggregate"] == value


NO_TEST = "site 'surv' has no 'test' split (hold one out)"


def test_a_final_test_every_site_missed_keeps_why_in_report_json_and_md(tmp_path):
    status = _stale_status()
    status["final_test"] = {"round": 2, "split": "test", "metrics": {},
                            "missing": {"site-b": NO_TEST}}
    write_job_report(tmp_path, status)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final_test"] == {"round": 2, "metrics": {},
                                    "missing": {"site-b": NO_TEST}}
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Final test: round 2's model"):md.index("## Every round")]
    assert "No site gave a result: the final model has no test metrics." in section
    assert f"Not in the final test: site-b: {NO_TEST}." in section
    assert "| **aggregate** |" not in section
