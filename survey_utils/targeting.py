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
from dataclasses import dataclass
from functools import lru_cache

from survey_utils.architecture import Layout, ModuleSpec, excluded_from_targets
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
    patterns = () if not layers_pattern else (
        (layers_pattern,) if isinstance(layers_pattern, str) else tuple(layers_pattern))
    return _layer_index(name, patterns)


@lru_cache(maxsize=65536)  # asked for every module of a layout by every select(): the advisor asks ~10^5 times
def _layer_index(name: str, patterns: tuple[str, ...]) -> int | None:
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
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
    hit = _BLOCKS.get(id(layout))
    if hit is None or hit[0] is not layout:  # layouts are immutable and cached: keep the answer beside them
        if len(_BLOCKS) >= 256:
            _BLOCKS.clear()
        indices = [layer_index(m.name) for m in layout.modules]
        hit = _BLOCKS[id(layout)] = (layout, max((i for i in indices if i is not None), default=-1) + 1)
    return hit[1]


_BLOCKS: dict[int, tuple[Layout, int]] = {}


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


@dataclass(frozen=True)
class TargetParameter:
    """One ``nn.Parameter`` LoRA adapts directly (peft's ``target_parameters``, its ``ParamWrapper``).

    A 3-D parameter holds ``experts`` stacked matrices (transformers 5's fused experts), each ``d_out x d_in``
    (stored ``(experts, d_out, d_in)``, or ``(experts, d_in, d_out)`` where the module says ``is_transposed``); a
    2-D parameter is one matrix stored ``d_out x d_in`` (``experts`` = 1). ``rank_factor`` multiplies LoRA's ``r``
    and ``lora_alpha`` here (peft's ``rank_pattern`` for the fused ``gate_up_proj``: ``w1`` and ``w3`` were two
    adapters of rank ``r`` before transformers 5 fused them)."""

    module: ModuleSpec
    param: str
    shape: tuple[int, ...]
    transposed: bool = False
    rank_factor: int = 1

    @property
    def name(self) -> str:
        return f"{self.module.name}.{self.param}"

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def in_features(self) -> int:
        return self.shape[-2] if self.transposed else self.shape[-1]

    @property
    def out_features(self) -> int:
        return self.shape[-1] if self.transposed else self.shape[-2]


@dataclass(frozen=True)
class LoraTargets:
    """What peft 0.21.2's ``LoraConfig`` adapts once its transformers-5 conversion has run.

    ``target_modules`` is what :func:`select` then takes (``None``: the architecture's default);
    ``target_parameters`` the parameter names peft matches (the user's first, then those the conversion adds);
    ``required`` the user's own, each of which must match a parameter (peft is silent about one that does not;
    we refuse it); ``rank_factors`` the names (``gate_up_proj``) whose adapters get ``r`` and ``lora_alpha`` times
    the factor, peft's ``rank_pattern``/``alpha_pattern`` ``.*\\.gate_up_proj``, which reaches modules and
    parameters whose name ends in ``.gate_up_proj``."""

    target_modules: Targets | None
    target_parameters: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    rank_factors: tuple[tuple[str, int], ...] = ()

    def rank_factor(self, name: str) -> int:
        """The factor on ``r`` and ``lora_alpha`` for the module or parameter called ``name`` (1 for most)."""
        return next((f for suffix, f in self.rank_factors if name.endswith(f".{suffix}")), 1)


def peft_lora_targets(layout: Layout, target_modules: Targets | None,
                      target_parameters: Sequence[str] | None = None) -> LoraTargets:
    """peft 0.21.2's ``_convert_peft_config_moe`` (``peft/utils/transformers_weight_conversion.py``), which
    ``inject_adapter`` runs on every ``LoraConfig`` before matching, applied to a layout.

    On a model type whose experts transformers 5 fused (its conversion patterns ``mixtral`` and ``qwen2_moe``:
    :data:`_MOE_TARGET_MODULE_MAPPING`), the v4 names of the experts' linears and of the router are moved from
    ``target_modules`` to ``target_parameters``: ``w1``/``w3`` or ``gate_proj``/``up_proj`` to the fused
    ``gate_up_proj`` (rank and alpha doubled, one only of the two is refused), ``w2``/``down_proj`` to
    ``down_proj``, ``gate`` to ``gate.weight``. ``"all-linear"`` is first resolved to the short names of every
    linear but the output head, plus those v4 names: so the dense MLPs' and shared experts' ``gate_proj``,
    ``up_proj`` and ``down_proj`` linears leave with them, and the short names then match in every block (and
    obey ``layers_to_transform``). peft resolves a regular expression to the last segments of every module of the
    built model it matches, parameterless ones included (``act_fn``, which it then fails to adapt); a layout lists
    only modules that own parameters, so a regex is refused on these types, in one line. Every other model type,
    and a ``None`` target (ours is spelt out before peft sees it), is left as it is."""
    user = tuple(dict.fromkeys(target_parameters or ()))
    mapping, fused = _peft_moe_conversion(layout.family)
    if not mapping or target_modules is None:
        return LoraTargets(target_modules, user, user)
    if isinstance(target_modules, str):
        if not is_all_linear(target_modules):
            raise SurveyError(f"target_modules={target_modules!r} on '{layout.family}': peft 0.21.2 resolves a regular "
                              "expression against every module of the built model (parameterless ones such as act_fn "
                              "included) before moving the expert names; name the modules as a list")
        # peft's _resolve_string_target_modules: the short names of every linear but the head, plus the v4 names
        target_modules = sorted({name.rsplit(".", 1)[-1] for name in all_linear(layout)} | set(mapping))
    remaining: list[str] = []
    added: list[str] = []
    present: dict[str, set[str]] = {new: set() for new in fused}
    for target in target_modules:
        old = next((o for o in mapping if target == o or target.endswith(f".{o}")), None)
        if old is None:
            remaining.append(target)
            continue
        added.append(mapping[old])
        if mapping[old] in fused:
            present[mapping[old]].add(old)
    factors = []
    for new, olds in fused.items():
        if 0 < len(present[new]) < len(olds):
            raise SurveyError(f"target_modules names {', '.join(sorted(present[new]))} without "
                              f"{', '.join(sorted(set(olds) - present[new]))} on '{layout.family}': transformers 5 "
                              f"fused them into {new}, and peft 0.21.2 cannot convert one without the other")
        if len(present[new]) == len(olds) > 1:
            factors.append((new, len(olds)))
    parameters = tuple(dict.fromkeys(user + tuple(sorted(set(added)))))
    return LoraTargets(sorted(set(remaining)), parameters, user, tuple(factors))


