"""QLoRA and LoftQ (survey_utils.methods.quantized) and chapter 06's experiments on them.

Counts three ways, peft parity and the memory terms come from the registry-driven tests; these check what
is particular to a quantized base: the NF4 storage, training, peft+bitsandbytes' count, LoftQ's error.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from survey_utils import quantization as Q
from survey_utils.counting import apply_method
from survey_utils.errors import SurveyError
from survey_utils.experiments import ch06_quantized as E
from survey_utils.methods import get_method
from survey_utils.methods.layers.quantized import NF4Linear, QLoRALinear
from survey_utils.zoo import build_model, load_config

pytest.importorskip("bitsandbytes")


def test_qlora_stores_every_block_linear_in_nf4_and_trains_only_lora() -> None:
    model = apply_method(build_model("tiny-llama", device="cpu"), "qlora")
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    assert len(layers) == 4 * 7  # q, k, v, o, gate, up, down in each of 4 blocks
    assert all(isinstance(layer.base_layer, NF4Linear) for layer in layers)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert model.lm_head.weight.dtype == torch.float32  # the head is not quantized (peft's all-linear leaves it)


def test_nf4_base_forward_is_the_dequantized_weight() -> None:
    linear = torch.nn.Linear(128, 64)
    layer = NF4Linear(linear)
    x = torch.randn(3, 128)
    expected = x @ Q.dequantize_nf4(Q.quantize_nf4(linear.weight.detach(), 64, True)).T + linear.bias
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer.packed(), Q.quantize_nf4(linear.weight.detach(), 64, True).packed())


def test_qlora_trains_on_a_tiny_model_and_leaves_the_base_unchanged() -> None:
    result = E.train_tiny("qlora", steps=6)
    assert result["base unchanged"]
    assert result["losses"][-1] < result["losses"][0] - 0.3


def test_peft_with_bitsandbytes_counts_4bit_weights_at_full_element_count() -> None:
    counts = E.peft_bitsandbytes_counts("tiny-llama")
    assert counts["formula trainable"] == counts["ours trainable"] == counts["peft+bnb trainable"]
    assert counts["formula total"] == counts["ours total"] == counts["peft+bnb total"]
    quantized = sum(s.in_features * s.out_features for s in _block_linears("tiny-llama"))
    assert counts["peft+bnb sum of numel() (packed)"] == counts["formula total"] - quantized // 2


def _block_linears(model: str) -> list:
    from survey_utils.architecture import layout

    return [m for m in layout(load_config(model)).modules if m.kind == "linear" and m.layer is not None]


def test_merge_requantizes_the_base() -> None:
    linear = torch.nn.Linear(64, 64, bias=False)
    layer = QLoRALinear(linear, r=4, lora_alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(5, 64)
    before = layer(x)
    layer.merge()
    assert layer.base_layer.weight.dtype == torch.uint8
    merged = layer(x)
    assert 0 < (merged - before).norm() / before.norm() < 0.15  # NF4's rounding (~9%), as peft warns


def test_loftq_reduces_the_initial_error_and_more_with_iterations() -> None:
    rows = E.loftq_errors(E.real_shaped_weight(128, 256), r=8, lora_alpha=16, iterations=3)
    errors = [row["LoftQ"] for row in rows]
    assert errors[0] < rows[0]["QLoRA init (B=0)"]
    assert errors[2] < errors[1] < errors[0]


def test_loftq_applied_starts_closer_to_the_unquantized_model() -> None:
    from survey_utils.parity import example_inputs, forward

    base = build_model("tiny-llama", device="cpu")
    reference = forward(base, example_inputs(base.config))
    qlora = forward(apply_method(build_model("tiny-llama", device="cpu"), "qlora"), example_inputs(base.config))
    loftq = forward(apply_method(build_model("tiny-llama", device="cpu"), "loftq", loftq_iter=2),
                    example_inputs(base.config))
    assert (loftq - reference).norm() < (qlora - reference).norm()


def test_defaults_are_the_libraries() -> None:
    from peft import LoftQConfig

    loftq = get_method("loftq")
    assert loftq.defaults()["loftq_iter"] == LoftQConfig().loftq_iter
    fields = {f.name: f.default for f in dataclasses.fields(LoftQConfig)}
    assert fields["loftq_bits"] == 4


@pytest.mark.parametrize(("model", "overrides", "fragment"), [
    ("gpt2", {}, "c_attn"),  # GPT-2's Conv1D: not a layer NF4 replaces
    ("tiny-llama", {"blocksize": 48}, "blocksize=48 does not divide"),
    ("tiny-llama", {"loftq_iter": 0}, "loftq_iter=0"),
    ("tiny-llama", {"target_modules": ["embed_tokens"]}, "embed_tokens"),
])
def test_bad_settings_are_one_line_naming_the_value(model: str, overrides: dict, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment):
        get_method("loftq").resolve(load_config(model), **overrides)


def test_claims_are_computed_and_the_qlora_65b_run_fits_48gb() -> None:
    rows = {row["claim"]: row for row in E.claims_table()}
    claims = E.read_claims()
    fits = rows[claims["qlora_65b_single_gpu"].text]
    assert fits["ours"] < 48
    assert all(row["ratio"] > 0 for row in rows.values())


def test_8bit_adamw_state_bytes_follow_the_per_tensor_rule() -> None:
    result = E.adamw8bit_state_bytes("tiny-llama", "qlora")
    assert result["bitsandbytes state bytes"] == result["per-tensor rule"]


@pytest.mark.parametrize(("method", "hp"), [("qa_lora", {"group_size": 8}), ("peqa", {})])
def test_merged_model_stays_quantized_and_equal(method: str, hp: dict) -> None:
    """QA-LoRA folds its update into the group offsets; PEQA's trained scales are the model: same codes."""
    from survey_utils.methods import merge
    from survey_utils.parity import example_inputs, forward

    model = apply_method(build_model("tiny-llama", device="cpu"), method, **hp)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    codes = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    inputs = example_inputs(model.config)
    before = forward(model, inputs)
    merge(model)
    assert torch.allclose(forward(model, inputs), before, atol=1e-5)
    assert codes and all(torch.equal(p, codes[n]) for n, p in model.named_parameters() if p.dtype == torch.uint8)


@pytest.mark.parametrize(("method", "hp"), [("qa_lora", {"group_size": 8}), ("peqa", {})])
def test_qa_lora_and_peqa_train_on_a_tiny_model(method: str, hp: dict) -> None:
    result = E.train_tiny(method, steps=6, **hp)
    assert result["base unchanged"] and result["losses"][-1] < result["losses"][0] - 0.3


def test_minmax_quantization_error_and_a_bad_group() -> None:
    weight = E.real_shaped_weight(64, 256)
    codes, scale, offset = Q.quantize_minmax(weight, 4, 32)
    assert codes.max() <= 15 and scale.shape == (64, 8)
    assert Q.reconstruction_error(weight, Q.dequantize_minmax(codes, scale, offset))["relative"] < 0.15
    with pytest.raises(SurveyError, match="group_size=32 does not divide model.layers.0.mlp.down_proj's 344"):
        get_method("qa_lora").resolve(load_config("tiny-llama"))
