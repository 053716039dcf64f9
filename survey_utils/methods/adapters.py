r"""Additive methods I: bottleneck adapters and other added modules (chapter 01_additive_adapters).

All three surveys put these methods in the *additive* family (Lialin et al. 2023: region ``A``): the
pretrained weights stay frozen and small new modules are inserted into the network.

- bottleneck adapters: :math:`h \leftarrow h + W_\text{up}\, f(W_\text{down} h + b_\text{down}) + b_\text{up}`,
  placed after the attention output and the FFN (Houlsby), after the FFN only (Pfeiffer), or beside the
  FFN with a scale (parallel, He et al.); AdapterDrop removes them from the lowest layers; Compacter builds
  their weights from shared Kronecker factors;
- (IA)^3 rescales keys, values and the FFN's inner activations with learned vectors;
- Ladder Side-Tuning trains a thin side network beside a frozen backbone it never backpropagates through.

Where the adapters go is derived from ``architecture.layout``: in each block, the *attention output* is the
last linear module of the block's first attention group (``o_proj``, ``c_proj``, ``attention.output.dense``,
T5's ``SelfAttention.o``), the *FFN input* is the block's first MLP linear module and the *FFN output* its
last (``down_proj``, ``mlp.c_proj``, ``output.dense``, ``wo``, ``fc2``, ``dense_4h_to_h``). T5's encoder
and decoder blocks both get adapters; ``layers_to_transform`` uses peft's block index (``block.3``), so
it selects that block in both stacks. Adapters cannot be merged into the base weights: their inference
cost is measured by ``benchmarks/adapter_inference_overhead.py``.

The nn.Module layers live in ``layers/adapters.py``, imported inside ``apply``: this file, with every
closed form, loads without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import Layout, ModuleSpec, layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import LINEAR_KINDS, freeze, model_label, replace_module, target_specs
from survey_utils.methods.peft_mappings import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register
from survey_utils.targeting import layer_index, num_blocks

if TYPE_CHECKING:  # typing only: the layers (and torch) are imported inside ``apply``
    from torch import nn
    from transformers import PretrainedConfig

ACTIVATION_NAMES = ("relu", "gelu", "swish", "silu", "tanh")  # the activations layers/adapters.py builds
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")

# ---------------------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class BlockSites:
    """The modules of one transformer block that adapters attach to."""

    block: int  # the index peft's layers_to_transform reads from the name (shared by T5's two stacks)
    attention_out: ModuleSpec
    ffn_in: ModuleSpec
    ffn_out: ModuleSpec


def block_sites(config: PretrainedConfig) -> list[BlockSites]:
    """Attention output, FFN input and FFN output of every block, found in the config's layout."""
    shape = layout(config)
    hit = _SITES.get(id(shape))
    if hit is None or hit[0] is not shape:  # layouts are immutable and cached: keep the answer beside them
        if len(_SITES) >= 256:
            _SITES.clear()
        hit = _SITES[id(shape)] = (shape, tuple(_block_sites(config, shape)))
    return list(hit[1])


_SITES: dict[int, tuple[Layout, tuple[BlockSites, ...]]] = {}


def _block_sites(config: PretrainedConfig, shape: Layout) -> list[BlockSites]:
    groups: dict[int, list[ModuleSpec]] = {}
    for spec in shape.modules:
        if spec.layer is not None:
            groups.setdefault(spec.layer, []).append(spec)
    sites = []
    for specs in groups.values():
        attention, started = None, False
        for spec in specs:
            if spec.component == "attention":
                started = True
                attention = spec if spec.kind in LINEAR_KINDS else attention
            elif started:
                break
        mlp = [s for s in specs if s.component == "mlp" and s.kind in LINEAR_KINDS]
        if attention is None or not mlp:
            raise SurveyError(f"{model_label(config)} has a block without attention output or FFN projections")
        sites.append(BlockSites(layer_index(attention.name), attention, mlp[0], mlp[-1]))
    return sites


