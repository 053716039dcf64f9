"""Reparameterized methods: the weight update is trained in a low-dimensional form (chapter 04).

Xu et al. 2023 and Wang et al. 2024 call the family "reparameterized"; Lialin et al. 2023 put LoRA in the
"reparametrization-based" region of their Venn diagram. Every method here can be merged into the base
weight after training, so inference costs what the base model costs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from survey_utils.methods.common import adapt_targets, freeze, linear_dims, new_parameter, target_specs
from survey_utils.methods.registry import HyperParam, Method, Taxonomy, register

TARGET_HPS = (
    HyperParam("target_modules", "targets", None,
               "module names (or one regex) to adapt; None takes the architecture's query and value projections",
               nullable=True),
    HyperParam("layers_to_transform", "int_list", None, "block indices to adapt; None adapts every block",
               nullable=True),
    HyperParam("layers_pattern", "str", None, "name of the block list (layers, h, block) when it is ambiguous",
               nullable=True),
)


class LoRALinear(nn.Module):
    r"""LoRA around a frozen linear layer (Hu et al. 2021, arXiv:2106.09685).

    ::

        x ──► [ W0  (frozen, d_out × d_in) ] ─────────────────────┐
        │                                                         (+) ──► h
        └──► dropout ─► [ A (r × d_in) ] ─► [ B (d_out × r) ] ─ × α/r ┘

    .. math:: h = W_0 x + \frac{\alpha}{r} B A x

    A starts like a default linear layer (Kaiming-uniform) and B at zero, so at initialisation
    ``h = W0 x``: training starts from the pretrained model. With ``use_rslora`` the scale is
    :math:`\alpha/\sqrt{r}` (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732). ``merge`` adds
    :math:`\frac{\alpha}{r} BA` into ``W0`` so that inference has no extra cost.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        weight = base_layer.weight
        self.lora_A = new_parameter((r, self.in_features), weight,
                                    lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        self.lora_B = new_parameter((self.out_features, r), weight, nn.init.zeros_)
        self.r = r
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """:math:`\\frac{\\alpha}{r} B A`, laid out like the base weight."""
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        low_rank = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        return result + (low_rank * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def apply_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
               **targets: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target linear layer in :class:`LoRALinear`."""
    freeze(model)
    adapt_targets(model, "lora", targets,
                  lambda base: LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora))
    return model


def lora_trainable_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    r""":math:`\sum_{W \in \text{targets}} r\,(d_\text{in} + d_\text{out})`."""
    return sum(r * (m.in_features + m.out_features) for m in target_specs(config, "lora", hp))


def lora_peft_config(config: PretrainedConfig, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool, **hp: Any) -> Any:
    from peft import LoraConfig

    specs = target_specs(config, "lora", hp)
    targets = hp["target_modules"]
    if targets is None:
        targets = sorted({spec.short_name for spec in specs})
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
        target_modules=targets, layers_to_transform=hp["layers_to_transform"],
        layers_pattern=hp["layers_pattern"],
        fan_in_fan_out=any(spec.kind == "conv1d" for spec in specs),
    )


def validate_targets(config: PretrainedConfig, **hp: Any) -> None:
    target_specs(config, "lora", hp)


register(Method(
    name="lora",
    title="LoRA",
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (ICLR 2022)",
    arxiv_id="2106.09685",
    taxonomy=Taxonomy(xu="reparameterized / low-rank decomposition",
                      wang="reparameterized / low-rank decomposition",
                      lialin="R"),
    chapter="04_reparameterized",
    hyperparams=(
        HyperParam("r", "int", 8, "rank of the update B A", minimum=1),
        HyperParam("lora_alpha", "float", 8.0, "scale numerator: the update is multiplied by alpha / r",
                   minimum=0),
        HyperParam("lora_dropout", "float", 0.0, "dropout on the adapter's input", minimum=0, maximum=0.99),
        HyperParam("use_rslora", "bool", False, "scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r"),
        *TARGET_HPS,
    ),
    apply=apply_lora,
    trainable_params=lora_trainable_params,
    peft_config=lora_peft_config,
    validate=validate_targets,
    param_prefixes=("lora_",),
    mergeable=True,
))
