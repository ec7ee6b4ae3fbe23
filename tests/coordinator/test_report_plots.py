"""The report's plots, read back from the PNGs write_job_report saves.

- The learning curve's title fits in the figure, whatever the job's name: it used to
  be one line wider than the 7-inch figure, cut off at both edges.
- A site evaluated in one round only is drawn (a marker), and a site's line breaks
  at a round it missed instead of running straight across it.
  (How they are written: tests/coordinator/test_report_plot_writes.py.)"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.image import imread

from fedge.coordinator.report import _learning_curve_figure, summarise, write_job_report
from tests.coordinator.test_report_contents import PLAN, _row, _status

WIDE_NAME = "W" * 100  # job.name's most characters, in the widest letter


def _gapped_status():
    """A long job name; h1 in every round, h2 misses round 2, h3 is evaluated in round 1
    only."""
    status = _status(rounds=3, committed=3, test=False)
    status["job_id"] = "job-20261130115256-d939c1"
    status["name"] = WIDE_NAME
    status["metrics"] = [r for r in status["metrics"]
                         if not (r["site"] == "h2" and r["round"] == 2 and r["split"] == "val")]
    status["metrics"] += [_row(1, "h3", "val", "auc", 0.61), _row(1, "h3", "val", "loss", 3.04)]
    return status


def test_learning_curve_title_is_not_cut_off_at_the_edges(tmp_path):
    write_job_report(tmp_path, _gapped_status(), PLAN.format(rounds=3))
    png = imread(tmp_path / "learning_curve.png")
    assert png.shape[1] == 700  # 7 inches at 100 dpi
    rgb = png[..., :3]
    # the title's band: the rows above the first panel's frame (the topmost row that
    # is dark across most of the width)
    frame = next(y for y in range(rgb.shape[0]) if (rgb[y].mean(axis=1) < 0.5).mean() > 0.5)
    band = rgb[:frame]
    ink = band.mean(axis=2) < 0.5
    assert ink.any(), "no title drawn"
    cols = np.flatnonzero(ink.any(axis=0))
    assert cols[0] > 5 and cols[-1] < rgb.shape[1] - 6, (
        f"title runs from column {cols[0]} to {cols[-1]} of {rgb.shape[1]}: cut off")

    fig = _learning_curve_figure(summarise(_gapped_status(), PLAN.format(rounds=3)))
    renderer = fig.canvas.get_renderer()
    (title,) = [t for t in fig.texts if t.get_text()]  # the suptitle
    box, page = title.get_window_extent(renderer), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1, (box, page)
    assert WIDE_NAME[:10] in title.get_text()


def test_a_site_evaluated_once_is_drawn_and_lines_break_at_missing_rounds(tmp_path):
    fig = _learning_curve_figure(summarise(_gapped_status(), PLAN.format(rounds=3)))
    for ax in fig.axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        for site in ("h1", "h2", "h3"):
            assert lines[site].get_marker() not in (None, "None", "", " "), site
        h2 = list(lines["h2"].get_ydata())
        assert list(lines["h2"].get_xdata()) == [1, 2, 3]
        assert not math.isnan(h2[0]) and math.isnan(h2[1]) and not math.isnan(h2[2])
        h3 = list(lines["h3"].get_ydata())
        assert not math.isnan(h3[0]) and all(math.isnan(v) for v in h3[1:])
