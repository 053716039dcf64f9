"""Which modules a method adapts: peft's matching rule, applied to a layout or to a built model.

``target_modules`` is a list of names, each matching a module whose qualified name equals it or ends in
``.name``, or one string taken as a regular expression that must match the whole qualified name.
``layers_to_transform`` keeps only modules whose first numbered path segment (``layers.3``, ``h.3``,
``block.3``) is in the list; ``layers_pattern`` names that segment. A module named by its full path is a
target regardless of ``layers_to_transform``, as in peft. This is the rule of
``peft.tuners.tuners_utils.check_target_module_exists``; a property test checks the two agree.

``"all-linear"`` (any case) is peft's keyword, not a regular expression: every linear (``nn.Linear`` or GPT-2's
``Conv1D``) except the output head, named in full (so ``layers_to_transform`` does not filter them, as in peft's
``_maybe_include_all_linear_layers``). Chapter 04 explains target selection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from survey_utils.architecture import Layout, ModuleSpec
from survey_utils.errors import SurveyError, closest

Targets = str | Sequence[str]
ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND


def is_all_linear(target_modules: object) -> bool:
    """Whether ``target_modules`` is peft's ``"all-linear"`` keyword (compared case-insensitively, as peft does)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def output_head(layout: Layout) -> ModuleSpec | None:
    """The output head (transformers' ``get_output_embeddings()``, as the generic layout records it; for a hand
    layout the last linear outside the blocks that maps to the vocabulary, tied or not); ``None`` without one."""
    if layout.output_embeddings != "":
        return next((m for m in layout.modules if m.name == layout.output_embeddings), None)
    heads = [m for m in layout.linear_modules() if m.layer is None and m.out_features == layout.vocab_size]
    return heads[-1] if heads else None


