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

Xu et al.'s *unified* methods close the file, each a method of its own at the adapters' sites: **ProPETL** (Zeng et
al. 2023: one prototype adapter, per-layer binary masks), **AdaMix** (Wang et al. 2022: a mixture of adapters,
random routing in training, averaged weights at inference), **SparseAdapter** (He et al. 2022: adapters pruned at
initialisation). Neither peft nor AdapterHub has them; their defaults are the papers' (each cited where set).

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
from survey_utils.methods.adapters import (
    ACTIVATION_NAMES,
    adapter_memory_sites,
    adapter_sites,
    bottleneck_memory_terms,
    bottleneck_width,
)
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


def with_recipe(inner: Method, name: str, own: tuple[HyperParam, ...], fixed: tuple[str, ...],
                recipe: Any) -> Method:
    """``inner`` (a composition) whose hyper-parameters ``fixed`` are set by ``recipe(config, hp)`` from the
    hybrid's ``own`` hyper-parameters; every field of ``inner`` that reads hyper-parameters reads the rewrite,
    :attr:`Method.part_hyperparams` too (so the parts' settings on a model are a typed field, not a lookup by name)."""

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
    return replace(
        inner, name=name, hyperparams=tuple(h for h in inner.hyperparams if h.name not in fixed) + own,
        apply=apply, trainable_params=wrap(inner.trainable_params), memory_terms=wrap(inner.memory_terms),
        validate=wrap(inner.validate), gradient_sites=wrap(inner.gradient_sites),
        extra_positions=wrap(inner.extra_positions), frozen_added_params=frozen_added_params,
        unfrozen_params=wrap(inner.unfrozen_params),
        largest_trainable_tensor=wrap(inner.largest_trainable_tensor),
        part_hyperparams=wrap(inner.part_hyperparams),
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


# -------------------------------------------------------------- unified methods: ProPETL, AdaMix, SparseAdapter
# Xu et al. 2023's *unified* methods: one adapter design that carries a second idea inside it (a shared prototype
# with per-layer masks, a mixture of adapters, pruning at initialisation). Neither peft nor AdapterHub's `adapters`
# has any of them, so their counts are checked closed form against the built model only (tests/methods/
# test_hybrid.py). Each sits at the bottleneck adapters' sites (``adapters.adapter_sites``) and reuses their width
# rule, wrapper and saved-tensor terms; only the branch is its own (``layers/hybrid.py``).
UNIFIED = "unified"
NO_PEFT = ("Neither HF peft nor AdapterHub's adapters implements it: its count is tested closed form against the "
           "built model only.")


def _validated_by(closed_form: Any) -> Any:
    """``Method.validate`` by computing the count: the closed form raises the one-line ``SurveyError``."""
    def validate(config: PretrainedConfig, **hp: Any) -> None:
        closed_form(config, **hp)

    return validate


def _layers_hp() -> HyperParam:
    return HyperParam("layers_to_transform", "int_list", None, "block indices that get the method; None: all",
                      nullable=True)


def _unified_sites(config: PretrainedConfig, placement: str, layers_to_transform: list[int] | None) -> list[Any]:
    return [spec for spec, _ffn_in in adapter_sites(config, placement, layers_to_transform)]


def _width(config: PretrainedConfig, placement: str, layers_to_transform: list[int] | None,
           reduction_factor: float, bottleneck_size: int) -> tuple[int, int, int]:
    """``(d, k, sites)``: every site of these methods has the model's width, so one (d, k) serves them all."""
    from survey_utils.methods.common import model_label

    sites = _unified_sites(config, placement, layers_to_transform)
    widths = {spec.out_features for spec in sites}
    if len(widths) != 1:
        raise SurveyError(f"the adapter sites of {model_label(config)} have widths {sorted(widths)}; one shared "
                          "prototype needs one width")
    d = widths.pop()
    return d, bottleneck_width(d, reduction_factor, bottleneck_size), len(sites)


def _bottleneck_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                      placement: str, k: int, non_linearity: str, layers: list[int] | None) -> dict[str, int]:
    return bottleneck_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, placement, 1.0, k,
                                   non_linearity, layers)


# ----------------------------------------------------------------------------------------------- ProPETL
PROPETL_PLACEMENT = "pfeiffer"  # ProPETL-adapter on RoBERTa: adapter_config=pfeiffer (propetl-roberta/scripts)


def propetl_params(config: PretrainedConfig, reduction_factor: float, bottleneck_size: int, sparsity: float,
                   non_linearity: str, layers_to_transform: list[int] | None = None) -> int:
    r""":math:`(2dk + d + k) + L \cdot 2dk`: one prototype adapter for the model, and per adapted layer one real
    score per prototype weight (the masks are trained through them)."""
    d, k, sites = _width(config, PROPETL_PLACEMENT, layers_to_transform, reduction_factor, bottleneck_size)
    return 2 * d * k + d + k + sites * 2 * d * k


