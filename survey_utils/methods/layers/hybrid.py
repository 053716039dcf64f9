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
  ``scaling="learned"``: one scalar per adapter, starting at the constant it replaces).

Only ``methods/hybrid.py``'s ``apply`` functions import this module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
