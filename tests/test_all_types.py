"""Every text model type transformers builds (its causal-LM and seq2seq-LM auto mappings), counted three ways.

Each type is built from its default config, shrunk to two blocks (the last one a mixture of experts where the
config has both kinds), on ``meta``. For each of LoRA with peft's ``all-linear``, prompt tuning and (IA)^3 at peft's
per-architecture defaults, our closed form (the generic layout), our from-scratch method on the built model and
peft 0.21.2 must give the same trainable count, with equal totals. A type we cannot answer for is listed in
``REFUSED[method]`` with the one-line reason our code gives (a :class:`SurveyError`), and the test checks that it
still refuses it that way: nothing is skipped silently. A model is built per method and implementation (the method
changes it in place); most of the time is LoRA's, peft matching all-linear's many names.
"""

from __future__ import annotations

import copy
import re

import pytest

from survey_utils.counting import closed_form, count, peft_model, three_way
from survey_utils.errors import SurveyError

METHODS = {"lora": {"target_modules": "all-linear"}, "prompt_tuning": {}, "ia3": {}}

# peft 0.21.2 turns LoRA's 'all-linear' into LoRA on the fused expert tensors on these types (its transformers-5
# conversion, targeting.peft_lora_targets): they pass with their experts adapted (test below), but for dots1 and
# hunyuan_v1_moe, which transformers cannot build from the default config (DEFAULT_CONFIG_FAILS).
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
    "dots1": "empty() takes 1 positional argument but 3 were given",
    "dots3_note": "'Dots3NoteConfig' object has no attribute 'pad_token_id'",
    "emu3": "'Emu3Config' object has no attribute 'pad_token_id'",
    "gemma3n": 'TimmWrapperModel requires the timm library but it was not found in you',
    "gemma3n_text": 'The set of layer types producing a cache is different than the set of ',
    "gemma4_assistant": "Class validation error for validator 'validate_architecture': ValueErr",
    "gemma4_unified_assistant": 'The set of layer types producing a cache is different than the set of ',
    "hunyuan_v1_dense": "unsupported operand type(s) for ** or pow(): 'NoneType' and 'float'",
    "hunyuan_v1_moe": "unsupported operand type(s) for ** or pow(): 'NoneType' and 'float'",
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
# A soft prompt must match the input embeddings; these have no table of vocab_size rows (soft_prompts.embedding_width,
# checked before the build, so mllama meets this reason first).
NO_VOCAB_TABLE = ("cpmant", "mllama", "moshi")
# peft 0.21.2 has no (IA)^3 default for these types (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING), checked
# before the build.
NO_IA3_DEFAULT = (
    "afmoe", "apertus", "arcee", "aria_text", "audioflamingo3", "axk1", "axk2", "bailing_hybrid", "bamba", "beam",
    "bert-generation", "big_bird", "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small", "blt",
    "camembert", "codegen", "cohere", "cohere2", "cohere2_moe", "cohere_compass_text", "cpmant", "ctrl", "cwm",
    "data2vec-text", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "diffllama", "doge",
    "dots1", "dots3_note", "dots3_note_text", "electra", "emu3", "encoder-decoder", "ernie", "ernie4_5",
    "ernie4_5_moe", "exaone4", "exaone_moe", "falcon_h1", "falcon_mamba", "flex_olmo", "flint", "fsmt", "fuyu",
    "gemma3", "gemma3n", "gemma3n_text", "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_assistant",
    "gemma4_unified_text", "git", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glmasr", "got_ocr2",
    "gpt_neox_japanese", "gpt_oss", "granite", "granite_speech", "granite_speech_plus", "granite_swa", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "helium", "hrm_text", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "hy_v3", "hy_v4", "hyperclovax", "inkling2_text", "inkling_text", "internlm3", "iquestcoder",
    "jais2", "jamba", "jetmoe", "kimi_linear", "kolibri1", "laguna", "led", "lfm2", "lfm2_moe", "lfm3",
    "llama4_text", "longcat_flash", "longt5", "m2m_100", "mamba", "mamba2", "marian", "mbart", "megatron-bert",
    "mellum", "mimo_v2_flash", "minicpm3", "minimax", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3",
    "mllama", "modernbert-decoder", "moshi", "moss_transcribe_diarize", "mpt", "musicflamingo", "musicgen",
    "musicgen_melody", "mvp", "nanochat", "nemo_speechlm", "nemotron", "nemotron_h", "nllb-moe", "olmo", "olmo2",
    "olmo3", "olmo_hybrid", "olmoe", "openai-gpt", "pegasus", "pegasus_x", "persimmon", "phi3", "phi4_multimodal",
    "phimoe", "plbart", "prophetnet", "qwen2_audio", "qwen2_moe", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen3_5_text", "qwen3_asr", "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "recurrent_gemma",
    "reformer", "rembert", "roberta-prelayernorm", "roc_bert", "roformer", "rwkv", "seamless_m4t",
    "seamless_m4t_v2", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "switch_transformers",
    "t5gemma", "t5gemma2", "trocr", "umt5", "vaultgemma", "vibevoice_asr", "voxtral", "voxtral_realtime", "whisper",
    "xglm", "xlm", "xlm-roberta", "xlm-roberta-xl", "xlnet", "xlstm", "xmod", "youtu", "zamba", "zamba2", "zaya"
)
REFUSED: dict[str, dict[str, str]] = {
    "lora": {**{t: "peft refuses LoRA on" for t in MAMBA}, **DEFAULT_CONFIG_FAILS},
    "prompt_tuning": {**DEFAULT_CONFIG_FAILS, **{t: "no embedding table has vocab_size=" for t in NO_VOCAB_TABLE}},
    "ia3": {**{t: "peft has no default target_modules for model type" for t in NO_IA3_DEFAULT},
            # peft's default names Mixtral's v4 expert linear w2, which transformers 5 fused into experts.down_proj
            "mixtral": "target module 'w2' not found",
            "llama4": DEFAULT_CONFIG_FAILS["llama4"], "gemma4_assistant": DEFAULT_CONFIG_FAILS["gemma4_assistant"]},
}
# XLNet makes some parameters with torch.FloatTensor, which ignores the meta device, so peft moves its prompt encoder
# from meta to cpu and fails ("Cannot copy out of meta tensor"): peft's count is taken on a cpu build there.
PEFT_ON_CPU = {("prompt_tuning", "xlnet")}

_LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "encoder_layers",
                 "decoder_layers")


def all_types() -> list[str]:
    from transformers.models.auto import modeling_auto as auto

    return sorted(set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))


def small_default(model_type: str, blocks: int = 2):
    """transformers' default config of ``model_type`` with at most ``blocks`` blocks per stack (lists indexed by
    block cut to match; where that cut, or DeepSeek's ``first_k_dense_replace``, would leave no mixture-of-experts
    block, the last block is one), naming its causal-LM (else seq2seq-LM) class in ``architectures``."""
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
                kept = copy.copy(value[:blocks])
                dropped = [kind for kind in value if kind not in kept]
                if name == "mlp_layer_types" and dropped:  # keep a sparse (MoE) block where the cut drops them all
                    kept[-1] = dropped[0]
                _set(target, name, kept)
        dense = getattr(target, "first_k_dense_replace", None)
        if isinstance(dense, int) and dense >= blocks:  # DeepSeek's leading dense blocks: keep the last block MoE
            _set(target, "first_k_dense_replace", blocks - 1)
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


@pytest.mark.parametrize(("method", "model_type"), [(m, t) for m in METHODS for t in all_types()])
def test_every_text_type_counts_three_ways_or_is_refused_in_one_line(method: str, model_type: str) -> None:
    settings = METHODS[method]
    if model_type in REFUSED[method]:
        with pytest.raises(SurveyError, match=re.escape(REFUSED[method][model_type])) as info:
            three_way(small_default(model_type), method, **settings)
        assert "\n" not in str(info.value)
        return
    if (method, model_type) in PEFT_ON_CPU:
        from survey_utils.zoo import build_model

        config = small_default(model_type)
        formula, built = closed_form(config, method, **settings), count(config, method, "scratch", **settings)
        with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
            count(config, method, "peft", **settings)
        theirs = peft_model(build_model(config, device="cpu"), method, **settings).get_nb_trainable_parameters()
        assert (formula.trainable, formula.total) == (built.trainable, built.total) == theirs
        return
    row = three_way(small_default(model_type), method, **settings)
    assert row["match"], {k: row[k] for k in ("formula", "scratch", "peft", "total")}


