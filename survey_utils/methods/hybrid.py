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

import functools
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import survey_utils.methods.reparameterized  # noqa: F401  (registers LoRA, a part, before the recipes below)
import survey_utils.methods.selective  # noqa: F401  (registers BitFit, an S4 part)
from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.methods.adapters import adapter_memory_sites
from survey_utils.methods.composition import Extra, Part, compose
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, get_method, register
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


# ------------------------------------------------------------------------------------------------ S4
S4_STRATEGIES: dict[str, tuple[int, ...]] = {"bitfit": (2, 3), "adapter": (0, 1, 2), "prefix": (1, 2, 3),
                                             "lora": (0, 3)}
"""The groups (0-based: G1..G4) each S4 part serves: G1 adapter + LoRA; G2 adapter + prefix; G3 adapter +
prefix + BitFit; G4 prefix + BitFit + LoRA (Chen et al. 2023, the S4 pattern found on T5-base).

What the composition approximates: prefix tuning cannot be restricted to G2-G4 (one extended attention mask
gives every layer the same n extra keys), so the prefixes reach every prefixed attention, G1's too (T5: the
decoder's self-attention only, as chapter 02's prefix tuning). "Uniform allocation" is one size per strategy in
every layer that uses it (the parts' defaults: Houlsby adapter, reduction 16; LoRA r=8 on Q, V; 20 prefixes; all
biases of G3, G4), not the paper's equal per-layer budget at 0.5% of the backbone. For an encoder-decoder the
groups index peft's shared block numbers (T5's block i is in both stacks); the 1:2:2:1 proportions are read from
the paper's T5-base example, not checked against its text here."""


