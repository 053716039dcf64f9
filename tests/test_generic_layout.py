"""The generic layout (read from a meta build) for every model type without a hand layout, and the hand
layouts' closed forms checked against it on every hand-family zoo model."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from transformers import AutoConfig, MixtralConfig

from survey_utils.architecture import _BUILDERS, layout
from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.generic_layout import (
    build_on_meta,
    generic_layout,
    peft_default_lora_targets,
    transposed_modules,
)
from survey_utils.zoo import MODELS_DIR, list_models, load_config

GENERIC = [n for n in list_models() if load_config(n).model_type not in _BUILDERS]
HAND = [n for n in list_models() if load_config(n).model_type in _BUILDERS]
# (total, active per token) of the zoo's MoE configs, from Layout.active_params.
MOE = {"mixtral-8x7b": (46_702_792_704, 12_879_925_248), "deepseek-v3": (671_026_404_352, 37_552_282_624),
       # 2 blocks x 4 experts of 128 -> 2 x 256 -> 128: 786,432 routed, a token uses 2 of 4
       "tiny-mixtral": (2_983_552, 2_983_552 - 786_432 + 786_432 * 2 // 4)}


def _rows() -> dict[str, dict[str, str]]:
    with (MODELS_DIR / "sources.csv").open(encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _specs(shape) -> dict[str, tuple]:
    # A tied module owns nothing; which of its tensors it lists differs (BERT's decoder bias is cls.predictions.bias).
    return {m.name: (m.kind, () if m.tied_to else m.params, m.in_features, m.out_features, m.layer, m.tied_to)
            for m in shape.modules}


def test_the_zoo_has_the_new_architectures() -> None:
    types = {load_config(n).model_type for n in GENERIC}
    assert {"mt5", "qwen3", "gemma2", "phi3", "mixtral", "falcon", "gpt_neox", "olmo2", "starcoder2",
            "deepseek_v3"} <= types


@pytest.mark.parametrize("name", GENERIC)
def test_generic_total_is_the_meta_built_models_and_the_recorded_count(name: str) -> None:
    """Exact by construction; sources.csv's counted_total (and, in test_zoo, its published total) agree."""
    config = load_config(name)
    built = build_on_meta(config)
    shape = layout(config)
    assert shape.total == sum(p.numel() for p in built.parameters())
    assert {f"{m.name}.{p}": n for m in shape.modules if not m.tied_to for p, n in m.params} == {
        n: p.numel() for n, p in built.named_parameters()}
    assert shape.total == int(_rows()[name]["counted_total"])
    assert sum(shape.by_component.values()) == shape.total


@pytest.mark.parametrize("name", HAND)
def test_hand_layouts_equal_the_generic_layout(name: str) -> None:
    """Every hand-written closed form against the model transformers builds: names, kinds, element counts,
    in/out features, block indices and ties, module by module (components are the hand layouts' teaching
    choices and are compared on the linears only)."""
    hand = layout(load_config(name))
    generic = generic_layout(load_config(name, full=True))
    assert _specs(hand) == _specs(generic)
    assert hand.total == generic.total
    linears = {m.name: m.component for m in generic.linear_modules() if m.layer is not None}
    assert {m.name: m.component for m in hand.linear_modules() if m.layer is not None} == linears
    assert hand.default_lora_targets == generic.default_lora_targets


def test_fused_projections_are_linears_with_their_real_shapes() -> None:
    phi3 = {m.short_name: m for m in layout(load_config("phi-3-mini")).modules if m.layer == 0}
    assert (phi3["qkv_proj"].in_features, phi3["qkv_proj"].out_features) == (3072, 3 * 3072)
    assert phi3["gate_up_proj"].out_features == 2 * 8192 and phi3["gate_up_proj"].kind == "linear"
    falcon = {m.short_name: m for m in layout(load_config("falcon-7b")).modules if m.layer == 0}
    assert falcon["query_key_value"].out_features == 4544 + 2 * 64  # multi-query: one key and value head
    assert layout(load_config("falcon-7b")).default_lora_targets == ("query_key_value",)


@pytest.mark.parametrize("name", sorted(MOE))
def test_moe_total_and_active_per_token(name: str) -> None:
    shape = layout(load_config(name))
    assert (shape.total, shape.active_params) == MOE[name]
    routed = sum(m.numel for m in shape.modules if m.moe == "routed")
    assert shape.active_params == shape.total - routed + routed * shape.experts_per_token // shape.num_experts
    assert closed_form(name, "full").active == MOE[name][1]
    assert closed_form("llama-2-7b", "full").active is None


