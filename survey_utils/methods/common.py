"""Parts every family shares: freezing, finding and replacing target modules, merging.

Torch-free at import (the registry and the closed forms load without it): the helpers that build tensors
import torch when they are called.

A method's ``apply`` calls :func:`adapt_targets` with a factory that wraps one base module; the factory
creates its parameters on the base weight's device and dtype, so the same code runs on ``cpu``, on
``meta`` and under ``FakeTensorMode`` (where ``Module.to()`` fails on fake parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import ModuleSpec, layout
from survey_utils.errors import SurveyError
from survey_utils.targeting import select

if TYPE_CHECKING:  # typing only: the helpers that need torch import it when called (counting never does)
    import torch
    from torch import nn
    from transformers import PretrainedConfig

LINEAR_KINDS = ("linear", "conv1d")


def freeze(model: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter: the frozen backbone of every PEFT method."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def linear_dims(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)``; GPT-2's Conv1D stores its weight transposed."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1], True
    raise SurveyError(f"expected a Linear or Conv1D module, got {type(module).__name__}")


def model_label(config: PretrainedConfig) -> str:
    return str(getattr(config, "name_or_path", "") or config.model_type)


def target_specs(config: PretrainedConfig, method: str, hp: dict[str, Any],
                 kinds: tuple[str, ...] = LINEAR_KINDS) -> list[ModuleSpec]:
    """The layout modules that ``hp``'s ``target_modules`` / ``layers_to_transform`` select."""
    return select(
        layout(config),
        hp.get("target_modules"),
        hp.get("layers_to_transform"),
        hp.get("layers_pattern"),
        kinds=kinds,
        model_name=model_label(config),
        method=method,
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapt_targets(model: nn.Module, method: str, hp: dict[str, Any],
                  factory: Callable[[nn.Module], nn.Module],
                  kinds: tuple[str, ...] = LINEAR_KINDS) -> list[str]:
    """Replace every target module by ``factory(base_module)``; return the adapted names."""
    names = [spec.name for spec in target_specs(model.config, method, hp, kinds)]
    for name in names:
        replace_module(model, name, factory(model.get_submodule(name)))
    return names


def new_parameter(shape: tuple[int, ...], like: torch.Tensor, init: Callable[[torch.Tensor], Any] | None = None,
                  dtype: torch.dtype | None = None) -> nn.Parameter:
    """A trainable parameter on ``like``'s device (and dtype unless given), initialised in place."""
    import torch
    from torch import nn

    tensor = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if init is not None and tensor.device.type != "meta":
        with torch.no_grad():
            init(tensor)
    return nn.Parameter(tensor)


def merge(model: nn.Module) -> nn.Module:
    """Fold every mergeable adapter into its base weight (inference then costs what the base model costs)."""
    for module in model.modules():
        if hasattr(module, "merge") and callable(module.merge) and module is not model:
            module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the base weights and the separate adapter path."""
    for module in model.modules():
        if hasattr(module, "unmerge") and callable(module.unmerge) and module is not model:
            module.unmerge()
    return model