def spindle_sizes(blocks: int) -> list[int]:
    r"""S4's spindle grouping: four groups of consecutive blocks in the proportions :math:`1:2:2:1` (the
    paper's T5-base grouping, 4/8/8/4 of 24 layers). Boundaries at :math:`b_1 = \max(1, \lfloor L/6 + 1/2
    \rfloor)`, :math:`b_2 = \lfloor L/2 \rfloor`, :math:`b_3 = L - b_1`: 12 blocks -> 2/4/4/2, 24 -> 4/8/8/4,
    32 -> 5/11/11/5, 4 -> 1/1/1/1."""
    if blocks < 4:
        raise SurveyError(f"S4 needs four groups of blocks; the model has {blocks} blocks")
    first = max(1, (blocks + 3) // 6)
    return [first, blocks // 2 - first, blocks - first - blocks // 2, first]


def s4_groups(config: PretrainedConfig, group_sizes: list[int] | None) -> list[list[int]]:
    """The block indices of G1..G4: ``group_sizes`` (consecutive, from block 0) or the spindle grouping."""
    from survey_utils.methods.common import model_label
    from survey_utils.targeting import num_blocks

    blocks = num_blocks(layout(config))
    sizes = spindle_sizes(blocks) if group_sizes is None else list(group_sizes)
    if len(sizes) != 4 or min(sizes) < 1 or sum(sizes) != blocks:
        raise SurveyError(f"S4 group_sizes={sizes} must be four positive sizes covering the {blocks} blocks of "
                          f"{model_label(config)} (they cover {sum(sizes)})")
    starts = [sum(sizes[:i]) for i in range(4)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def s4_part_settings(config: PretrainedConfig, hp: dict[str, Any]) -> dict[str, Any]:
    """S4's own ``group_sizes`` -> each part's layers: ``layers_to_transform`` of the adapter and LoRA parts, and
    the BitFit part's ``bias_modules`` (the exact names of the biased modules in its groups, as one regex)."""
    import re

    values = {k: v for k, v in hp.items() if k != "group_sizes"}
    groups = s4_groups(config, hp.get("group_sizes"))
    blocks = {part: sorted(i for g in S4_STRATEGIES[part] for i in groups[g]) for part in S4_STRATEGIES}
    values["adapter.layers_to_transform"] = blocks["adapter"]
    values["lora.layers_to_transform"] = blocks["lora"]
    from survey_utils.targeting import layer_index

    names = [m.name for m in layout(config).modules if m.has_bias and not m.tied_to
             and layer_index(m.name) in set(blocks["bitfit"])]
    if not names:
        from survey_utils.methods.common import model_label

        raise SurveyError(f"S4's BitFit groups (G3, G4: blocks {blocks['bitfit'][0]}-{blocks['bitfit'][-1]}) of "
                          f"{model_label(config)} have no bias: BitFit has nothing to train")
    values["bitfit.bias_modules"] = "|".join(map(re.escape, names))
    return values


RECIPES: dict[str, Any] = {}
"""Hybrids whose parts' settings depend on the model (S4: its groups become each part's layers): the rewrite of
the namespaced hyper-parameters, applied before the parts resolve. :func:`part_hyperparams` reads it."""


def part_hyperparams(method: Method, config: PretrainedConfig, hp: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each part's resolved hyper-parameters in the hybrid ``method`` with resolved ``hp`` on ``config``."""
    from survey_utils.methods.composition import split_settings

    expanded = RECIPES[method.name](config, hp) if method.name in RECIPES else hp
    by_part = split_settings(method.parts, expanded)
    return {p.label: p.registered.resolve(config, **by_part[p.label]) for p in method.parts}


def with_recipe(inner: Method, name: str, own: tuple[HyperParam, ...], fixed: tuple[str, ...],
                recipe: Any) -> Method:
    """``inner`` (a composition) whose hyper-parameters ``fixed`` are set by ``recipe(config, hp)`` from the
    hybrid's ``own`` hyper-parameters; every field of ``inner`` that reads hyper-parameters reads the rewrite."""

    def wrap(function: Any) -> Any:
        if function is None:
            return None

        def rewritten(config: PretrainedConfig, *args: Any, **hp: Any) -> Any:
            return function(config, *args, **recipe(config, hp))

        return functools.wraps(function)(rewritten)  # keeps the part's docstring (equation, paper)

    def apply(model: nn.Module, **hp: Any) -> nn.Module:
        return inner.apply(model, **recipe(model.config, hp))

    def frozen_added_params(config: PretrainedConfig, **hp: Any) -> int:
        """``Method.added_params`` is trainable + this. A part that only unfreezes base parameters (BitFit) trains
        parameters it does not add: they are subtracted here, so the net is what the model really gains (and the
        memory model does not hold those weights twice, as base and as trainable)."""
        rewritten = recipe(config, hp)
        from survey_utils.methods.composition import split_settings

        by_part = split_settings(inner.parts, rewritten)
        unfrozen = sum(p.registered.count(config, **by_part[p.label]) for p in inner.parts
                       if not p.registered.adds_parameters)
        frozen = inner.frozen_added_params(config, **rewritten) if inner.frozen_added_params else 0
        return frozen - unfrozen

    apply.__doc__ = inner.apply.__doc__
    RECIPES[name] = recipe
    return replace(
        inner, name=name, hyperparams=tuple(h for h in inner.hyperparams if h.name not in fixed) + own,
        apply=apply, trainable_params=wrap(inner.trainable_params), memory_terms=wrap(inner.memory_terms),
        validate=wrap(inner.validate), gradient_sites=wrap(inner.gradient_sites),
        extra_positions=wrap(inner.extra_positions), frozen_added_params=frozen_added_params,
        unfrozen_params=wrap(inner.unfrozen_params),
        largest_trainable_tensor=wrap(inner.largest_trainable_tensor),
    )


S4_PAPER = "Chen et al. 2023, Parameter-Efficient Fine-Tuning Design Spaces (ICLR 2023 submission)"
S4 = register(with_recipe(
    compose(
        "s4", "S4 (spindle groups: A+L, A+P, A+P+B, P+B+L)", S4_PAPER, "2301.01821",
        Taxonomy(xu="hybrid / automatic combination", wang="hybrid", lialin="A:adapters+S+R"), CHAPTER,
        parts=(Part("bitfit", "bitfit"), Part("adapter", "houlsby"), Part("prefix", "prefix_tuning"),
               Part("lora", "lora")),
        notes="BitFit first: it unfreezes biases by name, before the adapter and LoRA wrap their modules. "
              "Prefixes reach every prefixed attention (G1's too): see chapter 05.",
    ),
    "s4",
    own=(HyperParam("group_sizes", "int_list", None, "blocks in G1..G4 (consecutive from block 0); None: the "
                    "spindle grouping 1:2:2:1", nullable=True),),
    fixed=("adapter.layers_to_transform", "lora.layers_to_transform", "lora.layers_pattern", "bitfit.bias_modules"),
    recipe=s4_part_settings,
))
