"""The trainable-parameter explorer: controls change the plotted data; bad settings show one line."""

from __future__ import annotations

import numpy as np

from survey_utils.widgets import MethodExplorer


def _line(explorer: MethodExplorer) -> tuple[np.ndarray, np.ndarray]:
    x, y = explorer.sweep_line.get_data()
    point = explorer.current_point.get_data()
    return np.asarray(point[0]), np.asarray(point[1])


def test_rank_slider_redraws_the_marker_and_title() -> None:
    explorer = MethodExplorer(["lora", "full"], model="llama-2-7b")
    assert explorer.view.trainable == 4_194_304
    before_point, title = _line(explorer), explorer.ax_sweep.get_title()
    explorer.hp_controls["r"].value = 64
    assert explorer.view.trainable == 8 * 4_194_304
    assert not np.array_equal(before_point[1], _line(explorer)[1])
    assert explorer.ax_sweep.get_title() != title


def test_target_checkboxes_and_layer_range_change_the_count() -> None:
    explorer = MethodExplorer(["lora"], model="llama-2-7b")
    boxes = {b.description: b for b in explorer.hp_controls["target_modules"].boxes}
    boxes["o_proj"].value = True
    assert explorer.view.trainable == 3 * 4_194_304 // 2
    explorer.hp_controls["layers_to_transform"].value = (0, 15)
    assert explorer.view.trainable == 3 * 4_194_304 // 4


def test_model_change_rebuilds_targets_for_that_architecture() -> None:
    explorer = MethodExplorer(["lora"], model="llama-2-7b")
    explorer.model_control.value = "gpt2"
    names = [b.description for b in explorer.hp_controls["target_modules"].boxes]
    assert names == ["c_attn", "c_proj", "c_fc"]
    assert explorer.error is None and explorer.view.model == "gpt2"


def test_no_target_ticked_shows_one_line_and_keeps_the_plot() -> None:
    explorer = MethodExplorer(["lora"], model="llama-2-7b")
    boxes = explorer.hp_controls["target_modules"].boxes
    boxes[0].value = False  # q_proj off: v_proj alone is still valid
    kept = explorer.view
    for box in boxes:
        box.value = False
    assert explorer.error is not None and "\n" not in explorer.error
    assert "target_modules is empty" in explorer.message.value
    assert explorer.view is kept
    explorer.hp_controls["target_modules"].boxes[0].value = True
    assert explorer.error is None and explorer.message.value == ""


def test_comparison_bars_cover_every_method() -> None:
    explorer = MethodExplorer(["lora", "full"], model="gpt2")
    widths = {name: bar.get_width() for name, bar in zip(["lora", "full"], explorer.bars, strict=True)}
    assert widths["full"] == 100.0 and 0 < widths["lora"] < 1


def test_switching_method_keeps_rank_and_resets_flags() -> None:
    explorer = MethodExplorer(["lora", "rslora", "dora"], model="tiny-llama")
    explorer.hp_controls["r"].value = 32
    explorer.hp_controls["use_rslora"].value = True
    explorer.method_control.value = "dora"
    assert explorer.hp_controls["r"].value == 32
    assert explorer.state["hp"].get("use_rslora", False) is False
    assert explorer.error is None


def test_ia3_targets_start_from_peft_defaults_for_the_architecture() -> None:
    explorer = MethodExplorer(["ia3"], model="llama-2-7b")
    assert explorer.state["hp"]["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    assert explorer.state["hp"]["feedforward_modules"] == ["down_proj"]
    assert explorer.error is None
