"""A failed or cancelled job's report says its last committed model was not scored on
the final test (the sites score the model on their test split after the last planned
round only); a job that did score it, or completed, says no such thing."""

from __future__ import annotations

import pytest

from fedge.coordinator.report import write_job_report
from tests.coordinator.test_report_contents import PLAN, _status

LINE = "**Not scored on the final test:**"


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_an_ended_jobs_report_says_its_model_was_not_scored_on_test(tmp_path, state):
    status = _status(rounds=40, state=state, committed=3, test=False, error="why")
    write_job_report(tmp_path, status, PLAN.format(rounds=40))
    md = (tmp_path / "report.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith(LINE)]
    assert lines == [f"{LINE} the job {state} before its last round, so its last "
                     "committed model (round 3) was never evaluated on the sites' `test` "
                     "split."], md


def test_no_such_line_when_the_final_test_was_scored_or_the_job_completed(tmp_path):
    write_job_report(tmp_path / "a", _status(), PLAN.format(rounds=2))
    assert LINE not in (tmp_path / "a" / "report.md").read_text()
    write_job_report(tmp_path / "b", _status(rounds=5, state="failed", committed=2, test=True),
                     PLAN.format(rounds=5))
    assert LINE not in (tmp_path / "b" / "report.md").read_text()