def adapter_sites(config: PretrainedConfig, placement: str, layers_to_transform: list[int] | None = None,
                  drop_layers: int = 0) -> list[tuple[ModuleSpec, ModuleSpec | None]]:
    """``(module whose output is adapted, FFN input module for parallel adapters or None)`` per adapter."""
    if placement not in PLACEMENTS:
        raise SurveyError(f"placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    blocks = num_blocks(layout(config))
    for index in layers_to_transform or []:
        if not 0 <= index < blocks:
            raise SurveyError(f"layer {index} out of range: {model_label(config)} has {blocks} blocks (0-{blocks - 1})")
    if drop_layers >= blocks:
        raise SurveyError(f"drop_layers={drop_layers} leaves no adapter: {model_label(config)} has {blocks} blocks")
    chosen = []
    for site in block_sites(config):
        if site.block < drop_layers or (layers_to_transform and site.block not in layers_to_transform):
            continue
        if placement == "houlsby":
            chosen.append((site.attention_out, None))
        chosen.append((site.ffn_out, site.ffn_in if placement == "parallel" else None))
    return chosen


def bottleneck_width(width: int, reduction_factor: float, bottleneck_size: int) -> int:
    """``bottleneck_size`` when set (> 0), else ``hidden // reduction_factor`` (AdapterHub's rule)."""
    size = bottleneck_size or int(width // reduction_factor)
    if size < 1:
        raise SurveyError(f"reduction_factor={reduction_factor:g} leaves an empty bottleneck for hidden size {width}")
    return size


# --------------------------------------------------------------- Houlsby, Pfeiffer, parallel, AdapterDrop


def apply_bottleneck(model: nn.Module, placement: str, reduction_factor: float, bottleneck_size: int,
                     non_linearity: str, layers_to_transform: list[int] | None = None, scaling: float = 1.0,
                     drop_layers: int = 0) -> nn.Module:
    """Freeze ``model`` and insert bottleneck adapters at ``placement`` (see :func:`adapter_sites`)."""
    from survey_utils.methods.layers.adapters import Bottleneck, insert_adapters

    freeze(model)
    sites = adapter_sites(model.config, placement, layers_to_transform, drop_layers)
    return insert_adapters(model, sites, lambda width, like: Bottleneck(
        width, bottleneck_width(width, reduction_factor, bottleneck_size), non_linearity, like), scaling)


def bottleneck_params(config: PretrainedConfig, placement: str, reduction_factor: float, bottleneck_size: int,
                      layers_to_transform: list[int] | None = None, drop_layers: int = 0, **_: Any) -> int:
    r""":math:`\sum_\text{adapters} (2dk + d + k)`, :math:`k` the bottleneck, :math:`d` the hidden size."""
    total = 0
    for spec, _ffn_in in adapter_sites(config, placement, layers_to_transform, drop_layers):
        d = spec.out_features
        k = bottleneck_width(d, reduction_factor, bottleneck_size)
        total += 2 * d * k + d + k
    return total


def bottleneck_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                            adapter_bytes: int, placement: str, reduction_factor: float, bottleneck_size: int,
                            non_linearity: str, layers_to_transform: list[int] | None = None, drop_layers: int = 0,
                            **_: Any) -> dict[str, int]:
    """Bytes the adapters save for backward: each adapter's input (its down-projection needs it for the
    weight gradient; the frozen backbone does not keep it) and the bottleneck activations (ReLU and tanh
    save their output, which the up-projection saves too: one tensor; GELU and SiLU save their input as
    well: two). Blocks below AdapterDrop's first adapter save nothing either; that saving of the
    backbone's own activations is not in these terms."""
    t = batch_size * seq_len
    tensors = 1 if non_linearity in ("relu", "tanh") else 2
    inputs = inner = 0
    for spec, _ffn_in in adapter_sites(config, placement, layers_to_transform, drop_layers):
        d = spec.out_features
        inputs += adapter_bytes * t * d
        inner += tensors * adapter_bytes * t * bottleneck_width(d, reduction_factor, bottleneck_size)
    return {"adapter inputs": inputs, "bottleneck activations": inner}


def adapter_memory_sites(config: PretrainedConfig, placement: str, layers_to_transform: list[int] | None = None,
                         drop_layers: int = 0, **_: Any) -> list[ModuleSpec]:
    """The modules whose outputs the adapters join (``Method.gradient_sites``): the memory estimate
    starts back-propagation at the lowest one, so the blocks below it save nothing for backward."""
    return [spec for spec, _ffn_in in adapter_sites(config, placement, layers_to_transform, drop_layers)]


def _validate_bottleneck(config: PretrainedConfig, **hp: Any) -> None:
    bottleneck_params(config, **hp)


def _fixed_placement(placement: str) -> dict[str, Any]:
    """The registration fields a bottleneck method with one fixed placement shares with the others."""
    return {
        "validate": lambda config, **hp: _validate_bottleneck(config, placement=placement, **hp),
        "memory_terms": lambda config, b, s, a, tb, **hp: bottleneck_memory_terms(config, b, s, a, tb, placement,
                                                                                  **hp),
        "gradient_sites": lambda config, **hp: adapter_memory_sites(config, placement, **hp),
        "param_prefixes": ("adapter_",),
    }


def _check(_result: Any) -> None:
    """Validation by computing the count: the closed forms raise ``SurveyError`` for bad values."""


def _bottleneck_hps(reduction_factor: float, non_linearity: str, layers: bool = True) -> tuple[HyperParam, ...]:
    hps = (
        HyperParam("bottleneck_size", "int", 0, "bottleneck width k; 0 takes hidden_size // reduction_factor",
                   minimum=0, maximum=16384),
        HyperParam("reduction_factor", "float", reduction_factor,
                   "bottleneck k = hidden_size // reduction_factor (used when bottleneck_size is 0)",
                   minimum=0.5, maximum=1024),
        HyperParam("non_linearity", "str", non_linearity, "activation f between the projections",
                   choices=ACTIVATION_NAMES),
    )
    layer_hp = HyperParam("layers_to_transform", "int_list", None, "block indices that get adapters; None: all",
                          nullable=True)
    return (*hps, layer_hp) if layers else hps


_ADAPTER_TAXONOMY = Taxonomy(xu="additive / adapter-based", wang="additive / adapter", lialin="A:adapters")


def _houlsby(model: nn.Module, **hp: Any) -> nn.Module:
    r"""Houlsby et al. 2019: :math:`h \leftarrow h + W_\text{up} f(W_\text{down} h)` after attention and after the FFN."""
    return apply_bottleneck(model, "houlsby", **hp)


def _houlsby_params(config: PretrainedConfig, **hp: Any) -> int:
    """Two bottleneck adapters per block, :math:`2dk + d + k` each."""
    return bottleneck_params(config, "houlsby", **hp)


def _pfeiffer(model: nn.Module, **hp: Any) -> nn.Module:
    r"""Pfeiffer et al. 2021: one serial adapter :math:`h \leftarrow h + W_\text{up} f(W_\text{down} h)` after the FFN."""
    return apply_bottleneck(model, "pfeiffer", **hp)


def _pfeiffer_params(config: PretrainedConfig, **hp: Any) -> int:
    """One bottleneck adapter per block, :math:`2dk + d + k`."""
    return bottleneck_params(config, "pfeiffer", **hp)


def _parallel(model: nn.Module, **hp: Any) -> nn.Module:
    r"""He et al. 2022: :math:`y = \mathrm{FFN}(x) + s\,W_\text{up} f(W_\text{down} x)`, beside the FFN."""
    return apply_bottleneck(model, "parallel", **hp)


def _parallel_params(config: PretrainedConfig, **hp: Any) -> int:
    """One parallel bottleneck adapter per block, :math:`2dk + d + k`."""
    return bottleneck_params(config, "parallel", **hp)


def _adapterdrop(model: nn.Module, placement: str, **hp: Any) -> nn.Module:
    """Rücklé et al. 2021: the chosen adapter placement, with no adapters in the lowest ``drop_layers`` blocks."""
    return apply_bottleneck(model, placement, **hp)


# Defaults are AdapterHub's configs (DoubleSeqBnConfig, SeqBnConfig, ParBnConfig, CompacterConfig).
register(Method(
    name="houlsby", title="Houlsby adapter (serial, two per block)",
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (ICML 2019)",
    arxiv_id="1902.00751", taxonomy=_ADAPTER_TAXONOMY, chapter="01_additive_adapters",
    hyperparams=_bottleneck_hps(16.0, "swish"),
    apply=_houlsby, trainable_params=_houlsby_params,
    **_fixed_placement("houlsby"),
    notes="after the attention output projection and after the FFN output projection of every block",
))
register(Method(
    name="pfeiffer", title="Pfeiffer adapter (serial, after the FFN)",
    paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning (EACL 2021)",
    arxiv_id="2005.00247",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin="A:adapters"), chapter="01_additive_adapters",
    hyperparams=_bottleneck_hps(16.0, "relu"),
    apply=_pfeiffer, trainable_params=_pfeiffer_params,
    **_fixed_placement("pfeiffer"),
    notes="one adapter per block, after the FFN output projection",
))
register(Method(
    name="parallel_adapter", title="Parallel adapter (beside the FFN, scaled)",
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (ICLR 2022)",
    arxiv_id="2110.04366", taxonomy=_ADAPTER_TAXONOMY, chapter="01_additive_adapters",
    hyperparams=(*_bottleneck_hps(2.0, "relu"),
                 HyperParam("scaling", "float", 4.0, "scale s of the adapter branch", minimum=0, maximum=100)),
    apply=_parallel, trainable_params=_parallel_params,
    **_fixed_placement("parallel"),
    notes="y = FFN(x) + s * adapter(x), with x the FFN's input",
))
register(Method(
    name="adapterdrop", title="AdapterDrop (no adapters in the lowest blocks)",
    paper="Rücklé et al. 2021, AdapterDrop: On the Efficiency of Adapters in Transformers (EMNLP 2021)",
    arxiv_id="2010.11918",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED), chapter="01_additive_adapters",
    hyperparams=(
        HyperParam("drop_layers", "int", 5, "adapters are removed from blocks 0..drop_layers-1 (the paper's "
                   "example drops the first five)", minimum=0, maximum=128),
        HyperParam("placement", "str", "pfeiffer", "adapter architecture kept in the upper blocks",
                   choices=("houlsby", "pfeiffer")),
        *_bottleneck_hps(16.0, "relu", layers=False),
    ),
    apply=_adapterdrop, trainable_params=bottleneck_params, validate=_validate_bottleneck,
    memory_terms=bottleneck_memory_terms, gradient_sites=adapter_memory_sites,
    param_prefixes=("adapter_",),
    notes="static AdapterDrop: backward stops at the lowest adapted block, which is its training speed-up",
))


