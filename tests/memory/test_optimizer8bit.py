"""8-bit AdamW's state bytes: the estimate against bitsandbytes' real optimizer on CPU (chapter 06)."""

from __future__ import annotations

import pytest

from survey_utils.memory import estimate
from survey_utils.memory.closed_form import adamw8bit_state_bytes


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-llama", "qlora", {}),  # every LoRA factor under 4096 elements: fp32 moments throughout
    ("tiny-llama", "full", {}),  # norms fp32, matrices 8-bit, shared maps once
    ("tiny-llama", "lora", {"r": 64}),  # every factor 8-bit
    ("tiny-gpt2", "lora", {}),
])
def test_estimate_equals_the_real_bitsandbytes_optimizer(model: str, method: str, hp: dict) -> None:
    from survey_utils.experiments.ch06_quantized import adamw8bit_state_bytes as measured

    result = measured(model, method, **hp)
    assert result["memory model estimate"] == result["bitsandbytes state bytes"]
    assert result["per-tensor rule"] == result["bitsandbytes state bytes"]


def test_small_tensors_keep_fp32_moments_and_large_ones_share_the_maps() -> None:
    assert adamw8bit_state_bytes([4095]) == 8 * 4095
    assert adamw8bit_state_bytes([4096]) == 2 * 4096 + 8 * 16 + 2048
    assert adamw8bit_state_bytes([4096, 4097]) == 2 * 4096 + 8 * 16 + 2 * 4097 + 8 * 17 + 2048
    assert adamw8bit_state_bytes([]) == 0


def test_qlora_states_are_the_sum_over_its_tensors_not_one_tensor() -> None:
    # tiny-llama's 56 LoRA factors hold 73,984 elements, each factor under 4096: 8 B per element
    est = estimate("tiny-llama", "qlora", optimizer="adamw8bit", dtype="fp32")
    assert est.optimizer_states == 8 * est.trainable_params
    assert any("every tensor keeps fp32 moments" in line for line in est.assumptions)


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-llama", "qlora", {}), ("tiny-llama", "prompt_tuning", {}), ("tiny-gpt2", "bitfit", {}),
    ("llama-2-7b", "lora", {}), ("tiny-llama", "full", {}),
])
def test_the_no_build_shortcut_equals_the_sum_over_the_built_tensors(model: str, method: str, hp: dict) -> None:
    """Below min_8bit_size for the biggest tensor the estimate skips the meta build: same bytes as with it."""
    from survey_utils.memory.closed_form import trainable_tensor_sizes
    from survey_utils.methods import get_method
    from survey_utils.zoo import load_config

    m = get_method(method)
    config = load_config(model)
    sizes = trainable_tensor_sizes(config, m, m.resolve(config, **hp))
    est = estimate(model, method, hp=hp, optimizer="adamw8bit", dtype="fp32", seq_len=64)
    assert est.optimizer_states == adamw8bit_state_bytes(sizes)
