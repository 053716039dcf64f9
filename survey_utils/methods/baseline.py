"""The baseline every PEFT method is measured against: full fine-tuning (chapter 00)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PretrainedConfig

from survey_utils.architecture import total_params
from survey_utils.methods.registry import Method, Taxonomy, register


def apply_full(model: nn.Module, **_: Any) -> nn.Module:
    """Make every parameter trainable: :math:`W \\leftarrow W - \\eta \\nabla_W L` for all of them."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def full_trainable_params(config: PretrainedConfig, **_: Any) -> int:
    """Every parameter of the model (tied weights counted once)."""
    return total_params(config)


register(Method(
    name="full",
    title="Full fine-tuning",
    paper="Howard & Ruder 2018, Universal Language Model Fine-tuning (ACL 2018); the baseline of all three surveys",
    arxiv_id="1801.06146",
    taxonomy=Taxonomy(xu="baseline", wang="baseline", lialin="baseline"),
    chapter="00_preliminaries",
    hyperparams=(),
    apply=apply_full,
    trainable_params=full_trainable_params,
    selective=True,
))
