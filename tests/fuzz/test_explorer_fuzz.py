"""Fuzz the explorers of chapters 01, 03, 05, 06, 07, 08 and 09 with their plot-truth checks (issue 19).

tests/fuzz/test_widget_fuzz.py and test_prompt_widget_fuzz.py cover the method, memory and prompt-length
explorers; this file covers every other explorer. One explorer per test lives through all examples, as a
reader's does. Each example moves one to three of its controls to random values (sliders and boxes in range,
at the ends and far outside, which ipywidgets clamps; dropdowns and selection sliders over their options; a
multiple selection over its subsets, the empty one included; the feasibility map's memory box with valid and
invalid texts), or calls ``compute(...)`` with a value no control offers. After each
step:

- nothing escapes but a one-line ``SurveyError``, shown in the message area, and an invalid setting keeps the
  last valid view;
- every plotted artist equals its independent computation and the limits contain it (``tests/widgets/
  plot_truth.py``), and where the explorer reuses its frame, a reused frame equals a full render.

These explorers compute more per state (searches, meta-device builds, 65B estimates) than the closed-form ones,
so they run a tenth of ``FUZZ_EXAMPLES`` each, at least 5 (5 by default; ``FUZZ_EXAMPLES=1000`` gives 100).

Found by this fuzz: the design-search explorer's ``compute`` let a NaN, an infinity or ``None`` budget escape as
ValueError / OverflowError / TypeError; it now refuses them in one line (tested below).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import ipywidgets as W
import matplotlib.pyplot as plt
import pytest
from hypothesis import given, settings

from survey_utils.errors import SurveyError
from survey_utils.methods import list_methods
from tests.fuzz._settings import EXAMPLES, FUZZ, Counter, run_counted
from tests.widgets import plot_truth as truth

pytestmark = pytest.mark.filterwarnings("ignore")

SLOW_EXAMPLES = max(5, EXAMPLES // 10)
WILD = st.one_of(st.integers(-10**9, 10**9), st.sampled_from([0, -1, 10**12, math.inf, -math.inf, math.nan, 0.5]),
                 st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(), st.text(max_size=6))
MEMORY_TEXTS = st.sampled_from(["48GB", "80 GiB", "24GiB", "1TB", "48", "", "abc", "-5GB", "0GB", "1e3GB", "16 gb"])


def control_value(data: st.DataObject, control: W.Widget) -> Any:
    """A value a reader could give ``control`` (sliders past their bounds are clamped by ipywidgets)."""
    if isinstance(control, W.FloatLogSlider):
        low, high = control.base ** control.min, control.base ** control.max
        return data.draw(st.one_of(st.floats(low, high), st.sampled_from([low, high]), st.floats(-1e6, 1e6)),
                         label="log float")
    if isinstance(control, W.IntRangeSlider):
        return tuple(sorted(data.draw(st.lists(st.integers(control.min - 5, control.max + 5), min_size=2,
                                               max_size=2), label="range")))
    if isinstance(control, (W.IntSlider, W.BoundedIntText)):
        return data.draw(st.one_of(st.integers(control.min, control.max), st.sampled_from([control.min, control.max]),
                                   st.integers(-10**6, 10**6)), label="int")
    if isinstance(control, W.FloatSlider):
        return data.draw(st.one_of(st.floats(control.min, control.max), st.floats(-1e6, 1e6)), label="float")
    if isinstance(control, W.Checkbox):
        return data.draw(st.booleans(), label="bool")
    if isinstance(control, W.SelectMultiple):  # any subset, in any order, the empty one included
        return tuple(data.draw(st.lists(st.sampled_from(control.options), unique=True, max_size=len(control.options)),
                               label="selection"))
    if isinstance(control, W.SelectionSlider):
        return data.draw(st.sampled_from(control.options), label="stop")
    if isinstance(control, W.Dropdown):
        values = [o[1] if isinstance(o, tuple) else o for o in control.options]
        return data.draw(st.sampled_from(values), label="choice")
    if isinstance(control, W.Text):
        return data.draw(MEMORY_TEXTS, label="text")
    raise AssertionError(f"the fuzz does not know how to set a {type(control).__name__}")


def _controls(explorer: Any) -> dict[str, W.Widget]:
    """Every settable control, the method explorer's hyper-parameter controls (target boxes: each box) included."""
    controls = dict(explorer.controls)
    for name, control in getattr(explorer, "hp_controls", {}).items():
        if hasattr(control, "boxes"):
            controls.update({f"{name}:{box.description}": box for box in control.boxes})
        else:
            controls[name] = control
    return controls


def fuzz_explorer(name: str, make: Callable[[], Any], check: Callable[[Any], None],
                  examples: int = SLOW_EXAMPLES, wild: bool = True) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(data=st.data())
    def fuzz(counter: Counter, data: st.DataObject) -> None:
        counter()
        explorer = make()  # a new one per example: hypothesis replays an example to shrink it
        try:
            check(explorer)
            steps(counter, data, explorer, check, wild)
        finally:
            plt.close(explorer.fig)

    run_counted(name, fuzz, examples)


