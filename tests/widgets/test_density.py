"""The density explorer: the bars show the closed forms' numbers; bad settings show one line and keep the plot."""

from __future__ import annotations

import inspect

import matplotlib.pyplot as plt
import pytest

from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.memory import estimate
from survey_utils.widgets.density import MEMORY_SETTING, DensityExplorer


@pytest.fixture(scope="module")
def explorer() -> DensityExplorer:
    return DensityExplorer(model="roberta-base", top_k=3)


def test_bars_show_the_closed_form_and_the_estimate(explorer: DensityExplorer) -> None:
    explorer.controls["model"].value = "roberta-base"
    explorer.controls["method"].value = "partial"
    explorer.controls["top_k"].value = 3
    view = explorer.view
    trained = closed_form("roberta-base", "partial", top_k=3).trainable
    assert view.trained["method"] == view.changed["method"] == trained
    widths = [bar.get_width() for bar in explorer.param_bars["method"]]
    assert widths == [pytest.approx(100 * trained / view.total)] * 2
    peak = estimate("roberta-base", "partial", {"top_k": 3, "components": "block"}, **MEMORY_SETTING).total
    assert explorer.byte_bars["method"][1].get_width() == peak
    lora = closed_form("roberta-base", "lora", r=view.reference_rank).trainable
    assert explorer.param_bars["LoRA"][0].get_width() == pytest.approx(100 * lora / view.total)


def test_k_slider_redraws(explorer: DensityExplorer) -> None:
    explorer.controls["method"].value = "partial"
    explorer.controls["top_k"].value = 3
    before = [bar.get_width() for bar in explorer.param_bars["method"]]
    explorer.controls["top_k"].value = 6
    after = [bar.get_width() for bar in explorer.param_bars["method"]]
    assert after[0] == pytest.approx(2 * before[0])


def test_lora_changes_whole_matrices(explorer: DensityExplorer) -> None:
    explorer.controls["method"].value = "ln_tuning"
    view = explorer.view
    assert view.changed["LoRA"] > 100 * view.trained["LoRA"]  # merged, LoRA rewrites every q and v matrix
    assert view.changed["method"] == view.trained["method"]


@pytest.mark.parametrize(("model", "method", "setting", "fragment"), [
    ("llama-2-7b", "bitfit", {}, "has no bias parameter"),
    ("llama-2-7b", "partial", {"top_k": 40}, "top_k=40 is more than the 32 blocks"),
    ("llama-2-7b", "partial", {"components": "cross_attention"}, "has no cross-attention"),
])
def test_bad_settings_show_one_line_and_keep_the_plot(explorer: DensityExplorer, model: str, method: str,
                                                      setting: dict, fragment: str) -> None:
    explorer.controls["top_k"].value = 3
    explorer.controls["components"].value = "block"
    explorer.controls["method"].value = "partial"
    explorer.controls["model"].value = model
    kept = explorer.view
    explorer.controls["method"].value = method
    for name, value in setting.items():
        explorer.controls[name].value = value
    assert explorer.error is not None and fragment in explorer.error and "\n" not in explorer.error
    assert fragment.split("=")[0] in explorer.message.value
    assert explorer.view is kept


def test_diff_pruning_is_small_to_store_and_large_in_memory(explorer: DensityExplorer) -> None:
    """The chapter's point: diff pruning trains a dense delta and gate (2x the weights) but changes, and stores, the
    pruned delta only; a FISH mask at the same density changes as much but holds no delta."""
    explorer.controls["model"].value = "roberta-base"
    explorer.controls["density"].value = 0.005
    explorer.controls["method"].value = "diff_pruning"
    diff = explorer.view
    explorer.controls["method"].value = "fish_mask"
    fish = explorer.view
    assert explorer.error is None
    assert diff.changed["method"] == fish.changed["method"] == fish.trained["method"]
    assert diff.trained["method"] > 200 * diff.changed["method"]
    assert diff.stored["method"] == fish.stored["method"] and diff.stored["method"][0] == "COO"
    assert diff.peak["method"] > fish.peak["method"] > fish.peak["LoRA"]
    before = fish.trained["method"]
    explorer.controls["density"].value = 0.05
    assert explorer.view.trained["method"] == pytest.approx(10 * before, rel=0.01)


def _inside_figure(explorer: DensityExplorer, text) -> None:
    """The text, as rendered, lies inside the figure (a title cut at the figure's edge fails)."""
    box, figure = text.get_window_extent(explorer.fig.canvas.get_renderer()), explorer.fig.bbox
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and figure.y0 <= box.y0 and box.y1 <= figure.y1, \
        f"'{text.get_text()}' spans {box.extents} outside the figure's {figure.extents}"


