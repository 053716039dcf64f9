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
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig

from survey_utils.architecture import ModuleSpec, layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import (
    LINEAR_KINDS,
    freeze,
    linear_dims,
    model_label,
    new_parameter,
    replace_module,
    target_specs,
)
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register
from survey_utils.targeting import layer_index, num_blocks

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
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
    groups: dict[int, list[ModuleSpec]] = {}
    for spec in layout(config).modules:
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


# --------------------------------------------------------------------------------------------- modules


class Projection(nn.Module):
    """``x W^T + b``: a linear layer whose parameters are created with ``new_parameter`` (meta-safe)."""

    def __init__(self, fan_in: int, fan_out: int, like: torch.Tensor, zero: bool = False) -> None:
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        init = nn.init.zeros_ if zero else (lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        self.weight = new_parameter((fan_out, fan_in), like, init)
        self.bias = new_parameter((fan_out,), like, nn.init.zeros_ if zero else (lambda t: nn.init.uniform_(t, -bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Bottleneck(nn.Module):
    r"""The adapter's residual branch :math:`\Delta(x) = W_\text{up} f(W_\text{down} x + b_\text{down}) + b_\text{up}`.

    Houlsby et al. 2019 (arXiv:1902.00751) initialise near zero so the adapter starts near the identity;
    we set the up-projection (weight and bias) to exactly zero, as He et al. 2022 do for their parallel
    adapter, so the adapted model *equals* the base model at initialisation. The down-projection starts like
    a default ``nn.Linear``. Parameters: :math:`2dk + d + k` for width :math:`d` and bottleneck :math:`k`.
    """

    def __init__(self, width: int, size: int, non_linearity: str, like: torch.Tensor) -> None:
        super().__init__()
        self.adapter_down = Projection(width, size, like)
        self.act = ACTIVATIONS[non_linearity]()
        self.adapter_up = Projection(size, width, like, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.act(self.adapter_down(x.to(self.adapter_down.weight.dtype)))).to(x.dtype)


class AdapterWrapper(nn.Module):
    r"""A frozen module followed by an adapter branch.

    serial (Houlsby, Pfeiffer, Compacter): :math:`y = m(x) + \Delta(m(x))`;
    parallel (He et al. 2022): :math:`y = m(x) + s\,\Delta(x_\text{ffn})`, where :math:`x_\text{ffn}` is the
    FFN's input, captured by a pre-hook on the FFN's first projection (:class:`_CaptureInput`).
    The base module stays reachable as ``base_layer`` (and its ``weight``/``bias``, which T5 reads).
    """

    def __init__(self, base_layer: nn.Module, adapter: nn.Module, scaling: float = 1.0, parallel: bool = False):
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter
        self.scaling, self.parallel = scaling, parallel
        self.ffn_input: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if not self.parallel:
            return out + self.adapter(out)
        source, self.ffn_input = self.ffn_input, None
        if source is None:
            raise RuntimeError("parallel adapter ran without its FFN input (the FFN's first projection did not run)")
        return out + self.scaling * self.adapter(source)


class _CaptureInput:
    """Forward pre-hook that hands a module's input to a parallel adapter (a class, so deepcopy re-binds it)."""

    def __init__(self, wrapper: AdapterWrapper) -> None:
        self.wrapper = wrapper

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.wrapper.ffn_input = args[0]


def insert_adapters(model: nn.Module, sites: list[tuple[ModuleSpec, ModuleSpec | None]], make: Any,
                    scaling: float = 1.0) -> nn.Module:
    """Wrap each site's module with ``make(width, like)``; parallel sites also hook their FFN input."""
    for spec, ffn_in in sites:
        base = model.get_submodule(spec.name)
        wrapper = AdapterWrapper(base, make(spec.out_features, base.weight), scaling, parallel=ffn_in is not None)
        replace_module(model, spec.name, wrapper)
        if ffn_in is not None:
            model.get_submodule(ffn_in.name).register_forward_pre_hook(_CaptureInput(wrapper))
    return model


# --------------------------------------------------------------- Houlsby, Pfeiffer, parallel, AdapterDrop


def apply_bottleneck(model: nn.Module, placement: str, reduction_factor: float, bottleneck_size: int,
                     non_linearity: str, layers_to_transform: list[int] | None = None, scaling: float = 1.0,
                     drop_layers: int = 0) -> nn.Module:
    """Freeze ``model`` and insert bottleneck adapters at ``placement`` (see :func:`adapter_sites`)."""
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
                   choices=tuple(ACTIVATIONS)),
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


class PHMRule(nn.Module):
    """The shared "slow" Kronecker factors :math:`A_i \\in R^{n\\times n}`, i = 1..n: one set per model."""

    def __init__(self, n: int, like: torch.Tensor) -> None:
        super().__init__()
        self.phm_rule = new_parameter((n, n, n), like, lambda t: nn.init.normal_(t, std=0.01))


class PHMLinear(nn.Module):
    r"""A parameterized-hypercomplex-multiplication layer with low-rank factors (Compacter's building block).

    .. math:: W = \sum_{i=1}^{n} A_i \otimes (s_i t_i^\top), \qquad y = x W + b

    :math:`A_i` (:class:`PHMRule`) is shared by every PHM layer of the model; :math:`s_i \in R^{d_{in}/n
    \times r}` and :math:`t_i \in R^{d_{out}/n \times r}` belong to this layer, so it owns
    :math:`r(d_{in} + d_{out}) + d_{out}` parameters. ``zero=True`` starts :math:`s` and :math:`b` at zero
    (so :math:`W = 0`): used for the up-projection, which makes the adapter the identity at initialisation.
    """

    def __init__(self, fan_in: int, fan_out: int, rank: int, rule: PHMRule, like: torch.Tensor,
                 zero: bool = False) -> None:
        super().__init__()
        n = rule.phm_rule.shape[0]
        self.rule = rule  # a shared submodule: named_parameters() yields its tensor once
        self.phm_s = new_parameter((n, fan_in // n, rank), like, nn.init.zeros_ if zero else nn.init.xavier_uniform_)
        self.phm_t = new_parameter((n, fan_out // n, rank), like, nn.init.xavier_uniform_)
        self.phm_bias = new_parameter((fan_out,), like, nn.init.zeros_)

    def kron_weight(self) -> torch.Tensor:
        """:math:`\\sum_i A_i \\otimes s_i t_i^\\top`, shape ``(d_in, d_out)``."""
        a = self.rule.phm_rule
        b = torch.einsum("nir,njr->nij", self.phm_s, self.phm_t)
        n, p, q = b.shape
        return torch.einsum("kab,kij->aibj", a, b).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kron_weight() + self.phm_bias


class CompacterBottleneck(nn.Module):
    """A bottleneck adapter whose two projections are :class:`PHMLinear` layers sharing one rule."""

    def __init__(self, width: int, size: int, rank: int, rule: PHMRule, non_linearity: str,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.phm_down = PHMLinear(width, size, rank, rule, like)
        self.act = ACTIVATIONS[non_linearity]()
        self.phm_up = PHMLinear(size, width, rank, rule, like, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.phm_up(self.act(self.phm_down(x.to(self.phm_down.phm_s.dtype)))).to(x.dtype)


def apply_compacter(model: nn.Module, phm_dim: int, phm_rank: int, placement: str, reduction_factor: float,
                    bottleneck_size: int, non_linearity: str, layers_to_transform: list[int] | None = None) -> nn.Module:
    """Freeze ``model`` and insert Compacter adapters; the rule :math:`A` is created once and shared."""
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


class IA3Layer(nn.Module):
    r"""(IA)^3 around a frozen linear layer (Liu et al. 2022, arXiv:2205.05638).

    Keys and values (and any non-feedforward target): :math:`y = l \odot (W x + b)`, :math:`l \in R^{d_{out}}`.
    Feedforward targets (the FFN's down projection): :math:`y = W (l \odot x) + b`, :math:`l \in R^{d_{in}}`.
    The vectors start at one, so the model is unchanged at initialisation. Shapes, names and the
    feedforward rule are peft's, so :meth:`merge` folds :math:`l` into :math:`W` exactly as peft does.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer, self.is_feedforward = base_layer, is_feedforward
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = new_parameter(shape, base_layer.weight, nn.init.ones_)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:  # peft's casts, so that mixed dtypes give peft's numbers too
            interm = (x.to(scale.dtype) * scale).to(self.base_layer.weight.dtype)
            return self.base_layer(interm, *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def _scale_weight(self, invert: bool) -> None:
        scale = self.ia3_l.flatten()
        scale = 1 / (scale + 1e-8) if invert else scale
        weight = self.base_layer.weight  # Linear: (out, in); Conv1D: (in, out)
        in_dim = 0 if self.fan_in_fan_out else 1
        axis = in_dim if self.is_feedforward else 1 - in_dim
        weight.mul_(scale.unsqueeze(1 - axis).to(weight.dtype))
        if not self.is_feedforward and self.base_layer.bias is not None:
            self.base_layer.bias.mul_(scale.to(weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._scale_weight(invert=False)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._scale_weight(invert=True)
            self.merged = False


def ia3_defaults(config: PretrainedConfig, target_modules: Any, feedforward_modules: Any) -> tuple[Any, Any]:
    """peft's per-architecture defaults (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``) for ``None`` values."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
    )

    for value, table, name in ((target_modules, TARGETS, "target_modules"),
                               (feedforward_modules, FEEDFORWARD, "feedforward_modules")):
        if value is None and config.model_type not in table:
            raise SurveyError(f"peft has no default {name} for model type '{config.model_type}'; set {name}")
    targets = list(TARGETS[config.model_type]) if target_modules is None else target_modules
    feedforward = list(FEEDFORWARD[config.model_type]) if feedforward_modules is None else feedforward_modules
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
    """Freeze ``model`` and wrap each target in :class:`IA3Layer`."""
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


class SideBlock(nn.Module):
    r"""One rung of the ladder at width :math:`w = d/r`: :math:`s \leftarrow s + W_2\,\mathrm{gelu}(W_1\,\mathrm{LN}(s))`."""

    def __init__(self, width: int, inner: int, like: torch.Tensor) -> None:
        super().__init__()
        self.lst_norm_weight = new_parameter((width,), like, nn.init.ones_)
        self.lst_norm_bias = new_parameter((width,), like, nn.init.zeros_)
        self.lst_fc1 = Projection(width, inner, like)
        self.lst_fc2 = Projection(inner, width, like)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(s, s.shape[-1:], self.lst_norm_weight, self.lst_norm_bias)
        return s + self.lst_fc2(F.gelu(self.lst_fc1(normed)))


class LadderSideNetwork(nn.Module):
    r"""Ladder Side-Tuning's side network for one stack of :math:`L` frozen blocks (Sung et al. 2022).

    .. math::
        s_0 = D_0 h_0, \quad
        s_i = \mathrm{Side}_i\big(\mu_i s_{i-1} + (1-\mu_i) D_i h_i\big), \quad \mu_i = \sigma(\alpha_i / T), \quad
        h_\text{final} \leftarrow h_\text{final} + U s_L

    :math:`h_0` is the first block's input, :math:`h_i` block :math:`i`'s output, :math:`D_i` linear
    down-projections :math:`d \to d/r` (the "ladder"), :math:`\alpha_i` start at 0 (:math:`\mu_i = 1/2`).
    The backbone's states enter detached, so the loss never backpropagates through the backbone and its
    activations need not be kept for a backward pass: LST's memory saving. The paper's side blocks are
    thin transformer layers initialised by pruning the backbone; ours keep their FFN half
    (:class:`SideBlock`, inner width :math:`d_{ff}/r`). :math:`U` starts at zero (our choice), so the
    model equals the base model at initialisation.
    """

    def __init__(self, hidden: int, width: int, inner: int, blocks: int, temperature: float,
                 like: torch.Tensor) -> None:
        super().__init__()
        self.lst_down = nn.ModuleList(Projection(hidden, width, like) for _ in range(blocks + 1))
        self.lst_gate = new_parameter((blocks,), like, nn.init.zeros_)
        self.lst_blocks = nn.ModuleList(SideBlock(width, inner, like) for _ in range(blocks))
        self.lst_up = Projection(width, hidden, like, zero=True)
        self.temperature = temperature
        self.state: torch.Tensor | None = None

    def start(self, h0: torch.Tensor) -> None:
        self.state = self.lst_down[0](h0.detach().to(self.lst_gate.dtype))

    def step(self, i: int, h: torch.Tensor) -> None:
        mu = torch.sigmoid(self.lst_gate[i] / self.temperature)
        ladder = self.lst_down[i + 1](h.detach().to(mu.dtype))
        self.state = self.lst_blocks[i](mu * self.state + (1 - mu) * ladder)

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        side, self.state = self.state, None
        return h + self.lst_up(side).to(h.dtype)


class _LadderHook:
    """Forward hooks feeding a side network (classes, so deepcopy re-binds them to the copied network)."""

    def __init__(self, side: LadderSideNetwork, index: int, finish: bool) -> None:
        self.side, self.index, self.finish = side, index, finish

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.side.start(args[0] if args else kwargs["hidden_states"])

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.index >= 0:
            self.side.step(self.index, hidden)
        if not self.finish:
            return None
        hidden = self.side.finish(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _lst_widths(config: PretrainedConfig, reduction_factor: int) -> tuple[int, int, int]:
    shape = layout(config)
    width, inner = shape.hidden_size // reduction_factor, shape.intermediate_size // reduction_factor
    if width < 1 or inner < 1:
        raise SurveyError(f"reduction_factor={reduction_factor} leaves an empty side network for hidden size "
                          f"{shape.hidden_size}")
    return shape.hidden_size, width, inner


def apply_lst(model: nn.Module, reduction_factor: int, gate_temperature: float) -> nn.Module:
    """Freeze ``model``, attach one side network per stack as ``model.lst_side`` and hook the blocks."""
    freeze(model)
    hidden, width, inner = _lst_widths(model.config, reduction_factor)
    like = next(model.parameters())
    sides = nn.ModuleDict()
    for stack in stacks(model.config):
        side = LadderSideNetwork(hidden, width, inner, stack.blocks, gate_temperature, like)
        sides[stack.key.replace(".", "_")] = side
        blocks = model.get_submodule(stack.key)
        blocks[0].register_forward_pre_hook(_LadderHook(side, -1, False).pre, with_kwargs=True)
        for i in range(stack.blocks):
            last_without_norm = i == stack.blocks - 1 and stack.final_norm is None
            blocks[i].register_forward_hook(_LadderHook(side, i, last_without_norm), with_kwargs=True)
        if stack.final_norm is not None:
            model.get_submodule(stack.final_norm).register_forward_hook(_LadderHook(side, -1, True),
                                                                        with_kwargs=True)
    model.add_module("lst_side", sides)
    return model


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