# ------------------------------------------------------------------------------------------- Compacter


def apply_compacter(model: nn.Module, phm_dim: int, phm_rank: int, placement: str, reduction_factor: float,
                    bottleneck_size: int, non_linearity: str, layers_to_transform: list[int] | None = None) -> nn.Module:
    """Freeze ``model`` and insert Compacter adapters; the rule :math:`A` is created once and shared."""
    from survey_utils.methods.layers.adapters import CompacterBottleneck, PHMRule, insert_adapters

    freeze(model)
    sites = adapter_sites(model.config, placement, layers_to_transform)
    rule = PHMRule(phm_dim, model.get_submodule(sites[0][0].name).weight)
    return insert_adapters(model, sites, lambda width, like: CompacterBottleneck(
        width, bottleneck_width(width, reduction_factor, bottleneck_size), phm_rank, rule, non_linearity, like))


def compacter_params(config: PretrainedConfig, phm_dim: int, phm_rank: int, placement: str,
                     reduction_factor: float, bottleneck_size: int, layers_to_transform: list[int] | None = None,
                     **_: Any) -> int:
    r""":math:`n^3 + \sum_\text{adapters} [2r(d + k) + d + k]`: the shared rule is counted once."""
    total = phm_dim ** 3
    for spec, _ffn_in in adapter_sites(config, placement, layers_to_transform):
        d = spec.out_features
        k = bottleneck_width(d, reduction_factor, bottleneck_size)
        for width in (d, k):
            if width % phm_dim:
                raise SurveyError(f"phm_dim={phm_dim} must divide the hidden size {d} and the bottleneck {k}")
        total += 2 * phm_rank * (d + k) + d + k
    return total


