"""The equal-budget explorer: LoRA's rank follows the method's count; both memory bars redraw."""

from __future__ import annotations

from survey_utils.methods import get_method
from survey_utils.widgets.budget import EqualBudgetExplorer
from survey_utils.zoo import load_config


def test_lora_rank_tracks_the_adapter_budget_and_memory_redraws() -> None:
    explorer = EqualBudgetExplorer(["houlsby", "lora"], model="roberta-base", reference="lora")
    first = explorer.view
    per_rank = get_method("lora").count(load_config("roberta-base"), r=1)
    assert abs(first.reference_trainable - first.trainable) <= per_rank / 2
    widths = [p.get_width() for p in explorer.ax_memory.patches]
    explorer.hp_controls["reduction_factor"].value = 4
    assert explorer.view.trainable > first.trainable and explorer.view.reference_rank > first.reference_rank
    assert [p.get_width() for p in explorer.ax_memory.patches] != widths
    assert explorer.error is None
