"""The memory explorer: controls drive the view; bad settings show one line and keep the last plot."""

from __future__ import annotations

from survey_utils.widgets.memory import MemoryExplorer


def test_controls_change_the_view_and_errors_show_in_the_message_area() -> None:
    explorer = MemoryExplorer(models=["tiny-llama", "llama-2-7b"], methods=["full", "lora"])
    first = explorer.view.estimate.total
    explorer.controls["batch_size"].value = 8
    assert explorer.view.estimate.total > first
    assert sum(explorer.view.terms.values()) == explorer.view.estimate.total
    assert explorer.view.crossover is not None  # activations overtake somewhere up to 4096 tokens
    explorer.controls["model"].value = "tiny-llama"
    explorer.controls["seq_len"].value = 4096  # beyond tiny-llama's 512 positions
    assert explorer.error is not None and "4096" in explorer.message.value
    explorer.controls["seq_len"].value = 64
    assert explorer.error is None
    explorer.controls["simulate"].value = True
    explorer.wait()  # the simulation runs in a background thread; it redraws when done
    simulated = explorer.view.simulated["_peak"]
    assert abs(explorer.view.estimate.total - simulated) / simulated < 0.05
    heights = [bars.patches[1].get_height() for bars in explorer.bars.values()]
    assert sum(heights) > 0  # the simulation bar is drawn
