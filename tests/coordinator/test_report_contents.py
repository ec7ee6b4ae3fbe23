"""What report.md and report.json say, from a job status as Coordinator.job_status
gives it: every round's per-site table, why each dropped site was dropped, the final
test, the DP delta, and a failed or cancelled job's results marked as such."""

from __future__ import annotations

import json

import pytest

from fedge.coordinator.report import summarise, write_job_report

PLAN = """
[job]
dataset = "synthetic"
rounds = {rounds}
min_clients = 2
eval_split = "val"
[model]
name = "logistic"
params = {{ in_features = 4 }}
[train]
epochs = 1
batch_size = 8
learning_rate = 0.1
[strategy]
name = "fedavg"
[privacy]
min_site_examples = 100
[privacy.dp]
noise_multiplier = 1.1
max_grad_norm = 1.0
delta = 1e-6
"""

MISSING = ("/data/bin_missing.csv, line 1, column 'sbp': missing column in the header")


def _row(rnd, site, split, name, value, n=10):
    return {"round": rnd, "site": site, "split": split, "name": name, "value": value,
            "n_examples": n}


def _attempt(rnd, status="committed", cohort=("h1", "h2", "h3"), survivors=("h1", "h2"),
             dropped_reasons=None, reason=""):
    dropped = sorted(set(cohort) - set(survivors)) if status == "committed" else []
    return {"job_id": "job-r", "round": rnd, "attempt": 1, "status": status,
            "started_at": 100.0 * rnd, "ended_at": 100.0 * rnd + 5, "cohort": list(cohort),
            "survivors": list(survivors) if status == "committed" else [],
            "dropped": dropped, "model_digest": "", "reason": reason,
            "dropped_reasons": dict(dropped_reasons or {})}


def _status(*, rounds=2, state="completed", committed=2, test=True, error=""):
    rows = []
    for rnd in range(1, committed + 1):
        for site, v in (("h1", 0.1 * rnd), ("h2", 0.2 * rnd)):
            rows.append(_row(rnd, site, "val", "auc", 0.5 + v))
            rows.append(_row(rnd, site, "val", "loss", 1.0 - v))
            rows.append(_row(rnd, site, "privacy", "epsilon_job", 0.5 * rnd))
        rows.append(_row(rnd, "*", "val", "auc", 0.5 + 0.15 * rnd, 20))
        rows.append(_row(rnd, "*", "val", "loss", 1.0 - 0.15 * rnd, 20))
    if test:
        rows += [_row(committed, "h1", "test", "auc", 0.71),
                 _row(committed, "h2", "test", "auc", 0.73),
                 _row(committed, "*", "test", "auc", 0.72, 20)]
    attempts = [_attempt(1, dropped_reasons={"h3": MISSING})]
    attempts += [_attempt(r, survivors=("h1", "h2", "h3")) for r in range(2, committed + 1)]
    return {"job_id": "job-r", "status": state, "rounds_planned": rounds,
            "committed_round": committed, "rounds": attempts, "metrics": rows,
            "error": error}


def test_every_round_has_its_own_per_site_table_in_report_md(tmp_path):
    write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Every round, each site (`val` split)"):md.index("## Rounds")]
    assert "Round 1:" in section and "Round 2:" in section
    round1 = section[section.index("Round 1:"):section.index("Round 2:")]
    assert "| h1 | 0.6000 | 0.9000 |" in round1 and "| h2 | 0.7000 | 0.8000 |" in round1
    assert "| **aggregate** | 0.6500 | 0.8500 |" in round1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"]["1"]["auc"]["sites"] == {"h1": 0.6, "h2": 0.7}


def test_the_privacy_section_states_the_plans_delta(tmp_path):
    write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    assert "delta = 1e-06 (the plan's privacy.dp.delta)" in md
    assert json.loads((tmp_path / "report.json").read_text())["privacy_delta"] == 1e-6


def test_a_committed_rounds_dropped_site_is_named_with_its_reason(tmp_path):
    write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dropped"] == {"1": {"h3": MISSING}}
    assert report["attempts"][0]["dropped_reasons"] == {"h3": MISSING}
    md = (tmp_path / "report.md").read_text()
    assert f"| h3 | h3: {MISSING} |" in md  # the Rounds table's dropped and reason cells


def test_the_final_test_has_its_own_section_apart_from_the_rounds_validation(tmp_path):
    write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["eval_split"] == "val"  # the rounds' split, not the final test's
    assert report["final"]["auc"]["aggregate"] == 0.8  # round 2's validation
    assert report["final_test"]["round"] == 2
    assert report["final_test"]["metrics"]["auc"]["aggregate"] == 0.72
    assert report["final_test"]["metrics"]["auc"]["sites"] == {"h1": 0.71, "h2": 0.73}
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Final test: round 2's model on each site's `test` split"):]
    assert "| **aggregate** | 0.7200 |" in section.split("##")[1]


def test_a_report_without_a_final_test_says_nothing_of_one(tmp_path):
    write_job_report(tmp_path, _status(test=False), PLAN.format(rounds=2))
    assert json.loads((tmp_path / "report.json").read_text())["final_test"] is None
    assert "## Final test" not in (tmp_path / "report.md").read_text()


