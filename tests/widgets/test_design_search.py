"""The design-search explorer (chapter 05): the plotted points are the search's, checked against the memory model."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.transforms import Bbox

from survey_utils.architecture import total_params
from survey_utils.experiments.ch05_hybrid import as_method, search
from survey_utils.memory.closed_form import estimate
from survey_utils.widgets.design_search import GIB, DesignSearchExplorer
from survey_utils.zoo import load_config


def test_the_plot_shows_the_front_and_it_is_the_memory_models() -> None:
    explorer = DesignSearchExplorer(["tiny-bert", "roberta-base"], model="roberta-base")
    view = explorer.view
    config = load_config("roberta-base")
    assert view.trainable_budget == int(total_params(config) * 1.0 / 100)
    again = search("roberta-base", view.trainable_budget, view.memory_budget)
    plotted = np.asarray(explorer.front_points.get_offsets())
    assert np.allclose(plotted, [(c.trainable, c.peak / GIB) for c in again.front], rtol=1e-12)
    assert len(explorer.all_points.get_offsets()) == len(again.feasible)
    for c in (again.front[0], again.front[len(again.front) // 2], again.front[-1]):  # the peak is the estimate's
        assert c.peak == estimate(config, as_method(c), batch_size=8, seq_len=128).total
    assert all(c.trainable <= view.trainable_budget and c.peak <= view.memory_budget for c in again.feasible)
    chosen = np.asarray(explorer.chosen_point.get_offsets())[0]
    assert tuple(chosen) == (again.front[0].trainable, again.front[0].peak / GIB)
    assert sum(bar.get_width() for bar in explorer.ax_parts.patches) == again.front[0].trainable


def test_moving_a_budget_redraws_and_a_budget_below_everything_is_one_line() -> None:
    explorer = DesignSearchExplorer(["tiny-bert", "roberta-base"], model="tiny-bert")
    before = np.asarray(explorer.all_points.get_offsets()).copy()
    explorer.controls["memory"].value = 1.05
    assert len(explorer.all_points.get_offsets()) < len(before) and explorer.error is None
    explorer.controls["point"].value = 3
    assert explorer.view.chosen == explorer.view.result.front[min(3, len(explorer.view.result.front) - 1)]
    explorer.controls["trainable"].value = 10 ** -3  # 0.001% of tiny-bert is below the smallest candidate
    assert explorer.error is not None and "below the smallest configuration" in explorer.error
    assert "\n" not in explorer.error
    assert len(explorer.all_points.get_offsets()) < len(before)  # the last valid plot stays


def test_the_named_stars_are_the_registered_hybrids_at_their_defaults() -> None:
    """Each star is a named method's closed-form count and full memory estimate; exactly those inside both budgets
    are shown (S4 among them, refused where its BitFit groups find no bias)."""
    from survey_utils.experiments.ch05_hybrid import NAMED
    from survey_utils.methods import get_method

    explorer = DesignSearchExplorer(["roberta-base"], model="roberta-base")
    explorer.controls["trainable"].value = 10.0
    explorer.controls["memory"].value = 2.0
    view, config = explorer.view, load_config("roberta-base")
    expected = []
    for name in NAMED:
        method = get_method(name)
        point = (method.count(config), estimate(config, method, batch_size=8, seq_len=128).total / GIB)
        if point[0] <= view.trainable_budget and point[1] * GIB <= view.memory_budget:
            expected.append(point)
    assert "s4" in NAMED and len(expected) >= 3
    assert np.allclose(np.asarray(explorer.named_points.get_offsets()), expected, rtol=1e-12)


@pytest.mark.parametrize(("trainable", "memory"), [(1.0, 1.3), (10.0, 2.0), (10 ** -1.5, 1.05)])
def test_the_legend_covers_no_point_and_lies_outside_the_axes(trainable: float, memory: float) -> None:
    """The legend sat inside the axes (lower right) over the feasible candidates: read back in display coordinates,
    its box must miss the box of every plotted point (candidates, front, stars, the chosen ring), the axes and the x
    axis' labels, and lie inside the figure."""
    explorer = DesignSearchExplorer(["roberta-base"], model="roberta-base")
    try:
        explorer.controls["trainable"].value = trainable
        explorer.controls["memory"].value = memory
        assert explorer.error is None
        explorer.fig.canvas.draw()
        renderer = explorer.fig.canvas.get_renderer()
        legend = explorer.legend.get_window_extent(renderer)
        collections = (explorer.all_points, explorer.front_points, explorer.named_points, explorer.chosen_point)
        points = np.vstack([np.asarray(c.get_offsets(), dtype=float).reshape(-1, 2) for c in collections])
        shown = explorer.ax.transData.transform(points[np.isfinite(points).all(axis=1)])
        assert len(shown) >= len(explorer.view.result.feasible)
        data = Bbox.from_extents(*shown.min(axis=0), *shown.max(axis=0))
        assert not legend.overlaps(data), f"the legend {legend.extents} covers points in {data.extents}"
        assert not legend.overlaps(explorer.ax.get_window_extent(renderer)), "the legend is inside the axes"
        for text in (explorer.ax.xaxis.label, *explorer.ax.get_xticklabels()):
            if text.get_text():
                assert not legend.overlaps(text.get_window_extent(renderer)), f"the legend covers '{text.get_text()}'"
        figure = explorer.fig.bbox
        for text in (explorer.legend, explorer.ax_parts.xaxis.label, explorer.ax_parts.title, explorer.ax.title):
            box = text.get_window_extent(renderer)  # the parts panel's label ran past the right edge too
            assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, \
                f"{text} spans {box.extents}, outside the figure's {figure.extents}"
        labels = [t.get_text() for t in explorer.legend.get_texts()]
        assert labels == [c.get_label() for c in collections], "every kind of point is in the legend"
    finally:
        plt.close(explorer.fig)