def propetl_stored_bytes(config: PretrainedConfig, param_bytes: int, reduction_factor: float, bottleneck_size: int,
                         layers_to_transform: list[int] | None = None, **_: Any) -> int:
    r"""What a trained ProPETL model adds to storage: the prototype once, in ``param_bytes`` per parameter, and per
    layer two binary masks at one bit per entry, :math:`2\lceil dk/8 \rceil` bytes (how the paper counts them)."""
    d, k, sites = _width(config, PROPETL_PLACEMENT, layers_to_transform, reduction_factor, bottleneck_size)
    return (2 * d * k + d + k) * param_bytes + sites * 2 * -(-d * k // 8)


def apply_propetl(model: nn.Module, reduction_factor: float, bottleneck_size: int, sparsity: float,
                  non_linearity: str, layers_to_transform: list[int] | None = None) -> nn.Module:
    r"""Zeng et al. 2023: one prototype adapter :math:`(W_\text{down}, b_\text{down}, W_\text{up}, b_\text{up})`
    shared by every layer; layer :math:`l` uses :math:`W \odot M_l` with its own binary masks (see
    :class:`~survey_utils.methods.layers.hybrid.MaskedPrototype`), :math:`h \leftarrow h + \Delta_l(h)` after the
    FFN (Pfeiffer placement)."""
    from survey_utils.methods.common import freeze
    from survey_utils.methods.layers.adapters import Bottleneck, insert_adapters
    from survey_utils.methods.layers.hybrid import MaskedPrototype

    freeze(model)
    d, k, _ = _width(model.config, PROPETL_PLACEMENT, layers_to_transform, reduction_factor, bottleneck_size)
    sites = adapter_sites(model.config, PROPETL_PLACEMENT, layers_to_transform)
    prototype = Bottleneck(d, k, non_linearity, model.get_submodule(sites[0][0].name).weight)
    return insert_adapters(model, sites, lambda width, like: MaskedPrototype(prototype, sparsity, like))


def propetl_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                         reduction_factor: float, bottleneck_size: int, sparsity: float, non_linearity: str,
                         layers_to_transform: list[int] | None = None) -> dict[str, int]:
    r"""A bottleneck adapter's terms, plus per layer the two masks :math:`M_l` and the two masked weights
    :math:`W \odot M_l` it builds (:math:`4dk` values: the product saves the mask, the linear map the product)."""
    d, k, sites = _width(config, PROPETL_PLACEMENT, layers_to_transform, reduction_factor, bottleneck_size)
    terms = _bottleneck_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, PROPETL_PLACEMENT, k,
                              non_linearity, layers_to_transform)
    terms["masks and masked prototype weights"] = sites * 4 * d * k * adapter_bytes
    return terms


PROPETL = register(Method(
    name="propetl", title="ProPETL adapter (shared prototype, per-layer binary masks)",
    paper="Zeng et al. 2023, One Network, Many Masks: Towards More Parameter-Efficient Transfer Learning (ACL 2023)",
    arxiv_id="2305.17682", taxonomy=Taxonomy(xu=UNIFIED, wang="hybrid", lialin=NOT_PLACED), chapter=CHAPTER,
    hyperparams=(
        HyperParam("reduction_factor", "float", 12.0, "prototype bottleneck k = hidden_size // reduction_factor "
                   "(ProPETL's RoBERTa script: 12)", minimum=0.5, maximum=1024),
        HyperParam("bottleneck_size", "int", 0, "prototype width k; 0 takes hidden_size // reduction_factor",
                   minimum=0, maximum=16384),
        HyperParam("sparsity", "float", 0.5, "fraction of the prototype's weights each layer's mask drops "
                   "(ProPETL: 0.5)", minimum=0.0, maximum=0.99),
        HyperParam("non_linearity", "str", "relu", "activation f of the prototype (AdapterHub's Pfeiffer: relu)",
                   choices=ACTIVATION_NAMES),
        _layers_hp(),
    ),
    apply=apply_propetl, trainable_params=propetl_params, memory_terms=propetl_memory_terms,
    validate=_validated_by(propetl_params),
    gradient_sites=lambda config, **hp: _unified_sites(config, PROPETL_PLACEMENT, hp["layers_to_transform"]),
    largest_trainable_tensor=lambda config, **hp: (lambda d, k, _: d * k)(
        *_width(config, PROPETL_PLACEMENT, hp["layers_to_transform"], hp["reduction_factor"], hp["bottleneck_size"])),
    param_prefixes=("propetl_", "prototype."),
    notes="Trainable while training: the prototype and every layer's scores; stored after: the prototype and "
          "one bit per mask entry (propetl_stored_bytes). " + NO_PEFT,
))


