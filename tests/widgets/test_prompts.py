"""The prompt-length explorer: the sliders move every panel; a prompt beyond the context is one line."""

from __future__ import annotations

import numpy as np

from survey_utils.widgets.prompts import PromptLengthExplorer


def _marker_y(explorer: PromptLengthExplorer, method: str) -> list[float]:
    return [float(np.asarray(m.get_ydata())[0]) for m in explorer.markers[method]]


def test_prompt_length_moves_every_panel_and_prefix_queries_stay_at_l() -> None:
    explorer = PromptLengthExplorer(model="llama-2-7b")
    before = {m: _marker_y(explorer, m) for m in explorer.methods}
    explorer.controls["num_virtual_tokens"].value = 100
    for method in explorer.methods:
        after = _marker_y(explorer, method)
        assert after[2] > before[method][2], method  # the KV cache grows with n for every method
    assert _marker_y(explorer, "prompt_tuning")[0] == 100 * 4096  # n x hidden size
    assert explorer.axes[2].get_title() == "prefixes: 512 queries over 612 keys"


def test_without_the_mlp_prefix_tuning_trains_only_the_prefixes() -> None:
    explorer = PromptLengthExplorer(model="llama-2-7b")
    with_mlp = _marker_y(explorer, "prefix_tuning")[0]
    explorer.controls["prefix_projection"].value = False
    without = _marker_y(explorer, "prefix_tuning")[0]
    assert without == 20 * 2 * 32 * 4096 < with_mlp  # n x (key + value) x layers x kv width


def test_a_prompt_beyond_the_context_is_one_line_and_keeps_the_plot() -> None:
    explorer = PromptLengthExplorer(model="gpt2")
    kept = explorer.view
    explorer.controls["seq_len"].value = 1024
    assert explorer.error is not None and "\n" not in explorer.error and "1024" in explorer.error
    assert explorer.view is kept
