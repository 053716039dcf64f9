"""LoRA on parameters rather than on linear modules: transformers 5's fused experts (chapter 04).

A mixture-of-experts block of transformers 5 keeps its routed experts as 3-D tensors, one per projection
(Mixtral's ``gate_up_proj`` of shape ``(E, 2I, h)``, ``down_proj`` of ``(E, h, I)``), and multiplies each token's
rows by its experts' slices; there is no ``nn.Linear`` per expert for :class:`~.lowrank.LoRALinear` to wrap.
peft 0.21.2 adapts such tensors with ``target_parameters`` (its ``ParamWrapper``, in
``peft/tuners/lora/layer.py``), and its transformers-5 conversion (``_convert_peft_config_moe``) turns
``target_modules="all-linear"`` into exactly that on the fused-expert MoE types. :class:`ParameterLoRA` is the
same update, written per expert.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from survey_utils.methods.common import new_parameter


class ParameterLoRA(nn.Module):
    r"""LoRA on parameters of a module: each adapted expert matrix gets its own rank-``r`` update.

    ::

        W  (frozen, E x d_out x d_in) ──(+)──► W' ──► the module's own forward (routing, experts, ...)
                                         │
        B_e (d_out x r) · A_e (r x d_in) ┘ × α/r, for every expert e

    .. math:: W'_e = W_e + \frac{\alpha}{r} B_e A_e \qquad (e = 1, \dots, E)

    The module runs its own forward on ``W'`` (``torch.func.functional_call``), so routing is untouched: each
    expert's update only ever sees the tokens routed to that expert, and a token's output changes by
    :math:`\frac{\alpha}{r} B_e A_e x` for each expert ``e`` it picks. Trainable parameters per tensor:
    :math:`E\,r\,(d_\text{in} + d_\text{out})`. A 2-D parameter (a router's ``weight``) is the case ``E = 1``.

    Init as LoRA's: each :math:`A_e` Kaiming-uniform like a default linear layer of fan-in :math:`d_\text{in}`, B = 0,
    so ``W' = W`` at initialisation. ``rank`` and ``alpha`` are per parameter: peft 0.21.2 doubles both for the
    fused ``gate_up_proj`` (its ``rank_pattern``), where transformers 4 had two experts' linears of rank ``r``.

    Source read: peft 0.21.2, ``peft/tuners/lora/layer.py``: ``ParamWrapper`` (one wrapper per parameter, nested
    when a module has several; ``lora_A`` an ``nn.Linear(d_in, r E)``, ``lora_B`` an ``nn.Linear(r E, d_out)``,
    reshaped per expert in ``get_delta_factors``; ``is_transposed`` on the module means the tensor is stored
    ``(E, d_in, d_out)``) and ``_LoraFactorsProxy`` (the forward's ``torch.baddbmm(W, B, A, alpha=scale)``, in the
    weight's dtype, autocast off). Ours keeps one wrapper per module and the factors per expert: ``lora_A[name]``
    is ``(E, r, d_in)`` (peft's ``lora_A.weight`` is its ``reshape(E r, d_in)``), ``lora_B[name]`` is
    ``(E, d_out, r)`` (peft's ``lora_B.weight`` is its ``permute(1, 2, 0).reshape(d_out, r E)``); a 2-D parameter
    keeps LoRA's ``(r, d_in)`` and ``(d_out, r)``. Like peft's, the updated tensor ``W'`` is a new tensor of the
    full size in each forward, which the experts' matmuls keep for backward; dropout cannot be factored out of it,
    so there is none (peft refuses ``lora_dropout`` here too).
    """

    def __init__(self, base_layer: nn.Module, ranks: dict[str, int], alphas: dict[str, float],
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.transposed = getattr(base_layer, "is_transposed", False) is True
        for name, r in ranks.items():
            weight = getattr(base_layer, name)
            experts, d_in, d_out = self.dims(weight)
            lead = (experts,) if weight.dim() == 3 else ()
            self.lora_A[name] = new_parameter((*lead, r, d_in), weight,
                                              lambda t, d=d_in: nn.init.kaiming_uniform_(t.view(-1, d), a=math.sqrt(5)))
            self.lora_B[name] = new_parameter((*lead, d_out, r), weight, nn.init.zeros_)
            self.scaling[name] = alphas[name] / (math.sqrt(r) if use_rslora else r)
        self.merged = False

    def dims(self, weight: torch.Tensor) -> tuple[int, int, int]:
        """``(experts, d_in, d_out)`` of a 2-D or 3-D weight."""
        if weight.dim() == 2:
            return 1, weight.shape[1], weight.shape[0]
        if self.transposed:
            return weight.shape[0], weight.shape[1], weight.shape[2]
        return weight.shape[0], weight.shape[2], weight.shape[1]

    def updated(self, name: str) -> torch.Tensor:
        r""":math:`W + \frac{\alpha}{r} B A` for each expert, in the weight's layout and dtype: several experts in
        one ``baddbmm`` on the factors cast to the weight's dtype (peft's ``_LoraFactorsProxy``), one matrix as
        :math:`W + \Delta W` with :math:`\Delta W` computed in the factors' dtype (peft's ``_LoraParameterProxy``)."""
        weight = getattr(self.base_layer, name)
        if weight.dim() == 2 or weight.shape[0] == 1:
            return weight + self.delta(name)
        a, b = self.lora_A[name].to(weight.dtype), self.lora_B[name].to(weight.dtype)
        if self.transposed:  # stored (E, d_in, d_out): W' = W + s (B A)^T = W + s A^T B^T
            return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scaling[name])
        return torch.baddbmm(weight, b, a, alpha=self.scaling[name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.merged:
            return self.base_layer(*args, **kwargs)
        return functional_call(self.base_layer, {name: self.updated(name) for name in self.lora_A}, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes the model reads from the module it wrapped (a router's ``e_score_correction_bias``, an
        experts module's ``num_experts``) come from that module."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def delta(self, name: str) -> torch.Tensor:
        r""":math:`\frac{\alpha}{r} B A` for each expert, laid out like the weight."""
        weight = getattr(self.base_layer, name)
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return (delta.transpose(-2, -1) if self.transposed and weight.dim() == 3 else delta).to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for name in self.lora_A:
                getattr(self.base_layer, name).add_(self.delta(name))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for name in self.lora_A:
                getattr(self.base_layer, name).sub_(self.delta(name))
            self.merged = False
