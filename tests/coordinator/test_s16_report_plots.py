"""The learning curve and privacy plots are readable (review s16 M3): the legend sits
off the axes and covers no point, a long site name is cut short in it (report.md has
it whole), a 1- or 2-round job has a labelled tick on each round and half a round of
margin, and up to 40 sites are each drawn in their own (colour, line style)."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedge.coordinator.report import (
    LEGEND_NAME_CHARS,
    _learning_curve_figure,
    _privacy_figure,
    summarise,
    write_job_report,
)
from tests.coordinator.test_report_contents import PLAN, _row, _status

LONG = "site-" + "l" * 123  # a site name's 128 characters


def _status_of(sites, rounds):
    status = _status(rounds=rounds, committed=rounds, test=False)
    status["metrics"] = [
        _row(rnd, site, "val", "c_index", 0.5 + 0.01 * i + 0.02 * rnd)
        for rnd in range(1, rounds + 1) for i, site in enumerate(sites)]
    status["metrics"] += [_row(rnd, "*", "val", "c_index", 0.6, 10 * len(sites))
                          for rnd in range(1, rounds + 1)]
    status["metrics"] += [_row(rnd, s, "privacy", "epsilon_job", 0.5 * rnd)
                          for rnd in range(1, rounds + 1) for s in sites]
    return status


def _figures(sites, rounds):
    report = summarise(_status_of(sites, rounds), PLAN.format(rounds=rounds))
    return [_learning_curve_figure(report), _privacy_figure(report["privacy"])]


@pytest.mark.parametrize("rounds", [1, 2])
def test_a_short_job_has_a_labelled_tick_on_each_round(rounds):
    for fig in _figures(["hospital-a", "hospital-b"], rounds):
        fig.canvas.draw()
        (ax,) = fig.axes
        labels = [t.get_text() for t in ax.get_xticklabels()
                  if ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
        assert labels == [str(r) for r in range(1, rounds + 1)], labels
        assert ax.get_xlim() == pytest.approx((0.5, rounds + 0.5))


def test_the_legend_is_off_the_axes_and_cuts_a_long_site_name(tmp_path):
    for fig in _figures(["hospital-a", "hospital-b", LONG], 1):
        renderer = FigureCanvasAgg(fig).get_renderer()
        (ax,) = fig.axes
        legend = ax.get_legend()
        box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 >= frame.x1, (box, frame)  # right of the axes: covers no point
        assert box.x1 <= fig.bbox.x1 + 1, (box, fig.bbox)  # and inside the figure
        texts = [t.get_text() for t in legend.get_texts()]
        assert all(len(t) <= LEGEND_NAME_CHARS for t in texts), texts
        assert any(t.startswith("site-lll") for t in texts), texts
    write_job_report(tmp_path, _status_of(["hospital-a", LONG], 1), PLAN.format(rounds=1))
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert LONG in (tmp_path / "report.md").read_text()  # whole in the report


def test_twenty_sites_are_each_drawn_in_their_own_colour_and_style():
    sites = [f"hospital-{i:02d}" for i in range(1, 21)]
    for fig in _figures(sites, 3):
        (ax,) = fig.axes
        drawn = [ln for ln in ax.get_lines() if ln.get_label() in sites]
        assert len(drawn) == 20
        pairs = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in drawn}
        assert len(pairs) == 20, pairs