def test_the_refusal_lists_name_only_existing_types() -> None:
    for refused in REFUSED.values():
        assert set(refused) <= set(all_types())
    assert set(MOE_REWRITTEN) <= set(all_types())


@pytest.mark.parametrize("model_type", [t for t in MOE_REWRITTEN if t not in REFUSED["lora"]])
def test_moe_types_adapt_their_fused_experts(model_type: str) -> None:
    """The MoE types pass with their experts adapted, not around them: peft's all-linear reaches 3-D expert tensors
    in the two-block config (one A and B per expert), and the dense MLP linears it drops are not adapted by ours."""
    from survey_utils.methods.reparameterized import lora_targets

    modules, params = lora_targets(small_default(model_type), {"target_modules": "all-linear",
                                                                "layers_to_transform": None, "layers_pattern": None})
    assert any(len(p.shape) == 3 and p.experts > 1 for p in params), model_type
    assert not any(m.short_name in ("gate_proj", "up_proj", "down_proj") for m, _ in modules), model_type


def test_moe_all_linear_is_more_than_the_linears() -> None:
    """On Mixtral, peft's all-linear = the linears (attention) + the router + every expert's A and B: the linears
    alone count less, by exactly the expert tensors' LoRA (r = 8; gate_up_proj at 2r, peft's rank_pattern)."""
    from survey_utils.architecture import layout
    from survey_utils.targeting import all_linear

    config = small_default("mixtral")
    shape = layout(config)
    linears = all_linear(shape)
    alone = count(config, "lora", "formula", target_modules=linears).trainable
    assert alone == count(config, "lora", "peft", target_modules=linears).trainable
    experts = 0
    for m in shape.modules:
        for (param, _), dims in zip(m.params, m.shapes, strict=True):
            if m.moe == "routed":  # (E, d_out, d_in); gate_up_proj fused from w1 and w3: rank 2r
                experts += (16 if param == "gate_up_proj" else 8) * dims[0] * (dims[1] + dims[2])
            elif m.moe == "router":  # gate.weight (E, h): one matrix
                experts += 8 * (dims[0] + dims[1])
    assert experts > 0
    assert count(config, "lora", "peft", target_modules="all-linear").trainable == alone + experts


def test_an_moe_type_without_an_moe_block_loses_its_dense_mlp_as_in_peft() -> None:
    """peft's conversion depends on the model type, not on the blocks: DeepSeek-V3 with only its leading dense
    blocks still has gate_proj/up_proj/down_proj moved to target_parameters, which then match nothing, so LoRA
    all-linear adapts the attention alone, three ways."""
    from survey_utils.methods.reparameterized import lora_targets

    config = small_default("deepseek_v3")
    config.first_k_dense_replace = 2  # both blocks dense
    modules, params = lora_targets(config, {"target_modules": "all-linear", "layers_to_transform": None,
                                            "layers_pattern": None})
    assert not params and {m.component for m, _ in modules} == {"attention"}
    row = three_way(config, "lora", target_modules="all-linear")
    assert row["match"], row
