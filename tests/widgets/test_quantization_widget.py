"""Chapter 06's explorers: the plotted histograms, bars and stacks read back against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from survey_utils import quantization as Q
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch06_quantized import claim_configs, read_claims
from survey_utils.memory import estimate
from survey_utils.widgets.quantization import (
    BLOCKSIZES,
    BNB_BLOCKSIZES,
    SHAPES,
    QLoRAMemoryExplorer,
    QuantizationExplorer,
    _weight,
)
from tests.widgets.plot_truth import check_quantization

SHAPE = "tiny-llama MLP down (128 x 344)"


def test_quantization_explorer_plots_the_histograms_error_and_bytes_it_labels() -> None:
    explorer = QuantizationExplorer(weight_shape=SHAPE, bits=4, blocksize=64, double_quant=True)
    weight = _weight(SHAPES[SHAPE])
    rebuilt = Q.dequantize_nf4(Q.quantize_nf4(weight, 64, True))
    values, edges = explorer.hist_original.get_data()[0], explorer.hist_original.get_data()[1]
    assert np.array_equal(values, np.histogram(weight.reshape(-1).numpy(), edges)[0])
    assert np.array_equal(explorer.hist_rebuilt.get_data()[0], np.histogram(rebuilt.reshape(-1).numpy(), edges)[0])
    error, size = (bar.get_height() for bar in explorer.bars)
    assert np.isclose(error, 100 * Q.reconstruction_error(weight, rebuilt)["relative"])
    assert np.isclose(size, 10 * (0.5 + 1 / 64 + 4 / (64 * 256)))
    assert explorer.ax_bars.get_ylim()[1] >= max(error, size)


def test_settings_redraw_and_a_bad_block_size_is_one_line() -> None:
    explorer = QuantizationExplorer(weight_shape=SHAPE)
    first = explorer.bars[0].get_height()
    explorer.controls["bits"].value = 8
    assert explorer.error is None and explorer.bars[0].get_height() < first / 5
    state = {**explorer.state, "blocksize": 48}  # 128 x 344 = 44032 is not a multiple of 48: no control offers it
    with pytest.raises(SurveyError, match="^blocksize=48 does not divide the tensor's 44032 elements$"):
        explorer.compute(**state)
    with pytest.raises(SurveyError, match="blocksize=80 is not one of the explorer's block sizes"):
        QuantizationExplorer(weight_shape=SHAPE, blocksize=80)


def test_every_offered_block_size_is_accepted_and_plotted() -> None:
    """The control offers no size the explorer then refuses (a slider of step 16 reached 80, which does not divide
    128 x 344): every offered size divides every weight, and each one, picked on the weight with the fewest
    elements, draws its own title, histograms and bars (read back by plot_truth.check_quantization)."""
    offered = list(QuantizationExplorer(weight_shape=SHAPE).controls["blocksize"].options)
    assert offered == list(BLOCKSIZES) and Q.NF4_BLOCKSIZE in offered and len(offered) > 1
    for rows, cols in SHAPES.values():
        assert all(rows * cols % size == 0 for size in offered), (rows, cols)
    explorer = QuantizationExplorer(weight_shape=SHAPE)
    for bits in Q.BITS:
        explorer.controls["bits"].value = bits
        for size in offered:
            explorer.controls["blocksize"].value = size
            assert explorer.error is None and explorer.message.value == ""
            assert f"block {size}" in explorer.ax_hist.get_title()
            check_quantization(explorer)


def test_the_offered_block_sizes_are_the_ones_bitsandbytes_accepts() -> None:
    """BNB_BLOCKSIZES is bitsandbytes' own rule: it quantizes a tensor in blocks of each, and refuses the powers of
    two on either side."""
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(2 * max(BNB_BLOCKSIZES))
    accepted = []
    for size in [min(BNB_BLOCKSIZES) // 2, *BNB_BLOCKSIZES, 2 * max(BNB_BLOCKSIZES)]:
        try:
            functional.quantize_4bit(weight, blocksize=size, quant_type="nf4")
        except (RuntimeError, ValueError, AssertionError):
            continue
        accepted.append(size)
    assert accepted == list(BNB_BLOCKSIZES)
    assert set(BLOCKSIZES) <= set(accepted)


def test_qlora_memory_explorer_stacks_the_memory_models_terms() -> None:
    explorer = QLoRAMemoryExplorer(["llama-65b", "tiny-llama"], model="llama-65b", r=64)
    claims = read_claims()
    config = claim_configs(claims)["llama-65b"]
    hp = {"r": 64, "lora_alpha": claims["qlora_lora_alpha"].value, "bnb_4bit_use_double_quant": True}
    for i, storage in enumerate(("bf16", "int8", "nf4")):
        expected = estimate(config, "qlora", hp=hp, quantization=None if storage == "bf16" else storage,
                            gradient_checkpointing=True, batch_size=1, seq_len=512).total / 1e9
        right = max(bars[i].get_x() + bars[i].get_width() for bars in explorer.stacks.values())
        assert np.isclose(right, expected)
    assert explorer.claim_line.get_xdata()[0] == 48
    nf4_right = max(bars[2].get_x() + bars[2].get_width() for bars in explorer.stacks.values())
    assert nf4_right < 48 < explorer.ax.get_xlim()[1]
    explorer.controls["model"].value = "tiny-llama"
    assert explorer.error is None