def compacter_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                           adapter_bytes: int, phm_dim: int, phm_rank: int, **hp: Any) -> dict[str, int]:
    """A bottleneck adapter's terms plus the two materialised Kronecker weights per adapter (d x k each)."""
    terms = bottleneck_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, **hp)
    terms["Kronecker weights"] = sum(
        2 * adapter_bytes * spec.out_features * bottleneck_width(spec.out_features, hp["reduction_factor"],
                                                                 hp["bottleneck_size"])
        for spec, _ in adapter_sites(config, hp["placement"], hp["layers_to_transform"]))
    return terms


register(Method(
    name="compacter", title="Compacter (Kronecker-factored adapters)",
    paper="Mahabadi et al. 2021, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers (NeurIPS 2021)",
    arxiv_id="2106.04647",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="additive / adapter", lialin="A:adapters+R"),
    chapter="01_additive_adapters",
    hyperparams=(
        HyperParam("phm_dim", "int", 4, "n: number of Kronecker summands and size of the shared A_i",
                   minimum=1, maximum=64),
        HyperParam("phm_rank", "int", 1, "rank r of each layer's factor s_i t_i^T", minimum=1, maximum=64),
        HyperParam("placement", "str", "houlsby", "houlsby: two per block (Compacter); pfeiffer: after the "
                   "FFN only (Compacter++)", choices=("houlsby", "pfeiffer")),
        *_bottleneck_hps(32.0, "gelu"),
    ),
    apply=apply_compacter, trainable_params=compacter_params,
    memory_terms=compacter_memory_terms, gradient_sites=adapter_memory_sites,
    validate=lambda config, **hp: _check(compacter_params(config, **hp)),
    param_prefixes=("phm_",),
    notes="the n x n x n rule A is shared by every PHM layer and counted once",
))