def all_linear(layout: Layout) -> list[str]:
    """The full names peft's ``"all-linear"`` expands to: every linear or Conv1D module but the output head."""
    head = output_head(layout)
    return [m.name for m in layout.linear_modules() if head is None or m.name != head.name]


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The block index peft reads from a qualified module name, or None outside the blocks."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def matches(
    name: str,
    target_modules: Targets,
    layers_to_transform: Sequence[int] | int | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Whether the module called ``name`` is a target (peft's rule). ``"all-linear"`` needs the layout: expand it
    with :func:`all_linear` first (:func:`select` does)."""
    if is_all_linear(target_modules):
        raise SurveyError("target_modules='all-linear' depends on the model: expand it with all_linear(layout)")
    if isinstance(target_modules, str):
        try:
            return re.fullmatch(target_modules, name) is not None
        except re.error as error:  # a typed regex is user input: one line naming it, not a traceback
            raise SurveyError(f"target_modules={target_modules!r} is not a valid regular expression ({error})") \
                from None
    if name in target_modules:
        return True  # peft: a module named in full is a target whatever layers_to_transform says
    found = any(name.endswith(f".{t}") for t in target_modules)
    if not found or layers_to_transform is None or layers_to_transform == []:
        return found
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    if isinstance(layers_to_transform, int):
        return index == layers_to_transform
    return index in layers_to_transform


def num_blocks(layout: Layout) -> int:
    """How many block indices ``layers_to_transform`` can name (T5's encoder and decoder share them)."""
    indices = [layer_index(m.name) for m in layout.modules]
    return max((i for i in indices if i is not None), default=-1) + 1


def select(
    layout: Layout,
    target_modules: Targets | None,
    layers_to_transform: Sequence[int] | int | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    kinds: tuple[str, ...] = ("linear", "conv1d"),
    model_name: str = "the model",
    method: str = "this method",
) -> list[ModuleSpec]:
    """The modules of ``layout`` that a method with these settings adapts, validated.

    ``target_modules=None`` takes the architecture's default (the query and value projections, as peft's
    defaults do). Every named target must exist, every layer index must be in range, and every match must
    be a module of one of ``kinds``; otherwise a one-line :class:`SurveyError` names the bad value.
    """
    key = (id(layout), _freeze(target_modules), _freeze(layers_to_transform), _freeze(layers_pattern), kinds,
           model_name, method)
    hit = _SELECTED.get(key)
    if hit is not None and hit[0] is layout:
        return list(hit[1])
    chosen = _select(layout, target_modules, layers_to_transform, layers_pattern, kinds, model_name, method)
    if len(_SELECTED) > 4096:
        _SELECTED.clear()
    _SELECTED[key] = (layout, tuple(chosen))
    return chosen


# Widgets sweep a hyper-parameter over the same targets many times; selection is cached per layout object.
_SELECTED: dict[tuple, tuple[Layout, tuple[ModuleSpec, ...]]] = {}


def _freeze(value: object) -> object:
    return tuple(value) if isinstance(value, list | tuple) else value


def peft_lora_expert_targets(model_type: str) -> tuple[str, ...]:
    """The ``target_parameters`` peft 0.21.2 adds when LoRA's ``target_modules`` is ``"all-linear"`` on a model
    type whose experts transformers 5 fused (its ``_convert_peft_config_moe``: the Mixtral and Qwen2-MoE conversion
    patterns): the v4 names of the experts and the router are moved to the fused expert tensors (``gate_up_proj``
    at rank ``2 r``, ``down_proj``) and the router's ``gate.weight``, and dropped from ``target_modules``, taking
    the dense MLPs' ``gate_proj``/``up_proj``/``down_proj`` linears with them. Empty for every other model type."""
    if "peft.utils.transformers_weight_conversion" not in _PEFT_CONVERSION_CACHE:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_TARGET_MODULE_MAPPING,
            get_checkpoint_conversion_mapping,
        )

        _PEFT_CONVERSION_CACHE["peft.utils.transformers_weight_conversion"] = (
            _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING, get_checkpoint_conversion_mapping)
    patterns, mappings, conversion = _PEFT_CONVERSION_CACHE["peft.utils.transformers_weight_conversion"]
    mapping = mappings.get(patterns.get(model_type, ""), {})
    if not mapping or conversion(model_type) is None:
        return ()
    return tuple(sorted(set(mapping.values())))


_PEFT_CONVERSION_CACHE: dict[str, tuple] = {}

# peft 0.21.2's _check_lora_target_modules_mamba: LoRA-like adapters refuse these modules of these model types.
PEFT_MAMBA_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
PEFT_MAMBA_INCOMPATIBLE = frozenset({"out_proj", "conv1d"})


def peft_lora_incompatible(model_type: str, chosen: Sequence[ModuleSpec]) -> str | None:
    """The first chosen module peft refuses LoRA on (a Mamba mixer's ``out_proj`` or ``conv1d``), else None."""
    if model_type not in PEFT_MAMBA_TYPES:
        return None
    return next((m.name for m in chosen if m.short_name in PEFT_MAMBA_INCOMPATIBLE), None)


def _select(layout: Layout, target_modules: Targets | None, layers_to_transform: Sequence[int] | int | None,
            layers_pattern: str | Sequence[str] | None, kinds: tuple[str, ...], model_name: str,
            method: str) -> list[ModuleSpec]:
    if target_modules is None:
        if not layout.default_lora_targets:
            raise SurveyError(f"peft has no default target_modules for model type '{layout.family}': name them "
                              f"for {method} on {model_name}; its linear modules are: "
                              f"{', '.join(layout.linear_names())}")
        target_modules = list(layout.default_lora_targets)
    if is_all_linear(target_modules):
        target_modules = all_linear(layout)  # full names: peft then ignores layers_to_transform for them too
        if not target_modules:
            raise SurveyError(f"target_modules='all-linear' finds no linear module in {model_name} besides its "
                              "output head")
    if not isinstance(target_modules, str) and len(target_modules) == 0:
        raise SurveyError(f"target_modules is empty: {method} needs at least one module of {model_name}")
    _check_layers(layout, layers_to_transform, model_name)
    if not isinstance(target_modules, str):
        known = {m.short_name for m in layout.modules} | {m.name for m in layout.modules}
        for target in target_modules:
            if target not in known and not any(m.name.endswith(f".{target}") for m in layout.modules):
                raise SurveyError(
                    f"target module '{target}' not found in {model_name}; its linear modules are: "
                    f"{closest(target, layout.linear_names())}"
                )
    chosen = [m for m in layout.modules if matches(m.name, target_modules, layers_to_transform, layers_pattern)]
    if not chosen:
        raise SurveyError(f"target_modules={target_modules!r} matches no module of {model_name}")
    wrong = [m for m in chosen if m.kind not in kinds]
    if wrong:
        raise SurveyError(
            f"{method} adapts {'/'.join(kinds)} modules; target '{wrong[0].name}' of {model_name} is of kind '{wrong[0].kind}'"
        )
    return chosen


def _check_layers(layout: Layout, layers: Sequence[int] | int | None, model_name: str) -> None:
    if layers is None:
        return
    blocks = num_blocks(layout)
    for index in [layers] if isinstance(layers, int) else layers:
        if not 0 <= int(index) < blocks:
            raise SurveyError(
                f"layer {index} out of range: {model_name} has {blocks} blocks (0-{blocks - 1})"
            )
