"""Our target matching is peft's: a property test against peft's own check_target_module_exists."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.tuners_utils import check_target_module_exists

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.targeting import matches, num_blocks, select
from survey_utils.zoo import load_config

MODELS = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "opt-350m", "bloom-560m"]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), model=st.sampled_from(MODELS))
def test_matching_agrees_with_peft(data, model: str) -> None:
    shape = layout(load_config(model))
    names = [m.name for m in shape.modules]
    short = sorted({m.short_name for m in shape.modules})
    targets = data.draw(st.lists(st.sampled_from(short + ["self_attn", "nope"]), min_size=1, max_size=4))
    layers = data.draw(st.one_of(st.none(), st.lists(st.integers(0, num_blocks(shape)), max_size=3)))
    name = data.draw(st.sampled_from(names))
    config = SimpleNamespace(target_modules=targets, layers_to_transform=layers, layers_pattern=None,
                             exclude_modules=None, modules_to_save=None, target_parameters=None)
    assert matches(name, targets, layers) == bool(check_target_module_exists(config, name))


def test_a_full_path_target_ignores_layers_to_transform_as_in_peft() -> None:
    """Found by hypothesis: peft returns early on an exact name, before its layer filter."""
    assert matches("shared", ["shared"], [0])
    assert matches("model.layers.5.self_attn.q_proj", ["model.layers.5.self_attn.q_proj"], [0])
    assert not matches("model.layers.5.self_attn.q_proj", ["q_proj"], [0])


def test_regex_targets_match_the_whole_name() -> None:
    assert matches("model.layers.3.self_attn.q_proj", r".*\.3\.self_attn\.(q|v)_proj")
    assert not matches("model.layers.13.self_attn.q_proj", r".*\.3\.self_attn\.(q|v)_proj")


def test_t5_layer_indices_cover_encoder_and_decoder() -> None:
    chosen = select(layout(load_config("t5-small")), ["q"], [0])
    assert [m.name for m in chosen] == ["encoder.block.0.layer.0.SelfAttention.q",
                                        "decoder.block.0.layer.0.SelfAttention.q",
                                        "decoder.block.0.layer.1.EncDecAttention.q"]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"target_modules": ["q_proj", "query"]}, "target module 'query' not found in llama-2-7b"),
    ({"target_modules": []}, "target_modules is empty"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [32]}, "layer 32 out of range: llama-2-7b has 32 blocks"),
    ({"target_modules": ["embed_tokens"]}, "is of kind 'embedding'"),
    ({"target_modules": r"nothing\.matches"}, "matches no module"),
])
def test_bad_targets_fail_in_one_line(kwargs: dict, fragment: str) -> None:
    shape = layout(load_config("llama-2-7b"))
    with pytest.raises(SurveyError, match=fragment):
        select(shape, kwargs["target_modules"], kwargs.get("layers_to_transform"), model_name="llama-2-7b")


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "opt-350m", "qwen3-0.6b",
                                   "phi-3-mini", "mixtral-8x7b"])
def test_all_linear_expands_as_peft_does(model: str) -> None:
    """peft's 'all-linear' keyword (not a regex): every Linear/Conv1D but the output head, from peft's own
    expansion on the model built on meta."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    from survey_utils.targeting import all_linear
    from survey_utils.zoo import build_model

    config = load_config(model)
    theirs = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"),
                                              build_model(config, device="meta")).target_modules
    shape = layout(config)
    assert set(all_linear(shape)) == set(theirs)
    chosen = select(shape, "ALL-LINEAR", [0])  # case-insensitive; full names ignore layers_to_transform, as in peft
    assert {m.name for m in chosen} == set(theirs)


def test_all_linear_is_not_a_regex() -> None:
    with pytest.raises(SurveyError, match="all-linear"):
        matches("model.layers.0.self_attn.q_proj", "all-linear")


def _tiny_moe_configs() -> dict:
    """Two-block Mixtral (peft's 'mixtral' conversion: w1/w3/w2) and Qwen3-MoE ('qwen2_moe': gate/up/down_proj)."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    sizes = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    return {"mixtral": MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2,
                                     architectures=["MixtralForCausalLM"]),
            "qwen3_moe": Qwen3MoeConfig(**sizes, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                        architectures=["Qwen3MoeForCausalLM"])}


_MOE = {}


def _moe(kind: str):
    if kind not in _MOE:
        from survey_utils.generic_layout import build_on_meta

        config = _tiny_moe_configs()[kind]
        _MOE[kind] = (config, layout(config), build_on_meta(config))
    return _MOE[kind]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["mixtral", "qwen3_moe"]))
def test_moe_conversion_agrees_with_peft(data, kind: str) -> None:
    """Our model of peft 0.21.2's _convert_peft_config_moe against peft's own, on lists and all-linear (a regex is
    refused: peft resolves it against parameterless modules a layout does not list, e.g. '.*experts.*' adds act_fn)."""
    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import _convert_peft_config_moe

    from survey_utils.targeting import peft_lora_targets

    config, shape, model = _moe(kind)
    names = sorted({m.short_name for m in shape.modules}) + ["w1", "w2", "w3", "gate", "gate_proj", "up_proj",
                                                             "down_proj"]
    targets = data.draw(st.one_of(
        st.just("all-linear"),
        st.sampled_from([r".*\.(q_proj|v_proj)", r".*experts.*"]),
        st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True)))
    if isinstance(targets, str) and targets != "all-linear":
        with pytest.raises(SurveyError, match="resolves a regular expression against every module"):
            peft_lora_targets(shape, targets)
        return
    theirs = LoraConfig(r=4, target_modules=targets)
    try:
        _convert_peft_config_moe(theirs, model)
    except ValueError:
        with pytest.raises(SurveyError, match="transformers 5 fused them"):
            peft_lora_targets(shape, targets)
        return
    ours = peft_lora_targets(shape, targets)
    their_modules = theirs.target_modules
    assert (set(ours.target_modules) if not isinstance(ours.target_modules, str) else ours.target_modules) == (
        set(their_modules) if not isinstance(their_modules, str) else their_modules)
    assert set(ours.target_parameters) == set(theirs.target_parameters or ())
    assert {rf".*\.{name}": 4 * f for name, f in ours.rank_factors} == dict(theirs.rank_pattern or {})


def test_the_moe_conversion_tables_are_peft_s() -> None:
    """targeting's transcription of peft 0.21.2's conversion tables (kept so that closed forms import neither peft
    nor transformers) equals what the installed peft and transformers say, type by type."""
    from peft.utils.transformers_weight_conversion import (
        _MODEL_TO_CONVERSION_PATTERN,
        _MOE_FUSED_TARGETS,
        _MOE_TARGET_MODULE_MAPPING,
        get_checkpoint_conversion_mapping,
    )

    from survey_utils.targeting import PEFT_MOE_FUSED, PEFT_MOE_MAPPING, PEFT_MOE_TYPES

    assert PEFT_MOE_MAPPING == _MOE_TARGET_MODULE_MAPPING
    assert {p: {k: list(v) for k, v in f.items()} for p, f in PEFT_MOE_FUSED.items()} == \
        {p: {k: list(v) for k, v in f.items()} for p, f in _MOE_FUSED_TARGETS.items()}
    converted = {t: p for t, p in _MODEL_TO_CONVERSION_PATTERN.items() if p in _MOE_TARGET_MODULE_MAPPING
                 and _MOE_FUSED_TARGETS.get(p) and get_checkpoint_conversion_mapping(t) is not None}
    assert PEFT_MOE_TYPES == converted