def select_parameters(layout: Layout, targets: LoraTargets) -> list[TargetParameter]:
    """The parameters ``targets.target_parameters`` match (peft's rule: the full name equals a target or ends in
    ``.target``), in module order. A target of :attr:`LoraTargets.required` that matches nothing, or a parameter
    that is neither 2-D nor 3-D (peft's ``ParamWrapper`` takes only those), is refused in one line."""
    if not targets.target_parameters:
        return []
    from survey_utils.generic_layout import transposed_modules

    transposed = transposed_modules(layout)
    found: list[TargetParameter] = []
    matched: set[str] = set()
    for module in layout.modules:
        if module.tied_to:
            continue
        for (param, _), shape in zip(module.params, module.shapes, strict=False):
            full = f"{module.name}.{param}"
            hits = [t for t in targets.target_parameters if full == t or full.endswith(f".{t}")]
            if not hits:
                continue
            matched.update(hits)
            if len(shape) not in (2, 3):
                raise SurveyError(f"target parameter '{full}' has {len(shape)} dimensions: peft's LoRA on "
                                  "parameters takes 2-D and 3-D ones only")
            found.append(TargetParameter(module, param, tuple(shape), module.name in transposed,
                                         targets.rank_factor(full)))
    missing = [t for t in targets.required if t not in matched]
    if missing:  # name the 3-D tensors as a target would, from their block on (mlp.experts.gate_up_proj)
        have = list(dict.fromkeys(re.sub(r"^.*?\.\d+\.", "", f"{m.name}.{p}") for m in layout.modules
                                  if not m.tied_to for (p, _), s in zip(m.params, m.shapes, strict=False)
                                  if len(s) == 3))
        raise SurveyError(f"target parameter '{missing[0]}' matches no parameter of {layout.family}; its expert "
                          f"tensors are: {closest(missing[0], have) if have else 'none (it has no 3-D tensor)'}")
    return found


def _peft_moe_conversion(model_type: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """peft 0.21.2's v4 -> v5 target mapping and fused targets for ``model_type`` (empty where it converts
    nothing), from the transcription below: no import of peft or transformers, so closed forms stay light."""
    pattern = PEFT_MOE_TYPES.get(model_type)
    if pattern is None:
        return {}, {}
    return dict(PEFT_MOE_MAPPING[pattern]), {k: list(v) for k, v in PEFT_MOE_FUSED[pattern].items()}


# peft 0.21.2's transformers-5 MoE conversion (peft/utils/transformers_weight_conversion.py): its
# _MOE_TARGET_MODULE_MAPPING and _MOE_FUSED_TARGETS, and the model types it converts (those whose
# _MODEL_TO_CONVERSION_PATTERN is one of the two and for which transformers 5.23 has a checkpoint conversion,
# get_checkpoint_conversion_mapping), transcribed; tests/test_targeting.py checks them against the installed
# peft and transformers.
PEFT_MOE_MAPPING: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
PEFT_MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}
PEFT_MOE_TYPES: dict[str, str] = {
    **{t: "mixtral" for t in ("minimax", "minimax_m2", "mixtral")},
    **{t: "qwen2_moe" for t in (
        "Dots3NoteTextModel", "UnlimitedOcrTextModel", "afmoe", "beam", "cohere2_moe", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe",
        "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash", "mellum", "olmoe", "qwen3_moe", "qwen3_next",
        "qwen3_omni_moe", "qwen3_omni_moe_text", "qwen3_omni_moe_thinker", "solar_open")},
}

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
    kept = [m for m in chosen if not excluded_from_targets(m.name, layout)]  # a task head trains whole (peft)
    if chosen and not kept:
        raise SurveyError(f"target_modules={target_modules!r} names only {model_name}'s task head "
                          f"({', '.join(layout.task_head)}), which peft trains whole (modules_to_save), never adapts")
    chosen = kept
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
