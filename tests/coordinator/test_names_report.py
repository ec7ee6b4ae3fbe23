"""report.md shows the plan's job.name, a site's words and the plan as the text they
are: no HTML, emphasis, link, image or code span made from them, and a plan holding
backticks cannot end its code fence early."""

from __future__ import annotations

import json

from fedge.coordinator.report import write_job_report
from tests.coordinator.test_report_contents import PLAN, _status


def _title(md: str) -> str:
    return md.splitlines()[0]


def test_a_job_name_with_html_and_markdown_is_escaped_in_the_title(tmp_path):
    name = "<b>x</b> `rm` **bold** [link](http://e) ![i](p) ~~s~~ _u_ a\\*b"
    status = {**_status(), "name": name}
    write_job_report(tmp_path, status, PLAN.format(rounds=2))
    title = _title((tmp_path / "report.md").read_text())
    assert title == ("# Job job-r (&lt;b&gt;x&lt;/b&gt; \\`rm\\` \\*\\*bold\\*\\* "
                     "\\[link\\](http://e) \\!\\[i\\](p) \\~\\~s\\~\\~ \\_u\\_ a\\\\\\*b): "
                     "completed")
    assert json.loads((tmp_path / "report.json").read_text())["name"] == name  # as given


def test_a_sites_reason_holding_html_is_shown_as_text(tmp_path):
    status = _status(rounds=5, state="failed", committed=2, test=False)
    status["error"] = "site h1: <img src=x onerror=alert(1)> & more"
    write_job_report(tmp_path, status, PLAN.format(rounds=5))
    md = (tmp_path / "report.md").read_text()
    assert "Why: site h1: &lt;img src=x onerror=alert(1)&gt; &amp; more" in md
    assert "<img" not in md


def test_a_plan_holding_backticks_keeps_its_code_fence(tmp_path):
    plan = PLAN.format(rounds=2) + '# a note: ```\n'
    write_job_report(tmp_path, _status(), plan)
    md = (tmp_path / "report.md").read_text()
    section = md[md.index("## Plan"):]
    assert section.splitlines()[2] == "````toml" and section.rstrip().endswith("\n````")
