"""The design-search explorer (chapter 05): the plotted points are the search's, checked against the memory model."""

from __future__ import annotations

import numpy as np

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
