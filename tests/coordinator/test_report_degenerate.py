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


def test_survivors_not_evaluated_are_stored_with_the_round_and_listed_in_the_report(
        tmp_path):
    """Round logic -> SQLite -> report: site b (all censored) answered no metric and
    site c refused (no val split); both trained, and the report says why neither is
    in the evaluation tables."""
    from fedge.coordinator.rounds import EVAL_EMPTY
    from fedge.coordinator.store import Store
    from fedge.wire import messages as m
    from tests.coordinator.test_rounds_eval_missing import NO_VAL, evaluating

    rnd = evaluating("abc")
    rnd.receive("a", m.EvalResult(rnd.task_id, 40, {"c_index": 0.54}), 2.0)
    rnd.receive("b", m.EvalResult(rnd.task_id, 200, {}), 2.0)
    rnd.receive("c", m.TaskRefused(rnd.task_id, "eval", NO_VAL), 2.0)
    store = Store(tmp_path / "state")
    store.create_job("job1", "plan", actor="op")
    store.commit_round("job1", 1, started_at=0.0, cohort=rnd.cohort,
                       survivors=rnd.survivors, dropped=rnd.dropped, model_digest="d",
                       metrics=rnd.metric_rows(), dropped_reasons=rnd.dropped_reasons(),
                       eval_missing=rnd.eval_missing)
    store.close()
    store = Store(tmp_path / "state")  # read back as a restarted coordinator does
    (record,) = store.rounds("job1")
    assert record.eval_missing == {"b": EVAL_EMPTY, "c": NO_VAL}
    status = {"job_id": "job1", "status": "completed", "rounds_planned": 3,
              "committed_round": 1, "rounds": [r.__dict__ for r in store.rounds("job1")],
              "metrics": store.metrics("job1")}
    write_job_report(tmp_path, status)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_missing"] == {"1": {"b": EVAL_EMPTY, "c": NO_VAL}}
    md = (tmp_path / "report.md").read_text()
    final = md[md.index("## Final round"):md.index("## Survivors not evaluated")]
    assert f"Not evaluated: b: {EVAL_EMPTY}; c: {NO_VAL}." in final
    section = md[md.index("## Survivors not evaluated, and why"):md.index("## Rounds")]
    assert f"| 1 | b | {EVAL_EMPTY} |" in section and f"| 1 | c | {NO_VAL} |" in section


def test_a_database_without_the_eval_missing_table_opens_and_reads_no_reasons(tmp_path):
    """A database the previous release wrote (no eval_missing table) opens, gains the
    table, keeps its rounds (with no reasons) and records reasons from then on."""
    import sqlite3

    from fedge.coordinator.store import SCHEMA_VERSION, Store

    store = Store(tmp_path)
    store.create_job("j", "plan", actor="op")
    store.commit_round("j", 1, started_at=0.0, cohort=["a"], survivors=["a"], dropped=[],
                       model_digest="d", metrics=[])
    store.close()
    conn = sqlite3.connect(tmp_path / "coordinator.sqlite3")
    conn.execute("DROP TABLE eval_missing")
    conn.commit()
    conn.close()
    again = Store(tmp_path)
    assert again.schema_version() == SCHEMA_VERSION
    assert again.rounds("j")[0].eval_missing == {}
    again.commit_round("j", 2, started_at=1.0, cohort=["a"], survivors=["a"], dropped=[],
                       model_digest="d", metrics=[], eval_missing={"a": "refused"})
    assert [r.eval_missing for r in again.rounds("j")] == [{}, {"a": "refused"}]
