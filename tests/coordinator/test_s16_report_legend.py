"""Every plot's legend lies inside the saved figure, whatever the number of sites (diff
review s16 M1): one column right of the axes ran off the bottom of the learning curve
from about 17 sites (20 sites: hospital-18, hospital-19 and "size-weighted" missing;
60: names cut and each panel's legend running into the next). A legend of more than
LEGEND_ROWS entries gets more columns and a wider figure; past SITE_KEY_MAX sites, whose
styles would repeat, every site is one grey line under one entry."""

from __future__ import annotations

import itertools
import warnings

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedge.coordinator.report import (
    LEGEND_NAME_CHARS,
    SITE_KEY_MAX,
    _learning_curve_figure,
    _privacy_figure,
    summarise,
)
from tests.coordinator.test_report_contents import PLAN, _row, _status


def _report(n_sites, metrics=("c_index",), long_names=False):
    stem = "hospital-" + "x" * 40 if long_names else "hospital-"
    sites = [f"{stem}{i:02d}" for i in range(n_sites)]
    status = _status(rounds=3, committed=3, test=False)
    status["metrics"] = [_row(rnd, s, "val", m, 0.5 + 0.005 * i + 0.02 * rnd)
                         for rnd in (1, 2, 3) for i, s in enumerate(sites) for m in metrics]
    status["metrics"] += [_row(rnd, "*", "val", m, 0.6, 10 * n_sites)
                          for rnd in (1, 2, 3) for m in metrics]
    status["metrics"] += [_row(rnd, s, "privacy", "epsilon_job", 0.5 * rnd)
                          for rnd in (1, 2, 3) for s in sites]
    return sites, summarise(status, PLAN.format(rounds=3))


def _drawn(fig):
    """Draw ``fig`` as _save_png does (no warning from tight_layout allowed)."""
    canvas = FigureCanvasAgg(fig)  # the canvas savefig draws the PNG on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" among them
        canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("long_names", [False, True])
@pytest.mark.parametrize("metrics", [("c_index",), ("c_index", "loss")])
@pytest.mark.parametrize("n_sites", [3, 17, 20, 40, 41, 64])
def test_every_legend_lies_inside_the_figure_beside_axes_of_a_usable_size(
        n_sites, metrics, long_names):
    _, report = _report(n_sites, metrics, long_names)
    figures = {"learning curve": _learning_curve_figure(report),
               "privacy": _privacy_figure(report["privacy"])}
    for what, fig in figures.items():
        renderer = _drawn(fig)
        page = fig.bbox
        for ax in fig.axes:
            box = ax.get_legend().get_window_extent(renderer)
            frame = ax.get_window_extent(renderer)
            assert (box.x0 >= page.x0 and box.y0 >= page.y0 and box.x1 <= page.x1
                    and box.y1 <= page.y1), (what, n_sites, box, page)
            assert box.x0 >= frame.x1, (what, n_sites, box, frame)  # covers no point
            # the axes keep at least 3 by 1.5 inches for the data
            assert frame.width >= 3 * fig.dpi and frame.height >= 1.5 * fig.dpi, (
                what, n_sites, frame)
        # the panels do not overlap one another's legends
        boxes = sorted((ax.get_legend().get_window_extent(renderer) for ax in fig.axes),
                       key=lambda b: -b.y1)
        for upper, lower in itertools.pairwise(boxes):
            assert lower.y1 <= upper.y0, (what, n_sites, upper, lower)


@pytest.mark.parametrize("n_sites", [3, 20, SITE_KEY_MAX])
def test_up_to_site_key_max_sites_each_have_their_own_legend_entry(n_sites):
    sites, report = _report(n_sites)
    for fig, extra in ((_learning_curve_figure(report), ["size-weighted"]),
                       (_privacy_figure(report["privacy"]), [])):
        (ax,) = fig.axes
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == [*sites, *extra]
        drawn = [ln for ln in ax.get_lines() if ln.get_label() in sites]
        styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in drawn}
        assert len(drawn) == len(styles) == n_sites


def test_past_site_key_max_sites_every_site_is_drawn_under_one_entry():
    _, report = _report(64)
    for fig, extra in ((_learning_curve_figure(report), ["size-weighted"]),
                       (_privacy_figure(report["privacy"]), [])):
        (ax,) = fig.axes
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == ["each of the 64 sites", *extra]
        assert all(len(t) <= LEGEND_NAME_CHARS for t in texts)
        # every site is still drawn, in one style the legend names
        grey = [ln for ln in ax.get_lines() if ln.get_color() == "0.55"]
        assert len(grey) == 64
        assert len({(ln.get_linestyle(), ln.get_marker()) for ln in grey}) == 1


def test_long_names_that_differ_at_the_end_stay_apart_in_the_legend():
    _, report = _report(20, long_names=True)
    for fig in (_learning_curve_figure(report), _privacy_figure(report["privacy"])):
        (ax,) = fig.axes
        texts = [t.get_text() for t in ax.get_legend().get_texts()
                 if t.get_text() != "size-weighted"]
        assert len(texts) == len(set(texts)) == 20, texts
        assert all(len(t) <= LEGEND_NAME_CHARS and t.startswith("hospital-x")
                   for t in texts), texts