# ------------------------------------------------------------------------------------------------ (IA)^3


def ia3_defaults(config: PretrainedConfig, target_modules: Any, feedforward_modules: Any) -> tuple[Any, Any]:
    """peft's per-architecture defaults (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``, snapshot in
    :mod:`~survey_utils.methods.peft_mappings`) for ``None`` values."""
    for value, table, name in ((target_modules, IA3_TARGET_MODULES, "target_modules"),
                               (feedforward_modules, IA3_FEEDFORWARD_MODULES, "feedforward_modules")):
        if value is None and config.model_type not in table:
            raise SurveyError(f"peft has no default {name} for model type '{config.model_type}'; set {name}")
    targets = list(IA3_TARGET_MODULES[config.model_type]) if target_modules is None else target_modules
    feedforward = (list(IA3_FEEDFORWARD_MODULES[config.model_type]) if feedforward_modules is None
                   else feedforward_modules)
    if isinstance(target_modules, list) and isinstance(feedforward_modules, list):
        extra = sorted(set(feedforward_modules) - set(target_modules))
        if extra:
            raise SurveyError(f"feedforward_modules {extra} must also be in target_modules {target_modules}")
    return targets, feedforward


def is_feedforward(name: str, feedforward_modules: Any) -> bool:
    """peft's rule: a regex must match the whole name; a list entry matches any name ending with it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(key) for key in feedforward_modules)


def ia3_specs(config: PretrainedConfig, target_modules: Any, feedforward_modules: Any) -> list[tuple[ModuleSpec, bool]]:
    targets, feedforward = ia3_defaults(config, target_modules, feedforward_modules)
    specs = target_specs(config, "ia3", {"target_modules": targets})
    return [(spec, is_feedforward(spec.name, feedforward)) for spec in specs]


def apply_ia3(model: nn.Module, target_modules: Any, feedforward_modules: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target in :class:`~survey_utils.methods.layers.adapters.IA3Layer`."""
    from survey_utils.methods.layers.adapters import IA3Layer

    freeze(model)
    for spec, feedforward in ia3_specs(model.config, target_modules, feedforward_modules):
        replace_module(model, spec.name, IA3Layer(model.get_submodule(spec.name), feedforward))
    return model


