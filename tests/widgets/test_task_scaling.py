"""The task-scaling explorer: every plotted value read back equals the closed forms and the memory model."""

from __future__ import annotations

import numpy as np
import pytest

from survey_utils.memory.closed_form import estimate
from survey_utils.methods import get_method
from survey_utils.widgets.task_scaling import MEMORY, TaskScalingExplorer, settings_for
from survey_utils.zoo import load_config
from tests.widgets.plot_truth import assert_limits_contain

pytestmark = pytest.mark.filterwarnings("ignore")


def check_task_scaling(explorer: TaskScalingExplorer) -> None:
    if explorer.error is not None:
        return
    state = explorer.state
    config = load_config(state["model"])
    method, lora = get_method(state["method"]), get_method("lora")
    hp = method.resolve(config, **settings_for(method, state["tasks"], state["skills"], state["rank"]))
    xs = np.asarray(explorer.lines["method total"].get_xdata())
    expected = [method.count(config, **{**hp, method.tasks_hp: int(t)}) for t in xs]
    per_lora = lora.count(config, r=state["rank"])
    assert np.array_equal(explorer.lines["method total"].get_ydata(), expected)
    assert np.array_equal(explorer.lines["lora total"].get_ydata(), [t * per_lora for t in xs])
    assert np.allclose(explorer.lines["method bytes"].get_ydata(), [2 * c / t for c, t in zip(expected, xs, strict=True)])
    assert np.allclose(explorer.lines["lora bytes"].get_ydata(), [2 * per_lora] * len(xs))
    assert list(explorer.markers["method total"].get_xdata()) == [state["tasks"]]
    assert list(explorer.markers["method total"].get_ydata()) == [method.count(config, **hp)]
    peaks = [bar.get_height() for bar in explorer.peak_bars]
    assert np.allclose(peaks, [estimate(config, method, hp, **MEMORY).total / 2**30,
                               estimate(config, lora, lora.resolve(config, r=state["rank"]), **MEMORY).total / 2**30])
    for ax, keys in ((explorer.ax_total, ("method total", "lora total")),
                     (explorer.ax_bytes, ("method bytes", "lora bytes"))):
        for key in keys:
            assert_limits_contain(ax, explorer.lines[key].get_xdata(), explorer.lines[key].get_ydata(), key)
    assert_limits_contain(explorer.ax_peak, ys=peaks, what="peak bars")
    has_skills = "n_skills" in {h.name for h in method.hyperparams}
    assert explorer.controls["skills"].disabled is (not has_skills)


def test_every_method_and_slider_moves_what_the_labels_say() -> None:
    explorer = TaskScalingExplorer(model="llama-2-7b")
    for method in explorer.methods:
        explorer.controls["method"].value = method
        check_task_scaling(explorer)
        explorer.controls["tasks"].value = 20
        explorer.controls["rank"].value = 4
        check_task_scaling(explorer)
        explorer.controls["tasks"].value = 8
        explorer.controls["rank"].value = 8
    explorer.controls["method"].value = "poly"
    explorer.controls["skills"].value = 16
    check_task_scaling(explorer)


def test_shared_modules_amortise_and_loras_do_not() -> None:
    explorer = TaskScalingExplorer(model="llama-2-7b", method="mpt")
    per_task = explorer.lines["method bytes"].get_ydata()
    assert all(a > b for a, b in zip(per_task, per_task[1:], strict=False))
    assert len(set(explorer.lines["lora bytes"].get_ydata())) == 1


@pytest.mark.parametrize(("state", "fragment"), [
    ({"skills": 65}, "skills=65 is above the explorer's bound 64"),
    ({"tasks": 0}, "tasks=0 must be a positive integer"),
    ({"model": "gpt2", "method": "poly"}, "poly adapts linear modules"),
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
