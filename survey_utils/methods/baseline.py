"""The baseline every PEFT method is measured against: full fine-tuning (chapter 00)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from survey_utils.architecture import total_params
from survey_utils.methods.registry import BASELINE, Method, Taxonomy, register, saves_nothing

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig


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
    taxonomy=Taxonomy(xu=BASELINE, wang=BASELINE, lialin=BASELINE),
    chapter="00_preliminaries",
    hyperparams=(),
    apply=apply_full,
    trainable_params=full_trainable_params,
    memory_terms=saves_nothing,
    adds_parameters=False,
    trains_whole_model=True,
))