# ------------------------------------------------------------------------------------------------ AdaMix
ADAMIX_PLACEMENT = "pfeiffer"  # AdaMix's ExpertSoup sits after the FFN's output projection (RobertaOutput)


def adamix_params(config: PretrainedConfig, bottleneck_size: int, num_experts: int, share_down: bool,
                  share_up: bool, non_linearity: str, layers_to_transform: list[int] | None = None) -> int:
    r""":math:`\sum_\text{sites} [E_\downarrow (dk + k) + E_\uparrow (kd + d)]`, :math:`E_\downarrow = 1` when the
    down-projection is shared, else :math:`E` (likewise up)."""
    d, k, sites = _width(config, ADAMIX_PLACEMENT, layers_to_transform, 1.0, bottleneck_size)
    down, up = (1 if share_down else num_experts), (1 if share_up else num_experts)
    return sites * (down * (d * k + k) + up * (k * d + d))


def apply_adamix(model: nn.Module, bottleneck_size: int, num_experts: int, share_down: bool, share_up: bool,
                 non_linearity: str, layers_to_transform: list[int] | None = None) -> nn.Module:
    r"""Wang et al. 2022: :math:`h \leftarrow h + \Delta(h)` after the FFN, :math:`\Delta` a mixture of
    adapters routed at random in training and averaged at inference
    (:class:`~survey_utils.methods.layers.hybrid.MixtureOfAdapters`)."""
    from survey_utils.methods.common import freeze
    from survey_utils.methods.layers.adapters import insert_adapters
    from survey_utils.methods.layers.hybrid import MixtureOfAdapters

    freeze(model)
    sites = adapter_sites(model.config, ADAMIX_PLACEMENT, layers_to_transform)
    seeds = iter(range(len(sites)))  # each site routes with its own stream
    return insert_adapters(model, sites, lambda width, like: MixtureOfAdapters(
        width, bottleneck_size, num_experts, share_down, share_up, non_linearity, like, seed=next(seeds)))


def adamix_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                        bottleneck_size: int, non_linearity: str, layers_to_transform: list[int] | None = None,
                        **_: Any) -> dict[str, int]:
    """One expert runs per step: a bottleneck adapter's saved tensors (the unchosen experts save nothing)."""
    return _bottleneck_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, ADAMIX_PLACEMENT,
                             bottleneck_size, non_linearity, layers_to_transform)


ADAMIX = register(Method(
    name="adamix", title="AdaMix (mixture of adapters, averaged for inference)",
    paper="Wang et al. 2022, AdaMix: Mixture-of-Adaptations for Parameter-efficient Model Tuning (EMNLP 2022)",
    arxiv_id="2205.12410", taxonomy=Taxonomy(xu=UNIFIED, wang="multi-task", lialin="A:adapters"), chapter=CHAPTER,
    hyperparams=(
        HyperParam("bottleneck_size", "int", 16, "adapter width k (AdaMix's adapter_size: 16)", minimum=1,
                   maximum=16384),
        HyperParam("num_experts", "int", 4, "adapters in the mixture E (AdaMix: 4)", minimum=1, maximum=64),
        HyperParam("share_down", "bool", False, "one down-projection for all experts (AdaMix's sharing_down: 0)"),
        HyperParam("share_up", "bool", True, "one up-projection for all experts (AdaMix's sharing_up: 1)"),
        HyperParam("non_linearity", "str", "gelu", "activation f (AdaMix: gelu)", choices=ACTIVATION_NAMES),
        _layers_hp(),
    ),
    apply=apply_adamix, trainable_params=adamix_params, memory_terms=adamix_memory_terms,
    validate=_validated_by(adamix_params),
    gradient_sites=lambda config, **hp: _unified_sites(config, ADAMIX_PLACEMENT, hp["layers_to_transform"]),
    largest_trainable_tensor=lambda config, **hp: (lambda d, k, _: d * k)(
        *_width(config, ADAMIX_PLACEMENT, hp["layers_to_transform"], 1.0, hp["bottleneck_size"])),
    param_prefixes=("adamix_",),
    notes="Defaults from microsoft/AdaMix's README (adapter_size 16, num_experts 4, sharing_up 1, sharing_down 0, "
          "inference_level 3 = weight averaging). Served as one averaged adapter. " + NO_PEFT,
))


# ----------------------------------------------------------------------------------------- SparseAdapter
def sparse_kept(numel: int, sparsity: float) -> int:
    """Entries a pruned weight keeps: :math:`n - \\lfloor s\\,n \\rfloor`."""
    return numel - int(sparsity * numel)


