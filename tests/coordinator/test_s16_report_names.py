"""A job.name as report.md and the learning curve's title show it: '$x$' is text,
not maths (GitHub and GitLab render it), and a character the plot's font has no glyph
for (DejaVu Sans has no CJK) is written as its escape, never drawn as an empty box."""

from __future__ import annotations

import json

from matplotlib.font_manager import findfont
from matplotlib.ft2font import FT2Font

from fedge.coordinator.report import _learning_curve_figure, summarise, write_job_report
from tests.coordinator.test_report_contents import PLAN, _status

NAME = "Überprüfung — 心脏 risk $x$"


def test_a_dollar_in_the_job_name_is_escaped_in_report_md(tmp_path):
    write_job_report(tmp_path, {**_status(), "name": NAME}, PLAN.format(rounds=2))
    title = (tmp_path / "report.md").read_text().splitlines()[0]
    assert title == "# Job job-r (Überprüfung — 心脏 risk \\$x\\$): completed"
    assert json.loads((tmp_path / "report.json").read_text())["name"] == NAME


def test_the_plot_title_holds_no_character_its_font_cannot_draw(tmp_path):
    fig = _learning_curve_figure(summarise({**_status(), "name": NAME}, PLAN.format(rounds=2)))
    (title,) = [t for t in fig.texts if t.get_text()]
    text = title.get_text()
    charmap = FT2Font(findfont(title.get_fontproperties())).get_charmap()
    undrawable = [c for c in text if c.isprintable() and ord(c) not in charmap]
    assert undrawable == [], text
    # the name is still there: what the font draws as it is, the rest as escapes
    assert "Überprüfung —" in text and "\\u5fc3\\u810f risk" in text, text
    write_job_report(tmp_path, {**_status(), "name": NAME}, PLAN.format(rounds=2))
    assert (tmp_path / "learning_curve.png").stat().st_size > 0
