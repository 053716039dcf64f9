"""The task-scaling explorer: every plotted value read back equals the closed forms and the memory model."""

from __future__ import annotations

import numpy as np
import pytest

from survey_utils.memory.closed_form import estimate
from survey_utils.methods import get_method
from survey_utils.widgets.task_scaling import (
    MEMORY,
    TaskScalingExplorer,
    has_skills,
    reference_settings,
    settings_for,
)
from survey_utils.zoo import load_config
from tests.widgets.plot_truth import assert_limits_contain

pytestmark = pytest.mark.filterwarnings("ignore")


def check_task_scaling(explorer: TaskScalingExplorer) -> None:
    if explorer.error is not None:
        return
    state = explorer.state
    config = load_config(state["model"])
    method, reference = get_method(state["method"]), explorer.reference
    hp = method.resolve(config, **settings_for(method, state["tasks"], state["skills"], state["rank"]))
    xs = np.asarray(explorer.lines["method total"].get_xdata())
    # added = trainable + frozen added (AdapterFusion's task adapters, LoRAHub's modules), each closed form
    expected = [method.count(config, **{**hp, method.tasks_hp: int(t)})
                + (method.frozen_added_params(config, **{**hp, method.tasks_hp: int(t)})
                   if method.frozen_added_params else 0) for t in xs]
    reference_hp = reference.resolve(config, **reference_settings(reference, state["rank"]))
    per_reference = reference.count(config, **reference_hp)
    assert np.array_equal(explorer.lines["method total"].get_ydata(), expected)
    assert np.array_equal(explorer.lines["reference total"].get_ydata(), [t * per_reference for t in xs])
    assert np.allclose(explorer.lines["method bytes"].get_ydata(), [2 * c / t for c, t in zip(expected, xs, strict=True)])
    assert np.allclose(explorer.lines["reference bytes"].get_ydata(), [2 * per_reference] * len(xs))
    assert list(explorer.markers["method total"].get_xdata()) == [state["tasks"]]
    assert list(explorer.markers["method total"].get_ydata()) == [expected[list(xs).index(state["tasks"])]]
    peaks = [bar.get_height() for bar in explorer.peak_bars]
    assert np.allclose(peaks, [estimate(config, method, hp, **MEMORY).total / 2**30,
                               estimate(config, reference, reference_hp, **MEMORY).total / 2**30])
    for ax, keys in ((explorer.ax_total, ("method total", "reference total")),
                     (explorer.ax_bytes, ("method bytes", "reference bytes"))):
        for key in keys:
            assert_limits_contain(ax, explorer.lines[key].get_xdata(), explorer.lines[key].get_ydata(), key)
    assert_limits_contain(explorer.ax_peak, ys=peaks, what="peak bars")
    assert explorer.controls["skills"].disabled is (not has_skills(method))


def test_every_method_and_slider_moves_what_the_labels_say() -> None:
    explorer = TaskScalingExplorer(model="llama-2-7b")
    assert {"mpt", "poly", "adapter_fusion", "moelora", "lorahub"} <= set(explorer.methods)
    for method in explorer.methods:
        explorer.controls["method"].value = method
        check_task_scaling(explorer)
        assert explorer.error is None, (method, explorer.error)
        explorer.controls["tasks"].value = 20
        explorer.controls["rank"].value = 4
        check_task_scaling(explorer)
        assert explorer.error is None, (method, explorer.error)
        explorer.controls["tasks"].value = 8
        explorer.controls["rank"].value = 8
    explorer.controls["method"].value = "poly"
    explorer.controls["skills"].value = 16
    check_task_scaling(explorer)


def test_shared_modules_amortise_and_loras_do_not() -> None:
    explorer = TaskScalingExplorer(model="llama-2-7b", method="mpt")
    per_task = explorer.lines["method bytes"].get_ydata()
    assert all(a > b for a, b in zip(per_task, per_task[1:], strict=False))
    assert len(set(explorer.lines["reference bytes"].get_ydata())) == 1


def test_the_reference_is_a_parameter_not_a_name_in_the_widget() -> None:
    """Another single-task reference (IA3 has no rank: its defaults) redraws the dashed lines from its own count;
    a multi-task reference is one line."""
    explorer = TaskScalingExplorer(model="llama-2-7b", method="moelora", reference="ia3")
    check_task_scaling(explorer)
    per_ia3 = get_method("ia3").count(load_config("llama-2-7b"))
    assert explorer.lines["reference total"].get_ydata()[0] == per_ia3
    assert "ia3" in explorer.lines["reference total"].get_label()
    with pytest.raises(Exception, match="reference='poly' is a multi-task method"):
        TaskScalingExplorer(reference="poly")


def test_adapter_fusion_pays_per_task_in_frozen_adapters() -> None:
    """AdapterFusion's trainable fusion does not grow with N; its stored parameters do, by one adapter each."""
    explorer = TaskScalingExplorer(model="roberta-base", method="adapter_fusion")
    totals = explorer.lines["method total"].get_ydata()
    xs = explorer.lines["method total"].get_xdata()
    fusion = get_method("adapter_fusion")
    config = load_config("roberta-base")
    one_adapter = get_method("pfeiffer").count(config)
    assert totals[1] - totals[0] == (xs[1] - xs[0]) * one_adapter
    assert fusion.count(config, num_sources=2) == fusion.count(config, num_sources=40)


@pytest.mark.parametrize(("state", "fragment"), [
    ({"skills": 65}, "skills=65 is above the explorer's bound 64"),
    ({"tasks": 0}, "tasks=0 must be a positive integer"),
    ({"model": "gpt2", "method": "poly"}, "poly adapts linear modules"),
    ({"method": "moelora", "skills": 3}, "r=8 does not split over num_experts=3"),
])
def test_bad_settings_are_one_line_and_keep_the_plot(state: dict, fragment: str) -> None:
    explorer = TaskScalingExplorer(model="llama-2-7b", method="poly")
    kept = explorer.view
    with pytest.raises(Exception, match=fragment):
        explorer.compute(**{**explorer.state, **state})
    if "model" in state:
        explorer.controls["model"].value = state["model"]
        assert explorer.error is not None and fragment in explorer.error and "\n" not in explorer.error
        assert explorer.view is kept
