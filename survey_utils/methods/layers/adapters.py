r"""The nn.Module layers of the additive adapter methods (chapter 01); registered in ``methods/adapters.py``.

- :class:`Bottleneck` inside :class:`AdapterWrapper` (Houlsby, Pfeiffer, parallel adapters, AdapterDrop),
  inserted by :func:`insert_adapters` at the sites ``methods/adapters.adapter_sites`` finds;
- :class:`CompacterBottleneck`: the same branch with :class:`PHMLinear` projections sharing one
  :class:`PHMRule`;
- :class:`IA3Layer`: (IA)^3's learned rescaling vectors around a frozen linear layer;
- :class:`LadderSideNetwork`: Ladder Side-Tuning's side network, fed by forward hooks
  (:func:`attach_side_networks`).

New tensors are created with ``new_parameter`` on the base weight's device and dtype, so the layers build
on ``meta`` and under ``FakeTensorMode`` too. Only the methods' ``apply`` functions import this module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from survey_utils.architecture import ModuleSpec
from survey_utils.methods.adapters import ACTIVATION_NAMES
from survey_utils.methods.common import linear_dims, new_parameter, replace_module
from survey_utils.methods.layers.wrapping import ShowsBaseWeightAndBias

if TYPE_CHECKING:
    from survey_utils.methods.adapters import Stack

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
if tuple(ACTIVATIONS) != ACTIVATION_NAMES:
    raise ImportError(f"the layers' activations {tuple(ACTIVATIONS)} differ from the non_linearity choices "
                      f"{ACTIVATION_NAMES} in methods/adapters.py")


# --------------------------------------------------------------- Houlsby, Pfeiffer, parallel, AdapterDrop


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


class AdapterWrapper(ShowsBaseWeightAndBias):
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


# ------------------------------------------------------------------------------------------------ (IA)^3


class IA3Layer(ShowsBaseWeightAndBias):
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


# ------------------------------------------------------------------------------------ Ladder Side-Tuning


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


def attach_side_networks(model: nn.Module, stacks: list[Stack], hidden: int, width: int, inner: int,
                         gate_temperature: float) -> nn.Module:
    """Attach one :class:`LadderSideNetwork` per stack as ``model.lst_side`` and hook the stack's blocks
    (and its final norm, where the side output joins)."""
    like = next(model.parameters())
    sides = nn.ModuleDict()
    for stack in stacks:
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
