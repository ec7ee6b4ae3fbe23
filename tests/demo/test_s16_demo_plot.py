"""The demo's learning curve (review s16 M3): each centre's line has markers, so a
1-round demo shows every centre (a line alone drew none of them); round ticks are whole
numbers with one on round 1; the legend sits off the axes."""

from __future__ import annotations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from fedge.demo.run import CENTRES, _learning_curve_figure, _plots


def _curve(rounds):
    return [{"round": r, "weighted": 0.6 + 0.01 * r, "loss": 3.0 - 0.1 * r,
             "sites": {f"centre-{i}": 0.55 + 0.02 * i + 0.01 * r for i in range(CENTRES)}}
            for r in range(1, rounds + 1)]


@pytest.mark.parametrize("rounds", [1, 2])
def test_every_centre_is_drawn_with_whole_round_ticks_and_the_legend_off_the_data(rounds):
    fig = _learning_curve_figure(_curve(rounds))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.canvas.draw()
    (ax,) = fig.axes
    centres = [ln for ln in ax.get_lines() if ln.get_label().startswith("centre-")]
    assert len(centres) == CENTRES
    for ln in centres:
        assert ln.get_marker() not in (None, "None", "", " "), ln.get_label()
    assert len({(ln.get_color(), ln.get_linestyle()) for ln in centres}) == CENTRES
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert labels == [str(r) for r in range(1, rounds + 1)], labels
    box, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert box.x0 >= frame.x1 and box.x1 <= fig.bbox.x1 + 1, (box, frame, fig.bbox)


def test_the_plots_are_written_as_pngs(tmp_path):
    assert _plots(tmp_path, _curve(1)) == ["learning_curve.png", "loss_curve.png"]
    for name in ("learning_curve.png", "loss_curve.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