def sparse_adapter_params(config: PretrainedConfig, placement: str, reduction_factor: float, bottleneck_size: int,
                          sparsity: float, layers_to_transform: list[int] | None = None, **_: Any) -> int:
    r""":math:`\sum_\text{adapters} [2\,(dk - \lfloor s\,dk \rfloor) + d + k]`: both weights pruned to
    :math:`1 - s` of their entries, the biases dense."""
    total = 0
    for spec in _unified_sites(config, placement, layers_to_transform):
        d = spec.out_features
        k = bottleneck_width(d, reduction_factor, bottleneck_size)
        total += 2 * sparse_kept(d * k, sparsity) + d + k
    return total


def apply_sparse_adapter(model: nn.Module, placement: str, reduction_factor: float, bottleneck_size: int,
                         sparsity: float, non_linearity: str, seed: int,
                         layers_to_transform: list[int] | None = None) -> nn.Module:
    r"""He et al. 2022: a bottleneck adapter :math:`h \leftarrow h + W_\text{up} f(W_\text{down} h + b) + b'` whose
    weights are pruned to :math:`1 - s` of their entries before training; only the kept entries train
    (:class:`~survey_utils.methods.layers.hybrid.SparseBottleneck`)."""
    from survey_utils.methods.common import freeze
    from survey_utils.methods.layers.adapters import insert_adapters
    from survey_utils.methods.layers.hybrid import SparseBottleneck

    freeze(model)
    sites = adapter_sites(model.config, placement, layers_to_transform)
    seeds = iter(range(seed, seed + 2 * len(sites), 2))

    def make(width: int, like: Any) -> Any:
        k = bottleneck_width(width, reduction_factor, bottleneck_size)
        return SparseBottleneck(width, k, sparse_kept(width * k, sparsity), non_linearity, next(seeds), like)

    return insert_adapters(model, sites, make)


def sparse_adapter_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                                adapter_bytes: int, placement: str, reduction_factor: float, bottleneck_size: int,
                                sparsity: float, non_linearity: str, seed: int,
                                layers_to_transform: list[int] | None = None) -> dict[str, int]:
    """A bottleneck adapter's terms, plus per adapter the two dense weights rebuilt from the kept values (each
    linear map saves its weight) and the kept positions (int64 buffers, held for the whole step)."""
    terms = bottleneck_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, placement,
                                    reduction_factor, bottleneck_size, non_linearity, layers_to_transform)
    dense = index = 0
    for spec in _unified_sites(config, placement, layers_to_transform):
        dk = spec.out_features * bottleneck_width(spec.out_features, reduction_factor, bottleneck_size)
        dense += 2 * dk * adapter_bytes
        index += 2 * 8 * sparse_kept(dk, sparsity)
    terms["dense weights rebuilt from kept entries"] = dense
    terms["kept positions (int64)"] = index
    return terms


SPARSE_ADAPTER = register(Method(
    name="sparse_adapter", title="SparseAdapter (adapters pruned at initialisation)",
    paper="He et al. 2022, SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters "
          "(Findings of EMNLP 2022)",
    arxiv_id="2210.04284", taxonomy=Taxonomy(xu=UNIFIED, wang=NOT_PLACED, lialin="A:adapters+S"), chapter=CHAPTER,
    hyperparams=(
        HyperParam("sparsity", "float", 0.4, "fraction of each adapter weight pruned at initialisation (Lialin et "
                   "al.: about 40%)", minimum=0.0, maximum=0.99),
        HyperParam("placement", "str", "pfeiffer", "adapter architecture (houlsby: two per block; pfeiffer: after "
                   "the FFN)", choices=("houlsby", "pfeiffer")),
        HyperParam("bottleneck_size", "int", 0, "bottleneck width k; 0 takes hidden_size // reduction_factor "
                   "(Large-Sparse: raise it with the sparsity)", minimum=0, maximum=16384),
        HyperParam("reduction_factor", "float", 16.0, "k = hidden_size // reduction_factor (AdapterHub's "
                   "Pfeiffer default)", minimum=0.5, maximum=1024),
        HyperParam("non_linearity", "str", "relu", "activation f between the projections", choices=ACTIVATION_NAMES),
        HyperParam("seed", "int", 0, "seed of the random pruning (which entries survive; never how many)",
                   minimum=0, maximum=2**31 - 1),
        _layers_hp(),
    ),
    apply=apply_sparse_adapter, trainable_params=sparse_adapter_params, memory_terms=sparse_adapter_memory_terms,
    validate=_validated_by(sparse_adapter_params),
    gradient_sites=lambda config, **hp: _unified_sites(config, hp["placement"], hp["layers_to_transform"]),
    param_prefixes=("sparse_",),
    notes="Random pruning (the paper's rand pruner; SNIP, its other choice, needs a batch of data and keeps as "
          "many entries). " + NO_PEFT,
))