def ia3_params(config: PretrainedConfig, target_modules: Any, feedforward_modules: Any) -> int:
    r""":math:`\sum_\text{targets} d_{out}` + :math:`\sum_\text{feedforward targets} d_{in}`."""
    return sum(s.in_features if ff else s.out_features for s, ff in ia3_specs(config, target_modules, feedforward_modules))


def ia3_peft_config(config: PretrainedConfig, target_modules: Any, feedforward_modules: Any) -> Any:
    from peft import IA3Config

    specs = ia3_specs(config, target_modules, feedforward_modules)
    return IA3Config(target_modules=target_modules, feedforward_modules=feedforward_modules,
                     fan_in_fan_out=any(spec.kind == "conv1d" for spec, _ in specs))


def ia3_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                     target_modules: Any, feedforward_modules: Any) -> dict[str, int]:
    """Each rescaling saves the tensor it multiplies (for the vector's gradient): a key/value target's
    output in the model dtype, a feedforward target's input in the vector's dtype (peft's casts)."""
    t = batch_size * seq_len
    outputs = inputs = 0
    for spec, feedforward in ia3_specs(config, target_modules, feedforward_modules):
        if feedforward:
            inputs += adapter_bytes * t * spec.in_features
        else:
            outputs += act_bytes * t * spec.out_features
    return {"rescaled outputs (k, v)": outputs, "rescaled FFN inputs": inputs}


register(Method(
    name="ia3", title="(IA)^3 (learned rescaling vectors)",
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
          "Learning (NeurIPS 2022)",
    arxiv_id="2205.05638",
    taxonomy=Taxonomy(xu="additive / others", wang="additive / scale and shift", lialin="A"),
    chapter="01_additive_adapters",
    hyperparams=(
        HyperParam("target_modules", "targets", None, "modules whose output (or input, for feedforward ones) is "
                   "rescaled; None takes peft's default for the architecture (keys, values, FFN down)",
                   nullable=True),
        HyperParam("feedforward_modules", "targets", None, "targets whose input is rescaled; None takes peft's "
                   "default for the architecture", nullable=True),
    ),
    apply=apply_ia3, trainable_params=ia3_params, peft_config=ia3_peft_config,
    memory_terms=ia3_memory_terms,
    validate=lambda config, **hp: _check(ia3_specs(config, **hp)),
    param_prefixes=("ia3_",), mergeable=True,
    peft_param_map={"ia3_l": "ia3_l.default"},
    default_targets=lambda config: dict(zip(("target_modules", "feedforward_modules"),
                                            ia3_defaults(config, None, None), strict=True)),
))


# ------------------------------------------------------------------------------------ Ladder Side-Tuning


@dataclass(frozen=True)
class Stack:
    """A list of transformer blocks (T5 has two) and the norm after it, as named in the layout."""

    key: str  # "model.layers", "encoder.block", ...
    blocks: int
    final_norm: str | None  # None: the side output is added to the last block's output (BERT)


