"""The density explorer: the bars show the closed forms' numbers; bad settings show one line and keep the plot."""

from __future__ import annotations

import pytest

from survey_utils.counting import closed_form
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
    lora = closed_form("roberta-base", "lora", r=view.lora_rank).trainable
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
