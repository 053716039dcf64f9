"""Every text model type transformers builds (its causal-LM and seq2seq-LM auto mappings), counted three ways.

Each type is built from its default config, shrunk to two blocks, on ``meta``; LoRA with peft's ``all-linear``
must give the same trainable count by our closed form (the generic layout), by our from-scratch LoRA on the
built model and by peft 0.21.2, with equal totals. A type we cannot answer for is listed in ``REFUSED`` with the
one-line reason our code gives (a :class:`SurveyError`), and the test checks that it still refuses it that way:
nothing is skipped silently.
"""

from __future__ import annotations

import copy
import re

import pytest

from survey_utils.counting import three_way
from survey_utils.errors import SurveyError

# peft 0.21.2 rewrites 'all-linear' on these fused-expert MoE types (targeting.peft_lora_expert_targets).
MOE_REWRITTEN = (
    "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe",
    "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash",
    "mellum", "minimax", "minimax_m2", "mixtral", "olmoe", "qwen3_moe", "qwen3_next", "solar_open",
)
# peft refuses LoRA on a Mamba mixer's out_proj and conv1d (targeting.peft_lora_incompatible).
MAMBA = ("falcon_h1", "falcon_mamba", "mamba", "mamba2", "nemotron_h")
# transformers cannot build these from the default config as shrunk here (the reason is transformers' own message).
# Several are composite configs whose causal-LM class wants the text sub-config (emu3, llama4, qwen3_5, qwen4_exp,
# dots3_note, mllama) or whose layer lists do not survive the cut to two blocks (gemma3n_text): to do.
DEFAULT_CONFIG_FAILS = {
    "cohere_compass_text": "'full_attention'",
    "dbrx": "'DbrxAttentionConfig' object has no attribute 'rope_theta'",
    "dots3_note": "'Dots3NoteConfig' object has no attribute 'pad_token_id'",
    "emu3": "'Emu3Config' object has no attribute 'pad_token_id'",
    "gemma3n": 'TimmWrapperModel requires the timm library but it was not found in you',
    "gemma3n_text": 'The set of layer types producing a cache is different than the set of ',
    "gemma4_assistant": "Class validation error for validator 'validate_architecture': ValueErr",
    "gemma4_unified_assistant": 'The set of layer types producing a cache is different than the set of ',
    "hunyuan_v1_dense": "unsupported operand type(s) for ** or pow(): 'NoneType' and 'float'",
    "lfm2_moe": "'NoneType' object is not subscriptable",
    "llama4": "'Llama4Config' object has no attribute 'pad_token_id'",
    "ministral": "unsupported operand type(s) for ** or pow(): 'NoneType' and 'float'",
    "mllama": "transformers has no model class for model type 'mllama_text_model'",
    "musicgen": "'MusicgenConfig' object has no attribute 'dropout'",
    "musicgen_melody": "'MusicgenMelodyConfig' object has no attribute 'dropout'",
    "nemotron": "unsupported operand type(s) for //: 'int' and 'NoneType'",
    "qwen3_5": "'Qwen3_5Config' object has no attribute 'vocab_size'",
    "qwen3_5_moe": "'Qwen3_5MoeConfig' object has no attribute 'vocab_size'",
    "qwen4_exp": "'Qwen4ExpConfig' object has no attribute 'vocab_size'",
    "reformer": 'If you want to use `ReformerModelWithLMHead` make sure that `is_decode',
}
REFUSED = {**{t: "peft 0.21.2 turns it into LoRA on the fused expert tensors" for t in MOE_REWRITTEN},
           **{t: "peft refuses LoRA on" for t in MAMBA}, **DEFAULT_CONFIG_FAILS}

_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "encoder_layers",
                 "decoder_layers")


def all_types() -> list[str]:
    from transformers.models.auto import modeling_auto as auto

    return sorted(set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))


def small_default(model_type: str, blocks: int = 2):
    """transformers' default config of ``model_type`` with at most ``blocks`` blocks per stack (lists indexed by
    block cut to match), naming its causal-LM (else seq2seq-LM) class in ``architectures``."""
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto as auto

    try:
        config = AutoConfig.for_model(model_type)
    except Exception as error:  # noqa: BLE001 - a default config transformers itself rejects (strict validators)
        raise SurveyError(f"transformers' default '{model_type}' config is invalid: "
                          f"{' '.join(str(error).split())[:160]}") from None
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs (MusicGen's text encoder and decoder): shrink the top level only
        text = config
    for target in {id(config): config, id(text): text}.values():
        for field in _LAYER_FIELDS:
            value = getattr(target, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > blocks:
                _set(target, field, blocks)
        for name, value in list(vars(target).items()):
            if isinstance(value, list) and len(value) > blocks and name in ("layer_types", "mlp_layer_types"):
                _set(target, name, copy.copy(value[:blocks]))
    name = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or \
        auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[model_type]
    config.architectures = [name]
    config.name_or_path = f"default-{model_type}"
    return config


def _set(config, field: str, value) -> None:
    """Shrink one field where the config allows it (ProphetNet refuses num_hidden_layers; a per-layer config
    validates the whole architecture on every assignment): the default stays where it does not."""
    try:
        setattr(config, field, value)
    except Exception:  # noqa: BLE001 - transformers raises NotImplementedError, strict-dataclass errors, ...
        pass


@pytest.mark.parametrize("model_type", all_types())
def test_every_text_type_counts_three_ways_or_is_refused_in_one_line(model_type: str) -> None:
    if model_type in REFUSED:
        with pytest.raises(SurveyError, match=re.escape(REFUSED[model_type])) as info:
            three_way(small_default(model_type), "lora", target_modules="all-linear")
        assert "\n" not in str(info.value)
        return
    row = three_way(small_default(model_type), "lora", target_modules="all-linear")
    assert row["match"], {k: row[k] for k in ("formula", "scratch", "peft", "total")}


def test_the_refusal_list_names_only_existing_types() -> None:
    assert set(REFUSED) <= set(all_types())


def test_the_moe_refusal_is_peft_s_rewrite() -> None:
    """Why 'all-linear' is refused on Mixtral: peft's count includes the fused experts and the router, which the
    same modules named as linears do not."""
    from survey_utils.architecture import layout
    from survey_utils.counting import count
    from survey_utils.targeting import all_linear

    config = small_default("mixtral")
    linears = all_linear(layout(config))
    ours = count(config, "lora", "formula", target_modules=linears).trainable
    theirs = count(config, "lora", "peft", target_modules=linears).trainable
    assert ours == theirs  # the linears alone agree ...
    from peft import LoraConfig, get_peft_model

    from survey_utils.zoo import build_model

    rewritten = get_peft_model(build_model(config, device="meta"), LoraConfig(target_modules="all-linear"))
    assert rewritten.get_nb_trainable_parameters()[0] > ours  # ... 'all-linear' adds the experts' LoRA
