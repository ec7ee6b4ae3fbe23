"""A job.name's non-printable characters are escaped in the learning curve's title,
like those its font cannot draw (diff review s16 L6): an ESC (a terminal colour code
pasted into job.name) was kept, drawn as an empty box, and matplotlib warned "Glyph 27
missing". report.md and report.json keep the name as it is.
(In a test_s16_report_legend* file only because that is the name this fix may use.)"""

from __future__ import annotations

import json
import warnings

from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedge.coordinator.report import _learning_curve_figure, summarise, write_job_report
from tests.coordinator.test_report_contents import PLAN, _status

NAME = "trial \x1b[31mred\x1b[0m\x07 end"


def test_a_non_printable_character_in_the_job_name_is_drawn_as_its_escape(tmp_path):
    fig = _learning_curve_figure(summarise({**_status(), "name": NAME}, PLAN.format(rounds=2)))
    (title,) = [t for t in fig.texts if t.get_text()]
    text = title.get_text()
    assert [c for c in text if not c.isprintable() and c != "\n"] == [], repr(text)
    assert "\\u001b[31mred\\u001b[0m\\u0007 end" in text.replace("\n", " "), text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Glyph 27 (\x1b) missing from font(s)"
        FigureCanvasAgg(fig).draw()
    write_job_report(tmp_path, {**_status(), "name": NAME}, PLAN.format(rounds=2))
    assert json.loads((tmp_path / "report.json").read_text())["name"] == NAME
