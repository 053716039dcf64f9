r"""The nn.Module pieces the hybrids add to their parts (chapter 05); registered in ``methods/hybrid.py``.

A hybrid re-implements none of its parts (``methods/composition.py`` applies them); this module holds only
what a hybrid adds on top of them:

- :class:`Gate`: UniPELT's gate :math:`g(x) = \operatorname{mean}_t \sigma(W_g x_t + b_g)`, one scalar per
  example, as AdapterHub computes it (``adapters/methods/modeling.py``, ``lora.py``, ``prefix_tuning.py``);
- :func:`gate_adapters`: :math:`h \leftarrow h + g(x)\,\Delta(x)` around each adapter branch;
- :func:`gate_lora`: :math:`h = W_0 x + g(x)\,\frac{\alpha}{r} B A x` (the gate multiplies LoRA's scale);
- :func:`gate_prefixes`: :math:`[g P_K; K]`, :math:`[g P_V; V]` in each prefixed attention (one shared gate
  for keys and values, AdapterHub's ``shared_gating=True``);
- :func:`learn_scales`: the scaled parallel adapter's learned scale :math:`s` (AdapterHub's
  ``scaling="learned"``: one scalar per adapter, starting at the constant it replaces);
- the branches of the unified methods (Xu et al. 2023), each an adapter branch of its own kind:
  :class:`MaskedPrototype` (ProPETL), :class:`MixtureOfAdapters` (AdaMix), :class:`SparseBottleneck`
  (SparseAdapter).

Only ``methods/hybrid.py``'s ``apply`` functions import this module.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from survey_utils.architecture import ModuleSpec
from survey_utils.methods.common import new_parameter


class Gate(nn.Module):
    r""":math:`g(x) = \operatorname{mean}_t \sigma(W_g x_t + b_g) \in (0, 1)`, shape ``(batch, 1, 1)``.

    :math:`W_g \sim \mathcal{N}(0, 0.02^2)`, :math:`b_g = 0` (AdapterHub's init), so every gate starts near
    0.5; a branch that starts at zero (LoRA's :math:`B`, the adapter's up-projection) stays zero, so the
    gated model is the base model at initialisation wherever its parts are. :math:`d + 1` parameters.
    """

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.gate_weight = new_parameter((1, width), like, lambda t: nn.init.normal_(t, std=0.02))
        self.gate_bias = new_parameter((1,), like, nn.init.zeros_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(x.to(self.gate_weight.dtype) @ self.gate_weight.T + self.gate_bias)  # (b, t, 1)
        return scores.mean(dim=1, keepdim=True)  # (b, 1, 1)


class GatedBranch(nn.Module):
    """An adapter branch times its gate, read from the branch's own input: ``g(x) * branch(x)``."""

    def __init__(self, branch: nn.Module, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.branch = branch
        self.gate_adapter = Gate(width, like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.gate_adapter(x) * self.branch(x)).to(x.dtype)


def gate_adapters(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """Put a :class:`GatedBranch` around the adapter of each wrapped module in ``specs``."""
    for spec in specs:
        wrapper = model.get_submodule(spec.name)
        wrapper.adapter = GatedBranch(wrapper.adapter, spec.out_features, wrapper.base_layer.weight)


class _GateLoRA:
    """Pre-hook: LoRA's scale becomes ``scale * g(x)`` for this call; the post-hook restores the number."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        module.scaling = self.scale * module.gate_lora(args[0])

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        module.scaling = self.scale


def gate_lora(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """Give each LoRA-wrapped module in ``specs`` a :class:`Gate` on its input."""
    for spec in specs:
        module = model.get_submodule(spec.name)
        module.gate_lora = Gate(module.in_features, module.lora_A)
        hook = _GateLoRA(module.scaling)
        module.register_forward_pre_hook(hook.before)
        module.register_forward_hook(hook.after)


def _gate_prefix(attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Scale this layer's prefix keys and values (already in the cache) by the gate of its input."""
    cache = kwargs.get("past_key_values")
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if cache is None or hidden is None:
        return
    cache = getattr(cache, "self_attention_cache", cache)
    layer = cache.layers[attn.layer_idx] if attn.layer_idx < len(cache.layers) else None
    if layer is None or layer.keys is None or layer.keys.numel() == 0:  # no prefix in this call's cache
        return
    gate = attn.gate_prefix(hidden).unsqueeze(1).to(layer.keys.dtype)  # (b, 1, 1, 1)
    layer.keys, layer.values = layer.keys * gate, layer.values * gate


def gate_prefixes(model: nn.Module, attention_names: list[str], width: int) -> None:
    """Give each prefixed attention module a :class:`Gate` on its input and the pre-hook that applies it."""
    like = model.prompt_encoder.embedding.weight
    for name in attention_names:
        attn = model.get_submodule(name)
        attn.gate_prefix = Gate(width, like)
        attn.register_forward_pre_hook(_gate_prefix, with_kwargs=True)


def learn_scales(model: nn.Module, specs: list[ModuleSpec]) -> None:
    """Replace each parallel adapter's constant scale by a trainable scalar starting at that constant."""
    for spec in specs:
        wrapper = model.get_submodule(spec.name)
        start = float(wrapper.scaling)
        wrapper.scaling = new_parameter((1,), wrapper.adapter.adapter_up.weight,
                                        lambda t, value=start: nn.init.constant_(t, value))


# --------------------------------------------------------------- unified methods: ProPETL, AdaMix, SparseAdapter
# Each is the branch of an ``AdapterWrapper`` (``layers/adapters.insert_adapters``), at the sites the adapters find.


class _TopMask(torch.autograd.Function):
    """ProPETL's binary mask of a score tensor: 0 for the ``int(sparsity * n)`` smallest scores, 1 elsewhere;
    the gradient goes straight through to the scores (ProPETL's ``GetSubnet``)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        flat = scores.flatten()
        mask = torch.ones_like(flat)
        mask[flat.argsort()[:int(sparsity * flat.numel())]] = 0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class MaskedPrototype(nn.Module):
    r"""One layer's view of ProPETL's shared prototype adapter (Zeng et al. 2023, arXiv:2305.17682).

    .. math:: \Delta_l(x) = (W_\text{up} \odot M^\text{up}_l)\, f\big((W_\text{down} \odot M^\text{down}_l)\, x
              + b_\text{down}\big) + b_\text{up}, \qquad M_l = \mathbb{1}\big[|S_l| \notin
              \text{the } \lfloor s\, n \rfloor \text{ smallest}\big]

    :math:`W, b` belong to ``prototype`` (one :class:`~survey_utils.methods.layers.adapters.Bottleneck` for the whole
    model, registered in every layer's module, so ``named_parameters()`` yields it once and every layer reads the same
    storage); the real-valued scores :math:`S_l` (``propetl_down_scores``, ``propetl_up_scores``, one per weight
    entry, kaiming-uniform as ProPETL's ``AdapterSubnet``) train through a straight-through estimator. After
    training a layer keeps only its binary masks: :math:`2dk` bits. The prototype's up-projection starts at zero (as
    our adapters), so the model is the base model at initialisation.
    """

    def __init__(self, prototype: nn.Module, sparsity: float, like: torch.Tensor) -> None:
        super().__init__()
        self.prototype, self.sparsity = prototype, sparsity
        kaiming = lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # noqa: E731 - ProPETL's score init
        self.propetl_down_scores = new_parameter(tuple(prototype.adapter_down.weight.shape), like, kaiming)
        self.propetl_up_scores = new_parameter(tuple(prototype.adapter_up.weight.shape), like, kaiming)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's binary masks :math:`M^\\text{down}_l, M^\\text{up}_l` (differentiable in the scores)."""
        return (_TopMask.apply(self.propetl_down_scores.abs(), self.sparsity),
                _TopMask.apply(self.propetl_up_scores.abs(), self.sparsity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.prototype.adapter_down, self.prototype.adapter_up
        mask_down, mask_up = self.masks()
        h = F.linear(x.to(down.weight.dtype), down.weight * mask_down, down.bias)
        return F.linear(self.prototype.act(h), up.weight * mask_up, up.bias).to(x.dtype)


def stored_bytes(model: nn.Module) -> int:
    """What a trained ProPETL model stores beside the frozen base: its trainable tensors' distinct storages
    (the prototype once, however many layers read it) minus the scores, plus each layer's masks at one bit."""
    layers = [m for m in model.modules() if isinstance(m, MaskedPrototype)]
    scores = {id(p) for m in layers for p in (m.propetl_down_scores, m.propetl_up_scores)}
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
                if p.requires_grad and id(p) not in scores}
    return sum(storages.values()) + sum(math.ceil(p.numel() / 8) for m in layers
                                        for p in (m.propetl_down_scores, m.propetl_up_scores))


class MixtureOfAdapters(nn.Module):
    r"""AdaMix's mixture of adapters at one site (Wang et al. 2022, arXiv:2205.12410; ``ExpertSoup``).

    :math:`E` down-projections and :math:`E` up-projections (one when shared: ``share_up``, AdaMix's default).
    Training: each forward routes through one down and one up expert drawn uniformly at random,
    :math:`\Delta(x) = W^{(j)}_\text{up} f(W^{(i)}_\text{down} x + b^{(i)}) + b^{(j)}`. Inference: the experts'
    weights are averaged, :math:`\bar W = \frac1E \sum_e W^{(e)}` (AdaMix's ``inference_level=3``, a softmax of
    zero scores), so the model serves one adapter's cost. Up-projections start at zero (AdaMix's start from
    ``nn.Linear``; ours, as every adapter here, makes the model the base model at initialisation).
    """

    def __init__(self, width: int, size: int, experts: int, share_down: bool, share_up: bool, non_linearity: str,
                 like: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        from survey_utils.methods.layers.adapters import ACTIVATIONS, Projection

        self.adamix_down = nn.ModuleList(Projection(width, size, like) for _ in range(1 if share_down else experts))
        self.act = ACTIVATIONS[non_linearity]()
        self.adamix_up = nn.ModuleList(Projection(size, width, like, zero=True)
                                       for _ in range(1 if share_up else experts))
        self.routing = random.Random(seed)  # Python's RNG: routing never reads a (possibly fake) tensor

    @staticmethod
    def _mean(experts: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([e.weight for e in experts]).mean(0), torch.stack([e.bias for e in experts]).mean(0))

    def averaged(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``((W_down, b_down), (W_up, b_up))`` averaged over the experts: the adapter served at inference."""
        return self._mean(self.adamix_down), self._mean(self.adamix_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.adamix_down[0].weight.dtype)
        if self.training:
            down = self.adamix_down[self.routing.randrange(len(self.adamix_down))]
            up = self.adamix_up[self.routing.randrange(len(self.adamix_up))]
            return up(self.act(down(h))).to(x.dtype)
        (w_down, b_down), (w_up, b_up) = self.averaged()
        return F.linear(self.act(F.linear(h, w_down, b_down)), w_up, b_up).to(x.dtype)


class SparseProjection(nn.Module):
    r"""A linear map whose weight keeps only ``kept`` entries: :math:`W = \operatorname{scatter}(\text{index},
    v)`, :math:`y = W x + b` (SparseAdapter, He et al. 2022, arXiv:2210.04284, pruned at initialisation).

    Only the kept values :math:`v` (``sparse_values``) and the bias train; ``sparse_index`` (int64, the kept flat
    positions) is a buffer. The dense :math:`W` is rebuilt each forward (and saved for backward). ``zero``: the
    values start at zero (the up-projection, so the adapter starts as the identity); otherwise they are the kept
    entries of a default ``nn.Linear`` initialisation.
    """

    def __init__(self, fan_in: int, fan_out: int, kept: int, seed: int, like: torch.Tensor, zero: bool = False):
        super().__init__()
        from survey_utils.methods.layers.selective import has_values

        self.shape = (fan_out, fan_in)
        n = fan_in * fan_out
        if has_values(like):  # which entries survive: a seeded uniform draw (SparseAdapter's ``rand`` pruner)
            generator = torch.Generator().manual_seed(seed)
            index = torch.randperm(n, generator=generator)[:kept].sort().values.to(like.device)
        else:
            index = torch.empty(kept, dtype=torch.int64, device=like.device)
        self.register_buffer("sparse_index", index)
        bound = 1 / math.sqrt(fan_in)

        def init(t: torch.Tensor) -> None:
            if zero:
                nn.init.zeros_(t)
            else:  # the kept entries of a default nn.Linear weight
                dense = torch.empty(self.shape, dtype=t.dtype, device=t.device)
                nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
                t.copy_(dense.flatten()[index])

        self.sparse_values = new_parameter((kept,), like, init)
        self.sparse_bias = new_parameter((fan_out,), like, nn.init.zeros_ if zero
                                         else (lambda t: nn.init.uniform_(t, -bound, bound)))

    def weight(self) -> torch.Tensor:
        n = self.shape[0] * self.shape[1]
        dense = torch.zeros(n, dtype=self.sparse_values.dtype, device=self.sparse_values.device)
        return dense.scatter(0, self.sparse_index, self.sparse_values).view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.sparse_bias)


class SparseBottleneck(nn.Module):
    """A bottleneck adapter whose two weights are :class:`SparseProjection` s (biases dense)."""

    def __init__(self, width: int, size: int, kept: int, non_linearity: str, seed: int, like: torch.Tensor) -> None:
        super().__init__()
        from survey_utils.methods.layers.adapters import ACTIVATIONS

        self.sparse_down = SparseProjection(width, size, kept, seed, like)
        self.act = ACTIVATIONS[non_linearity]()
        self.sparse_up = SparseProjection(size, width, kept, seed + 1, like, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparse_up(self.act(self.sparse_down(x.to(self.sparse_up.sparse_values.dtype)))).to(x.dtype)
