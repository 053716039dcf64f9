r"""Hybrid methods: compositions of registered parts (chapter 05_hybrid_unified).

Xu et al. 2023 put MAM adapter and UniPELT under *hybrid / manual combination*; Wang et al. 2024 call them
hybrid; in Lialin et al. 2023's Venn diagram a hybrid is an overlap of regions. Each method here is a
:func:`~survey_utils.methods.composition.compose` of parts registered by chapters 01, 02 and 04, plus what
the hybrid adds of its own (an :class:`~survey_utils.methods.composition.Extra`):

- **MAM adapter** (He et al. 2022): prefix tuning on attention + a scaled parallel adapter beside the FFN;
- **UniPELT** (Mao et al. 2022): LoRA on :math:`W_Q, W_V` + prefix tuning + a sequential adapter, each
  multiplied by a learned gate :math:`g(x) = \operatorname{mean}_t \sigma(W_g x_t + b_g)`;
- **Compacter++** (Mahabadi et al. 2021): one Compacter after the FFN only;
- **scaled parallel adapter** (He et al. 2022): the parallel adapter with a learned scale.

Defaults are AdapterHub's (peft has none of these), read from ``adapters`` 1.2.0's
``src/adapters/configuration/adapter_config.py`` (commit 88f18eb of github.com/adapter-hub/adapters):
``MAMConfig`` = ``PrefixTuningConfig(bottleneck_size=800)`` (30 prefix positions through a 800-wide MLP) +
``ParBnConfig()`` (reduction factor 2, ReLU, scaling 4.0); ``UniPELTConfig`` = ``PrefixTuningConfig(
prefix_length=10)`` (512-wide MLP) + ``SeqBnConfig(reduction_factor=16)`` + ``LoRAConfig(r=8, alpha=2)``
(q, v), all with ``use_gating=True``; ``CompacterPlusPlusConfig`` (after the FFN, reduction factor 32,
GELU, :math:`n = 4`, rank 1); ``ADAPTER_CONFIG_MAP["scaled_parallel"] = ParBnConfig(scaling="learned")``
(a scalar starting at 1, ``methods/modeling.py``). The gates are ``nn.Linear(d, 1)`` (``methods/modeling.py``
``Adapter``, ``methods/lora.py`` ``LoRA``, ``methods/prefix_tuning.py`` with ``shared_gating=True``).

Where our parts differ from AdapterHub's, the count differs too, and chapter 05 says so: our prefix tuning
prefixes T5's decoder self-attention only (AdapterHub also its encoder and cross-attention, each with its own
MLP); our gated LoRA keeps the :math:`\alpha/r` factor (AdapterHub drops it when gated).

The layers a hybrid adds live in ``layers/hybrid.py``, imported inside ``apply``: this file loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import survey_utils.methods.reparameterized  # noqa: F401  (registers LoRA, a part, before the recipes below)
from survey_utils.architecture import layout
from survey_utils.methods.adapters import adapter_memory_sites
from survey_utils.methods.composition import Extra, Part, compose
from survey_utils.methods.registry import NOT_PLACED, Taxonomy, get_method, register
from survey_utils.methods.soft_prompts import prefix_memory_sites

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

CHAPTER = "05_hybrid_unified"
HE_2022 = "He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (ICLR 2022)"


# ------------------------------------------------------------------------------------------ the gates
def _lora_sites(config: PretrainedConfig, hp: dict[str, Any]) -> list[Any]:
    return get_method("lora").sites(config, **hp)


def _adapter_sites(config: PretrainedConfig, placement: str, hp: dict[str, Any]) -> list[Any]:
    return adapter_memory_sites(config, placement, **hp)


def prefixed_attentions(config: PretrainedConfig) -> list[str]:
    """The attention modules that read a prefix: parents of the key/value projections prefix tuning feeds."""
    return list(dict.fromkeys(spec.name.rsplit(".", 1)[0] for spec in prefix_memory_sites(config)))


def unipelt_gate_params(config: PretrainedConfig, parts_hp: dict[str, dict[str, Any]]) -> int:
    r"""One gate :math:`(d + 1)` per gated module: :math:`\sum_\text{LoRA targets} (d_\text{in} + 1)` +
    :math:`\sum_\text{adapters} (d + 1)` + :math:`\sum_\text{prefixed attentions} (d_\text{model} + 1)`."""
    lora = sum(s.in_features + 1 for s in _lora_sites(config, parts_hp["lora"]))
    adapter = sum(s.out_features + 1 for s in _adapter_sites(config, "pfeiffer", parts_hp["adapter"]))
    prefix = len(prefixed_attentions(config)) * (layout(config).hidden_size + 1)
    return lora + adapter + prefix


def apply_unipelt_gates(model: nn.Module, parts_hp: dict[str, dict[str, Any]]) -> None:
    """Gate every LoRA target, adapter and prefixed attention (``layers/hybrid.py``)."""
    from survey_utils.methods.layers import hybrid

    config = model.config
    hybrid.gate_lora(model, _lora_sites(config, parts_hp["lora"]))
    hybrid.gate_adapters(model, _adapter_sites(config, "pfeiffer", parts_hp["adapter"]))
    hybrid.gate_prefixes(model, prefixed_attentions(config), layout(config).hidden_size)


def unipelt_gate_memory(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                        adapter_bytes: int, parts_hp: dict[str, dict[str, Any]]) -> dict[str, int]:
    r"""What the gates keep for backward: each gated branch's output (the gate's gradient is
    :math:`\partial L/\partial h \cdot \Delta`): LoRA's :math:`\frac{\alpha}{r}BAx` in the adapter dtype, the
    adapter's :math:`\Delta` in the model dtype; each gate's sigmoid output (one value per position);
    and the prefix table the gated keys and values are computed from."""
    t = batch_size * seq_len
    lora = _lora_sites(config, parts_hp["lora"])
    adapters = _adapter_sites(config, "pfeiffer", parts_hp["adapter"])
    attentions = prefixed_attentions(config)
    prefix = parts_hp["prefix"]
    shape = layout(config)
    table = prefix["num_virtual_tokens"] * 2 * len(attentions) * shape.num_kv_heads * shape.head_dim
    return {
        "gated branch outputs": sum(adapter_bytes * t * s.out_features for s in lora)
        + sum(act_bytes * t * s.out_features for s in adapters),
        "gate sigmoids": adapter_bytes * t * (len(lora) + len(adapters) + len(attentions)),
        "gated prefix table": act_bytes * table if prefix["prefix_projection"] else 0,
    }


UNIPELT_GATES = Extra(trainable_params=unipelt_gate_params, apply=apply_unipelt_gates,
                      memory_terms=unipelt_gate_memory, param_prefixes=("gate_",))


# ------------------------------------------------------------------------------------- learned scales
def learned_scale_params(config: PretrainedConfig, parts_hp: dict[str, dict[str, Any]]) -> int:
    """One scalar per parallel adapter (AdapterHub's ``scaling="learned"``)."""
    return len(_adapter_sites(config, "parallel", parts_hp["adapter"]))


def apply_learned_scales(model: nn.Module, parts_hp: dict[str, dict[str, Any]]) -> None:
    """Make each parallel adapter's scale a trainable scalar, starting at the part's ``scaling``."""
    from survey_utils.methods.layers import hybrid

    hybrid.learn_scales(model, _adapter_sites(model.config, "parallel", parts_hp["adapter"]))


def learned_scale_memory(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                         adapter_bytes: int, parts_hp: dict[str, dict[str, Any]]) -> dict[str, int]:
    r""":math:`s\,\Delta(x)` keeps :math:`\Delta(x)` (model dtype) for the gradient of :math:`s`, per adapter."""
    sites = _adapter_sites(config, "parallel", parts_hp["adapter"])
    return {"scaled branch outputs": sum(act_bytes * batch_size * seq_len * s.out_features for s in sites)}


LEARNED_SCALES = Extra(trainable_params=learned_scale_params, apply=apply_learned_scales,
                       memory_terms=learned_scale_memory, param_prefixes=(".scaling",))


# --------------------------------------------------------------------------------------- the recipes
register(compose(
    "mam_adapter", "MAM adapter (prefix tuning + scaled parallel adapter)", HE_2022, "2110.04366",
    Taxonomy(xu="hybrid / manual combination", wang="hybrid", lialin="A:adapters+A:soft_prompts"), CHAPTER,
    parts=(Part("prefix", "prefix_tuning", {"num_virtual_tokens": 30, "prefix_projection": True,
                                            "encoder_hidden_size": 800}),
           Part("adapter", "parallel_adapter")),
    notes="AdapterHub MAMConfig: PrefixTuningConfig(bottleneck_size=800) + ParBnConfig()",
))

register(compose(
    "unipelt", "UniPELT (gated LoRA + prefix tuning + adapter)",
    "Mao et al. 2022, UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (ACL 2022)",
    "2110.07577",
    Taxonomy(xu="hybrid / manual combination", wang="hybrid", lialin="A:adapters+A:soft_prompts+R"), CHAPTER,
    parts=(Part("prefix", "prefix_tuning", {"num_virtual_tokens": 10, "prefix_projection": True,
                                            "encoder_hidden_size": 512}),
           Part("adapter", "pfeiffer", {"reduction_factor": 16.0}),
           Part("lora", "lora", {"r": 8, "lora_alpha": 2.0})),
    extra=UNIPELT_GATES,
    notes="AdapterHub UniPELTConfig; one learned gate per LoRA target, adapter and prefixed attention",
))

register(compose(
    "compacter_pp", "Compacter++ (one Compacter after the FFN)",
    "Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (NeurIPS 2021)",
    "2106.04647", Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin="A:adapters+R"), CHAPTER,
    parts=(Part("compacter", "compacter", {"placement": "pfeiffer", "reduction_factor": 32.0,
                                           "non_linearity": "gelu", "phm_dim": 4, "phm_rank": 1}),),
    notes="AdapterHub CompacterPlusPlusConfig: Compacter with SeqBn (Pfeiffer) placement",
))

register(compose(
    "scaled_parallel", "Scaled parallel adapter (learned scale)", HE_2022, "2110.04366",
    Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin="A:adapters"), CHAPTER,
    parts=(Part("adapter", "parallel_adapter", {"scaling": 1.0}),),
    extra=LEARNED_SCALES,
    notes="AdapterHub ParBnConfig(scaling='learned'): the scale is a trained scalar starting at 1",
))