def stacks(config: PretrainedConfig) -> list[Stack]:
    """The block stacks of the layout, each with its final norm (a layer-less norm under the stack's root)."""
    shape = layout(config)
    counts: dict[str, set[int]] = {}
    for spec in shape.modules:
        match = re.match(r"(?P<stack>.*?\.[^.]*)\.(?P<idx>\d+)\.", spec.name) if spec.layer is not None else None
        if match:
            counts.setdefault(match["stack"], set()).add(int(match["idx"]))
    found = []
    for key, indices in counts.items():
        root = key.rsplit(".", 1)[0]
        norms = [s.name for s in shape.modules if s.kind == "norm" and s.layer is None
                 and s.name.rsplit(".", 1)[0] == root and "embed" not in s.name]
        found.append(Stack(key, len(indices), norms[-1] if norms else None))
    return found


def _lst_widths(config: PretrainedConfig, reduction_factor: int) -> tuple[int, int, int]:
    shape = layout(config)
    width, inner = shape.hidden_size // reduction_factor, shape.intermediate_size // reduction_factor
    if width < 1 or inner < 1:
        raise SurveyError(f"reduction_factor={reduction_factor} leaves an empty side network for hidden size "
                          f"{shape.hidden_size}")
    return shape.hidden_size, width, inner


def apply_lst(model: nn.Module, reduction_factor: int, gate_temperature: float) -> nn.Module:
    """Freeze ``model``, attach one side network per stack as ``model.lst_side`` and hook the blocks."""
    from survey_utils.methods.layers.adapters import attach_side_networks

    freeze(model)
    hidden, width, inner = _lst_widths(model.config, reduction_factor)
    return attach_side_networks(model, stacks(model.config), hidden, width, inner, gate_temperature)


def lst_params(config: PretrainedConfig, reduction_factor: int, **_: Any) -> int:
    r"""Per stack of :math:`L` blocks: :math:`(L+1)(dw + w) + L + L(2w + 2wf + f + w) + wd + d`."""
    d, w, f = _lst_widths(config, reduction_factor)
    per_block = 2 * w + (w * f + f) + (f * w + w)
    return sum((s.blocks + 1) * (d * w + w) + s.blocks + s.blocks * per_block + w * d + d for s in stacks(config))


def lst_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                     reduction_factor: int, **_: Any) -> dict[str, int]:
    """What LST keeps for backward: the L+1 backbone states its ladder reads (the down-projections need them
    for their weight gradients) and the side network's own activations; the backbone's internal
    activations (attention, FFN, norms) are not kept, which is LST's saving (``backprop_through_backbone``
    is False, so the memory model counts no backbone activations)."""
    d, w, f = _lst_widths(config, reduction_factor)
    t = batch_size * seq_len
    ladder = side = 0
    for stack in stacks(config):
        ladder += (stack.blocks + 1) * t * d * adapter_bytes  # in the side dtype: a cast copy if it differs
        # per rung: gate mix (state and ladder output), LayerNorm input and statistics, fc1 input,
        # GELU input and fc2 input; then the up-projection's input.
        side += stack.blocks * (adapter_bytes * t * (4 * w + 2 * f) + 8 * t) + adapter_bytes * t * w
    return {"ladder inputs (backbone states)": ladder, "side network": side}


register(Method(
    name="lst", title="Ladder Side-Tuning",
    paper="Sung et al. 2022, LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning "
          "(NeurIPS 2022)",
    arxiv_id="2206.06522",
    taxonomy=Taxonomy(xu="additive / others", wang=NOT_PLACED, lialin="A"), chapter="01_additive_adapters",
    hyperparams=(
        HyperParam("reduction_factor", "int", 8, "side network width = hidden_size // reduction_factor",
                   minimum=1, maximum=1024),
        HyperParam("gate_temperature", "float", 0.1, "T in the ladder gates mu_i = sigmoid(alpha_i / T)",
                   minimum=0.01, maximum=10),
    ),
    apply=apply_lst, trainable_params=lst_params,
    memory_terms=lst_memory_terms,
    validate=lambda config, **hp: _check(lst_params(config, **hp)),
    param_prefixes=("lst_",), backprop_through_backbone=False,
    notes="the side network reads detached backbone states: no backward pass through the backbone",
))