def steps(counter: Counter, data: st.DataObject, explorer: Any, check: Callable[[Any], None],
          wild: bool = True) -> None:
    frames = bool(explorer.dynamic_artists())
    for _ in range(data.draw(st.integers(1, 3), label="steps")):
        controls = _controls(explorer)
        key = data.draw(st.sampled_from([*sorted(controls), "compute"]), label="control")
        previous = explorer.view
        numeric = sorted(k for k, v in explorer.state.items() if isinstance(v, int | float) and not isinstance(v, bool))
        if key == "compute" and numeric and wild:  # a number no control offers, as a notebook cell may pass it
            state = dict(explorer.state)
            wild = data.draw(st.sampled_from(numeric), label="wild key")
            state[wild] = data.draw(WILD, label=wild)
            try:
                explorer.compute(**state)
            except SurveyError as error:
                assert str(error).strip() and "\n" not in str(error), f"not one line: {error!r}"
                counter.event("compute() refused")
            else:
                counter.event("compute() valid")
            continue
        if key == "compute":
            continue
        controls[key].value = control_value(data, controls[key])
        compare = data.draw(st.booleans(), label="compare frames")  # drawn whatever the branch (replay-stable)
        if explorer.error is not None:
            assert "\n" not in explorer.error and explorer.error.strip()
            assert explorer.error in html.unescape(explorer.message.value)
            assert explorer.view is previous, "an invalid setting replaced the last valid plot"
            counter.event("widget error shown")
            continue
        counter.event("widget valid")
        check(explorer)
        if frames and compare:
            counter.event("reused frame" if truth.check_frame(explorer) else "frame rendered")


def test_equal_budget_explorer_fuzz() -> None:
    from survey_utils.widgets.budget import EqualBudgetExplorer

    methods = [m.name for m in list_methods(family="adapters")] + ["lora"]
    fuzz_explorer("EqualBudgetExplorer", lambda: EqualBudgetExplorer(
        methods, model="roberta-base", reference="lora", sweep="bottleneck_size", method="compacter"),
        truth.check_budget)


@pytest.mark.xdist_group("comparison_rows")  # beside tests/figures' comparison tests: see SHARES_COMPARISON_ROWS there
def test_comparison_explorer_fuzz() -> None:
    from survey_utils.figures.explorer import ComparisonExplorer

    fuzz_explorer("ComparisonExplorer", lambda: ComparisonExplorer(model="roberta-base"), truth.check_comparison)


def test_density_explorer_fuzz() -> None:
    from survey_utils.widgets.density import DensityExplorer

    fuzz_explorer("DensityExplorer", lambda: DensityExplorer(model="roberta-base", top_k=3), truth.check_density)


def test_design_search_explorer_fuzz() -> None:
    from survey_utils.widgets.design_search import DesignSearchExplorer

    fuzz_explorer("DesignSearchExplorer", lambda: DesignSearchExplorer(["tiny-bert", "roberta-base"], model="tiny-bert"),
                  truth.check_design_search, wild=False)  # wild numbers: the xfail below


@pytest.mark.parametrize("key, value", [("trainable", math.nan), ("memory", math.inf), ("point", None)])
def test_design_search_compute_refuses_non_finite_budgets(key: str, value: Any) -> None:
    from survey_utils.widgets.design_search import DesignSearchExplorer

    explorer = DesignSearchExplorer(["tiny-bert"], model="tiny-bert")
    try:
        with pytest.raises(SurveyError):
            explorer.compute(**{**explorer.state, key: value})
    finally:
        plt.close(explorer.fig)


def test_feasibility_explorer_fuzz() -> None:
    from survey_utils.widgets.advisor import FeasibilityExplorer, FeasibilityTable

    table = FeasibilityTable(models=("gpt2", "llama-2-7b", "llama-65b"), methods=["full", "lora", "qlora", "bitfit"],
                             seq_len=512, precompute_gpus=(8,))
    fuzz_explorer("FeasibilityExplorer", lambda: FeasibilityExplorer(table, gpu="a100-80gb", gpus=1),
                  truth.check_feasibility)


def test_quantization_explorer_fuzz() -> None:
    from survey_utils.widgets.quantization import QuantizationExplorer

    fuzz_explorer("QuantizationExplorer", lambda: QuantizationExplorer(weight_shape="tiny-llama MLP down (128 x 344)"),
                  truth.check_quantization)


def test_qlora_memory_explorer_fuzz() -> None:
    from survey_utils.widgets.quantization import QLoRAMemoryExplorer

    fuzz_explorer("QLoRAMemoryExplorer", lambda: QLoRAMemoryExplorer(["llama-65b", "llama-2-7b", "tiny-llama"]),
                  truth.check_qlora_memory)


def test_lab_explorer_fuzz() -> None:
    """Chapter 09: a state costs a few ms (the committed runs, read once), but a new explorer and its full
    renders about 2 s an example (99 s at 50), so it runs the slow explorers' count like the others here."""
    from survey_utils.experiments import ch09_lab
    from survey_utils.widgets.lab import LabExplorer

    results = ch09_lab.load()
    fuzz_explorer("LabExplorer", lambda: LabExplorer(results), truth.check_lab)


@pytest.mark.parametrize("key, value, named", [("size", "lab-xl", "lab-xl"), ("task", "sentiments", "sentiments"),
                                               ("methods", (), "no method selected")])
def test_lab_explorer_compute_refuses_in_one_line(key: str, value: Any, named: str) -> None:
    """The lab explorer's state has no number for the fuzz's wild values: its text values are tried here."""
    from survey_utils.experiments import ch09_lab
    from survey_utils.widgets.lab import LabExplorer

    explorer = LabExplorer(ch09_lab.load())
    try:
        with pytest.raises(SurveyError, match=named) as refused:
            explorer.compute(**{**explorer.state, key: value})
        assert "\n" not in str(refused.value)
    finally:
        plt.close(explorer.fig)


def test_task_scaling_explorer_fuzz() -> None:
    from survey_utils.widgets.task_scaling import TaskScalingExplorer
    from tests.widgets.test_task_scaling import check_task_scaling

    fuzz_explorer("TaskScalingExplorer", lambda: TaskScalingExplorer(model="tiny-llama"), check_task_scaling)