def test_both_titles_lie_inside_the_figure_and_apart(explorer: DensityExplorer) -> None:
    """The bytes panel's title ran 0.4 inch past the figure's right edge (one line, half the figure wide); it now
    says its setting (MEMORY_SETTING) on two lines. The left title is checked too, at the longest model and
    selective method names the explorer offers that it accepts."""
    names = sorted(explorer.controls["model"].options, key=len, reverse=True)
    methods = sorted(explorer.controls["method"].options, key=len, reverse=True)
    explorer.controls["method"].value = methods[0]
    for model in names[:5]:  # the longest name the method accepts
        explorer.controls["model"].value = model
        if explorer.error is None:
            break
    assert explorer.error is None and explorer.view.model == model
    explorer.fig.canvas.draw()
    titles = [explorer.ax_params.title, explorer.ax_bytes.title]
    for title in titles:
        _inside_figure(explorer, title)
    left, right = (t.get_window_extent(explorer.fig.canvas.get_renderer()) for t in titles)
    assert not left.overlaps(right), "the two titles run into each other"
    setting = MEMORY_SETTING
    assert f"batch {setting['batch_size']} x {setting['seq_len']}" in titles[1].get_text()
    assert all(str(v) in titles[1].get_text() for v in setting.values())
    explorer.controls["model"].value = "roberta-base"


def test_the_reference_is_a_parameter_and_its_bars_are_its_own() -> None:
    """Another mergeable method with a rank takes LoRA's place: its rank is the one closest to the method's budget,
    its bars are its closed form, its merged change measured on the model built on meta, and its memory estimate."""
    from survey_utils.counting import changed_params
    from survey_utils.methods import get_method

    explorer = DensityExplorer(model="roberta-base", top_k=3, reference="dora")
    try:
        view, label = explorer.view, get_method("dora").title
        assert set(explorer.param_bars) == set(explorer.byte_bars) == {"method", label}
        per_rank = closed_form("roberta-base", "dora", r=1).trainable
        assert view.reference_rank == max(1, round(view.trained["method"] / per_rank))
        rank = view.reference_rank
        trained = closed_form("roberta-base", "dora", r=rank).trainable
        changed = changed_params("roberta-base", "dora", (("r", rank),))[0]
        widths = [bar.get_width() for bar in explorer.param_bars[label]]
        assert widths == [pytest.approx(100 * trained / view.total), pytest.approx(100 * changed / view.total)]
        peak = estimate("roberta-base", "dora", {"r": rank}, **MEMORY_SETTING).total
        assert explorer.byte_bars[label][1].get_width() == peak
        assert f"vs {label} r={rank}" in explorer.ax_params.get_title()
        explorer.fig.canvas.draw()  # categorical tick labels are written at draw time
        assert [t.get_text() for t in explorer.ax_params.get_yticklabels()][2:] == [f"{label}: trained",
                                                                                  f"{label}: changed"]
    finally:
        plt.close(explorer.fig)


@pytest.mark.parametrize("reference", ["bitfit", "prompt_tuning"])
def test_a_reference_without_a_rank_or_a_merge_is_one_line(reference: str) -> None:
    with pytest.raises(SurveyError, match=f"^reference '{reference}' must be a mergeable method with an integer "
                                          "rank r") as raised:
        DensityExplorer(model="roberta-base", reference=reference)
    assert "\n" not in str(raised.value)


def test_the_module_tests_no_method_by_its_name() -> None:
    """The project's rule: no module tests a method by its name. The only method names written in the density
    module are the defaults of its parameters (the reference, LoRA, and the method shown first)."""
    import survey_utils.widgets.density as density
    from survey_utils.methods import list_methods

    source = inspect.getsource(density)
    defaults = {density.DEFAULT_REFERENCE, inspect.signature(DensityExplorer).parameters["method"].default}
    quoted = {m.name: source.count(f'"{m.name}"') + source.count(f"'{m.name}'") for m in list_methods()}
    assert {name for name, n in quoted.items() if n} == defaults
    assert all(quoted[name] == 1 for name in defaults), quoted


def test_a_matched_rank_above_the_layers_width_is_named_in_the_title() -> None:
    from survey_utils.architecture import layout
    from survey_utils.zoo import load_config

    explorer = DensityExplorer(model="bert-base-uncased", method="diff_pruning")
    width = min(min(m.in_features, m.out_features) for m in layout(load_config("bert-base-uncased")).modules
                if m.name.rsplit(".", 1)[-1] in ("query", "value"))
    assert explorer.view.reference_rank > width
    title = explorer.ax_params.get_title()
    assert f"r = {explorer.view.reference_rank} is above the layers' width {width}" in title
    renderer = explorer.fig.canvas.get_renderer()
    box = explorer.ax_params.title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= explorer.fig.bbox.x1, f"the two-line title is cut off: {box}"
    explorer.controls["method"].value = "bitfit"  # a small budget: one line again
    assert "above the layers' width" not in explorer.ax_params.get_title()
