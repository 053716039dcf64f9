"""LoRA from scratch: identity at init, parity with peft, merge and unmerge, frozen backbone."""

from __future__ import annotations

import pytest
import torch

from survey_utils.counting import apply_method
from survey_utils.parity import example_inputs, forward, parity
from survey_utils.zoo import build_model, load_config
from tests.conftest import TINY


@pytest.mark.parametrize("model", TINY)
def test_lora_is_the_identity_at_initialisation(model: str) -> None:
    config = load_config(model)
    inputs = example_inputs(config)
    base = forward(build_model(config, seed=0), inputs)
    adapted = forward(apply_method(build_model(config, seed=0), "lora", r=4), inputs)
    assert torch.equal(base, adapted)


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft_and_merges(model: str, use_rslora: bool) -> None:
    report = parity(model, "lora", r=4, lora_alpha=12.0, use_rslora=use_rslora)
    assert report.copied_tensors > 0
    assert report.max_diff_vs_peft <= 1e-10
    assert report.max_diff_merged <= 1e-10


def test_only_lora_factors_train() -> None:
    model = apply_method(build_model("tiny-llama"), "lora", r=2, target_modules=["q_proj"], layers_to_transform=[1])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B"]


def test_unmerge_restores_the_base_weight_exactly_enough() -> None:
    model = apply_method(build_model("tiny-gpt2", dtype=torch.float64), "lora", r=4)
    layer = model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B)
    before = layer.base_layer.weight.clone()
    layer.merge()
    assert not torch.allclose(before, layer.base_layer.weight)
    layer.unmerge()
    assert torch.allclose(before, layer.base_layer.weight, atol=1e-12)