def test_active_per_token_counts_the_top_k_experts_share_of_expert_lora() -> None:
    """Mixtral-8x7B, LoRA all-linear (r = 8), per block: attention q, k, v, o 8 * (8192 + 5120 + 5120 + 8192); router
    8 * (4096 + 8); experts gate_up_proj (8, 28672, 4096) at rank 16 and down_proj (8, 4096, 14336) at rank 8, of
    which a token uses its 2 of 8 experts' A and B."""
    attention, router = 8 * (8192 + 5120 + 5120 + 8192), 8 * (4096 + 8)
    experts = 16 * 8 * (4096 + 28672) + 8 * 8 * (14336 + 4096)
    lora = closed_form("mixtral-8x7b", "lora", target_modules="all-linear")
    assert lora.trainable == 32 * (attention + router + experts) == 179_832_832
    assert lora.active == MOE["mixtral-8x7b"][1] + 32 * (attention + router + experts * 2 // 8) == 12_930_783_232


def test_deepseek_has_routers_shared_experts_and_latent_attention() -> None:
    shape = layout(load_config("deepseek-v3"))
    roles = {m.moe for m in shape.modules}
    assert {"router", "routed", "shared"} <= roles
    names = shape.linear_names()
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"} <= set(names)
    assert (shape.num_experts, shape.experts_per_token) == (256, 8)


def _tiny_mixtral(**changes) -> MixtralConfig:
    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                 architectures=["MixtralForCausalLM"])
    return MixtralConfig(**{**sizes, **changes})


def test_lora_on_fused_experts_counts_as_peft_does() -> None:
    """target_parameters on the fused expert tensors: one A (r x d_in) and B (d_out x r) per expert, peft's count."""
    import peft

    config = _tiny_mixtral()
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    wrapped = peft.get_peft_model(build_on_meta(config), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         target_parameters=targets))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    # per block: q_proj 64 -> 64; gate_up_proj (4 experts, 2*96 x 64); down_proj (4, 64 x 96); two blocks
    expected = 2 * (4 * (64 + 64) + 4 * 4 * (64 + 2 * 96) + 4 * 4 * (96 + 64))
    assert trainable == expected
    assert closed_form(config, "lora", r=4, target_modules=["q_proj"], target_parameters=targets).trainable == expected
    with pytest.raises(SurveyError, match="target parameter 'mlp.experts.nope' matches no parameter"):
        closed_form(config, "lora", r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.nope"])


def test_expert_tensors_of_the_zoo_are_stored_out_by_in() -> None:
    """transformers' is_transposed experts ((E, d_in, d_out)) are recorded while the generic layout builds; a layout
    read from a stored snapshot has no record and is taken as (E, d_out, d_in). No zoo MoE is transposed, so the
    snapshots lose nothing; gpt_oss (transposed) is recorded from its build."""
    from transformers import GptOssConfig

    for name in GENERIC:
        config = load_config(name, full=True)
        if any(len(s) == 3 for m in layout(config).modules for s in m.shapes):
            assert not {n for n, module in build_on_meta(config).named_modules()
                        if getattr(module, "is_transposed", False)}, name
    oss = GptOssConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                       vocab_size=100, architectures=["GptOssForCausalLM"])
    assert transposed_modules(generic_layout(oss)) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}


def test_a_repeat_is_a_cache_hit() -> None:
    config = load_config("pythia-1b")
    assert layout(config) is layout(config)
    same = AutoConfig.for_model(**json.loads((MODELS_DIR / "pythia-1b.json").read_text()))
    same.name_or_path = "pythia-1b"  # the key is the whole config's content, its name included
    assert layout(same) is layout(config)


def test_no_default_lora_target_is_one_line_naming_the_linears() -> None:
    with pytest.raises(SurveyError, match="peft has no default target_modules for model type 'phi3'.*qkv_proj"):
        closed_form("phi-3-mini", "lora")
    assert closed_form("phi-3-mini", "lora", target_modules=["qkv_proj"]).trainable == 32 * 8 * (3072 + 9216)


def test_bad_configs_are_one_line() -> None:
    with pytest.raises(SurveyError, match="num_experts_per_tok=9 must be between 1 and num_local_experts=4"):
        layout(_tiny_mixtral(num_experts_per_tok=9))
    config = _tiny_mixtral()
    config.architectures = None
    config.model_type = "no-such-type"
    with pytest.raises(SurveyError, match="no model class for model type 'no-such-type'"):
        layout(config)


def test_the_generic_path_builds_nothing_real() -> None:
    built = build_on_meta(load_config("deepseek-v3"))
    assert next(built.parameters()).device == torch.device("meta")


def test_peft_default_targets_are_read_without_importing_peft() -> None:
    """The generic layout reads peft's default LoRA targets from peft's source (importing peft imports bitsandbytes,
    seconds of an unseen config's first count): the same table as peft's constant, and no import of peft."""
    import subprocess
    import sys

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert peft_default_lora_targets() == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    script = ("import sys\nfrom survey_utils.generic_layout import peft_default_lora_targets\n"
              "print(len(peft_default_lora_targets()), 'peft' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(len(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)), "False"]


def test_a_full_content_cache_drops_the_identity_cache_with_it(monkeypatch) -> None:
    """When the content cache is cleared (256 configs in one process), the zoo's identity entries go with it: an equal
    config then still gets the zoo config's own layout object."""
    import survey_utils.architecture as architecture

    config = load_config("pythia-1b")
    layout(config)
    monkeypatch.setattr(architecture, "_CACHE", dict.fromkeys(map(str, range(256)), None))
    same = AutoConfig.for_model(**json.loads((MODELS_DIR / "pythia-1b.json").read_text()))
    same.name_or_path = "pythia-1b"
    assert layout(same) is layout(config)