def test_a_cancelled_jobs_report_is_marked_as_its_last_committed_model(tmp_path):
    status = _status(rounds=5, state="cancelled", committed=2, test=False)
    write_job_report(tmp_path, status, PLAN.format(rounds=5))
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Job job-r: cancelled, last committed round 2 of 5\n")
    assert "its last committed global model (round 2), not of a finished training" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["status"], report["partial"], report["committed_round"]) == \
        ("cancelled", True, 2)
    failed = summarise({**status, "status": "failed",
                        "error": "round 3 failed 3 times; last: x"}, PLAN.format(rounds=5))
    assert failed["partial"] is True and failed["error"].startswith("round 3 failed")


def test_report_md_is_written_last_so_its_presence_means_the_rest_is_there(tmp_path):
    """`jobs watch` says the results are ready once report.md is listed: a report.json
    that cannot be written leaves no report.md behind to say otherwise."""
    (tmp_path / "report.json").mkdir()  # the rename onto it fails
    try:
        write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    except OSError:
        pass
    else:
        raise AssertionError("report.json could not be written, yet no error was raised")
    assert not (tmp_path / "report.md").exists()
    assert (tmp_path / "learning_curve.png").is_file()


def test_tables_give_the_mean_of_sites_beside_the_size_weighted_aggregate(tmp_path):
    """h1 (30 test rows) 0.60 and h2 (10) 0.90: the aggregate the coordinator stores
    weighs them by size (0.675); FLamby's per-client mean counts each once (0.75)."""
    status = _status(test=False)
    status["metrics"] += [_row(2, "h1", "test", "auc", 0.60, 30),
                          _row(2, "h2", "test", "auc", 0.90, 10),
                          _row(2, "*", "test", "auc", 0.675, 40)]
    write_job_report(tmp_path, status, PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    test = md[md.index("## Final test"):md.index("## Every round")]
    assert "| **aggregate** | 0.6750 |" in test and "| mean of sites | 0.7500 |" in test
    final = md[md.index("## Final round"):md.index("## Final test")]
    assert "counts each site once" in final
    assert "| mean of sites | 0.8000 | 0.7000 |" in final  # auc, loss of round 2


def test_an_unbounded_epsilon_is_said_in_words_and_report_json_still_loads(tmp_path):
    status = _status()
    status["metrics"] = [dict(r, value=float("inf")) if (r["site"], r["name"], r["round"])
                         == ("h2", "epsilon_job", 2) else r for r in status["metrics"]]
    write_job_report(tmp_path, status, PLAN.format(rounds=2))
    md = (tmp_path / "report.md").read_text()
    assert "| h1 | 1.000 |" in md
    assert "| h2 | unbounded (noise too small to bound anything) |" in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["privacy"]["h2"][-1][1] == float("inf")


CLIENT_DP_PLAN = PLAN.replace("""[privacy.dp]
noise_multiplier = 1.1
max_grad_norm = 1.0
delta = 1e-6
""", """[privacy.client_dp]
clip_norm = 0.5
noise_multiplier = 0.8
cohort_size = 3
[secagg]
enabled = true
clip = 8.0
""")


def test_a_dp_fedavg_jobs_report_gives_each_sites_client_level_epsilon_as_its_ledger_does(
        tmp_path):
    """DP-FedAvg's sites report no epsilon with their updates, so the report computes
    each site's client-level epsilon from the sums that held its update, and it is the
    figure the site's own ledger gives for the same releases."""
    from fedge.coordinator.plan import parse_plan
    from fedge.train.accounting import DP_FEDAVG, PrivacyLedger

    plan = CLIENT_DP_PLAN.format(rounds=3)
    assert parse_plan(plan).privacy["client_dp"]["noise_multiplier"] == 0.8
    status = _status(rounds=3, committed=3)
    status["metrics"] = [r for r in status["metrics"] if r["split"] != "privacy"]
    # h3 was dropped from round 1's sum, and a failed attempt's sum held no one
    status["rounds"].insert(1, _attempt(2, status="failed", reason="unmasking failed"))
    write_job_report(tmp_path, status, plan)
    report = json.loads((tmp_path / "report.json").read_text())
    client = report["client_privacy"]
    assert client["delta"] == 1e-5 and client["noise_multiplier"] == 0.8
    assert {s: v["releases"] for s, v in client["sites"].items()} == {"h1": 3, "h2": 3, "h3": 2}
    for site, v in client["sites"].items():
        ledger = PrivacyLedger()
        for rnd in range(1, v["releases"] + 1):
            ledger.release(ledger.record(job="job-r", round=rnd, mechanism=DP_FEDAVG,
                                         noise_multiplier=0.8, clip_norm=0.5,
                                         cohort_size=3, pending=True))
        assert v["epsilon"] == pytest.approx(ledger.epsilon(1e-5), rel=1e-9), site
    assert client["sites"]["h3"]["epsilon"] < client["sites"]["h1"]["epsilon"]
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Privacy (DP-FedAvg), client-level epsilon per site"):]
    assert f"| h1 | 3 | {client['sites']['h1']['epsilon']:.3f} |" in section
    assert f"| h3 | 2 | {client['sites']['h3']['epsilon']:.3f} |" in section


def test_a_dp_sgd_jobs_report_has_no_client_level_section(tmp_path):
    write_job_report(tmp_path, _status(), PLAN.format(rounds=2))
    assert json.loads((tmp_path / "report.json").read_text())["client_privacy"] is None
    assert "DP-FedAvg" not in (tmp_path / "report.md").read_text()
