"""Exact parameter counts, three ways: the closed form, the built model, and HF peft (chapter 00).

``count_parameters(model)`` counts a built model, tied weights once, and splits the count by component
(embeddings, attention, mlp, norms, head, and the method's own parameters). ``count(...)`` answers for a
zoo model and a registered method with one of three implementations:

- ``formula``: arithmetic on the config's layout; milliseconds for a 405B model;
- ``scratch``: build the model on ``meta``, apply our from-scratch method, count ``named_parameters()``;
- ``peft``: build it on ``meta``, wrap it with ``peft.get_peft_model``, take ``get_nb_trainable_parameters()``.

A task-head model (``...ForSequenceClassification`` and the like, :attr:`Layout.task_head`) trains its head beside
the method, as peft's task-type models do (``modules_to_save``). peft's printed "all params" then hold the head twice:
its ``ModulesToSaveWrapper`` keeps the frozen original beside the trainable copy. :attr:`ParameterCount.peft_total`
says that number, and :meth:`ParameterCount.peft_note` why it differs from ours (chapter 00, "Task heads").
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import (
    COMPONENTS,
    layout,
    params_by_component,
    task_head_trainable,
    total_params,
    train_task_head,
)
from survey_utils.errors import SurveyError
from survey_utils.methods.registry import MASK_INDEX_SUFFIX, Method, get_method
from survey_utils.zoo import build_model, load_config

if TYPE_CHECKING:  # the closed form needs neither; only the paths that build a model import torch
    from torch import nn
    from transformers import PretrainedConfig

IMPLEMENTATIONS = ("formula", "scratch", "peft")

# Wrappers insert these path segments; removing them recovers the base model's parameter names.
_WRAPPER_SEGMENTS = (".base_layer", "base_model.model.")


@dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameters, with ``(trainable, total)`` for each component."""

    trainable: int
    total: int
    by_component: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Mixture-of-experts models only (else None): the parameters one token uses, the method's included
    # (:attr:`survey_utils.architecture.Layout.active_params`: routers, shared experts, top-k routed experts; of
    # what the method adds inside routed experts, the top-k experts' share, Method.routed_added_params).
    active: int | None = None
    # Task-head models only (Layout.task_head not empty): peft's task type, the head's modules, its parameters that
    # train beside the method (included in ``trainable``), and the "all params" peft prints: ``total`` plus the
    # head's trainable copy (None where the method trains the whole model: the head is then simply part of it).
    task_type: str | None = None
    task_head: tuple[str, ...] = ()
    head_trainable: int = 0
    peft_total: int | None = None

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def peft_note(self) -> str | None:
        """One line: why peft's printed "all params" exceed our total (None when they do not)."""
        if self.peft_total is None or self.peft_total == self.total:
            return None
        return (f"peft prints all params {self.peft_total:,} = {self.total:,} + {self.peft_total - self.total:,}: "
                f"its ModulesToSaveWrapper keeps the frozen original of {', '.join(self.task_head)} beside the "
                f"trainable copy ({self.task_type} puts it in modules_to_save); the head is one model's weights, "
                "counted once here")

    def as_dict(self) -> dict[str, Any]:
        out = {"trainable": self.trainable, "total": self.total,
               "trainable_percent": self.trainable_percent,
               "by_component": {k: {"trainable": t, "total": n} for k, (t, n) in self.by_component.items()}}
        if self.active is not None:
            out["active"] = self.active
        out.update(self.task_head_dict())
        return out

    def task_head_dict(self) -> dict[str, Any]:
        """The task-head fields for JSON (empty for a model without a task head)."""
        if self.task_type is None:
            return {}
        return {"task_type": self.task_type, "task_head": list(self.task_head), "head_trainable": self.head_trainable,
                "peft_total": self.peft_total, "peft_note": self.peft_note()}


def base_name(name: str) -> str:
    """A parameter's name in the unwrapped base model (drops peft's and our wrapper segments)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    # peft's ModulesToSaveWrapper (modules_to_save: a task head) holds the original and a trainable copy
    for segment in (".base_layer.", ".original_module.", ".modules_to_save.default."):
        name = name.replace(segment, ".")
    return name


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count a built model's parameters (shared tensors once), split by component.

    A parameter whose name is in the config's layout belongs to that layout component; any other (the
    method's own modules, or a model without a known layout) is counted under ``method``. A trainable parameter
    with a gradient mask (a ``<name>_mask_index`` buffer, :attr:`Method.mask_kept`) counts the entries its mask
    keeps, not its elements.
    """
    component_of: dict[str, str] = {}
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "base_model"):
        config = getattr(model.base_model, "config", None)
    if config is not None:
        try:
            for module in layout(config).modules:
                for param, _ in module.params:
                    component_of[f"{module.name}.{param}"] = module.component
        except SurveyError:
            component_of = {}
    trainable = total = 0
    split = {c: [0, 0] for c in COMPONENTS}
    masks = {f"{prefix}.{key[:-len(MASK_INDEX_SUFFIX)]}".lstrip("."): buffer.numel()
             for prefix, module in model.named_modules() for key, buffer in module._buffers.items()
             if key.endswith(MASK_INDEX_SUFFIX) and buffer is not None}
    for name, parameter in model.named_parameters():  # named_parameters() yields a shared tensor once
        n = parameter.numel()
        component = component_of.get(base_name(name), "method")
        split[component][1] += n
        total += n
        if parameter.requires_grad:
            split[component][0] += masks.get(name, n)
            trainable += masks.get(name, n)
    return ParameterCount(trainable, total, {c: (t, n) for c, (t, n) in split.items() if n})


def closed_form(model: str | os.PathLike[str] | PretrainedConfig, method: str | Method,
                **overrides: Any) -> ParameterCount:
    """Trainable and total parameters from the config alone (no model is built)."""
    config = load_config(model)
    method = get_method(method) if isinstance(method, str) else method
    hp = method.resolve(config, **overrides)
    trainable = method.trainable_params(config, **hp)
    added = method.added_params(config, **hp)
    base = params_by_component(config)
    split = {c: (0, n) for c, n in base.items() if n}
    if method.trains_whole_model:
        split = {c: (n, n) for c, n in base.items() if n}
    else:
        unfrozen = 0  # base parameters that train (selective methods, and hybrids with such a part), by component
        for spec, name in method.unfrozen_params(config, **hp) if method.unfrozen_params is not None else ():
            if not spec.tied_to:
                done, n = split[spec.component]
                numel = dict(spec.params)[name]
                kept = method.mask_kept(numel, **hp) if method.mask_kept else numel
                split[spec.component] = (done + kept, n)
                unfrozen += kept
        if added:
            split["method"] = (trainable - unfrozen, added)
    shape = layout(config)
    # A task head trains whole beside the method (peft's modules_to_save), less what the method already trains there.
    unfrozen_specs = method.unfrozen_params(config, **hp) if method.unfrozen_params is not None else ()
    head = task_head_trainable(shape, method.trains_whole_model, unfrozen_specs)
    if head:
        done, n = split["head"]
        split["head"] = (done + head, n)
        trainable += head
    active = None
    if shape.num_experts:  # a token uses its top-k experts' share of what the method adds inside the experts
        routed = method.routed_added_params(config, **hp) if method.routed_added_params is not None else 0
        active = shape.active_params + added - routed + routed * shape.experts_per_token // shape.num_experts
    total = total_params(config) + added
    return ParameterCount(trainable, total, split, active, **_task_fields(shape, method, total, head))


def _task_fields(shape: Any, method: Method, total: int, head: int) -> dict[str, Any]:
    """ParameterCount's task-head fields: peft's printed total is ours plus the head's copy (peft 0.21.2,
    utils/other.py, ModulesToSaveWrapper: ``original_module`` frozen, ``modules_to_save[adapter]`` a deepcopy that
    trains; ``get_nb_trainable_parameters`` counts both, since they are two tensors)."""
    if shape.task_type is None:
        return {}
    copied = shape.task_head_numel if shape.task_head and not method.trains_whole_model else 0
    return {"task_type": shape.task_type, "task_head": shape.task_head, "head_trainable": head,
            "peft_total": total + copied if not method.trains_whole_model else None}


@lru_cache(maxsize=512)
def changed_params(model_name: str, method_name: str, settings: tuple[tuple[str, Any], ...] = ()) -> tuple[int, int]:
    """``(changed, base total)``: parameters that differ from the base model after training and merging, with the
    method at its defaults updated by ``settings`` (``(name, value)`` pairs, lists as tuples: a cache key).

    Built on ``meta`` (any size). Changed = base tensors that ``merge`` writes in place (seen by their
    version counters) + base tensors trained in place + trainable tensors the method adds and keeps (those
    of a module whose merge folded them into the base are dropped). Whole tensors count as changed, except
    where a mask says less: a base tensor trained through a fixed gradient mask changes on its kept entries
    (a mask redrawn every step, ``mask_resampled``, reaches them all), and a module whose ``merge`` writes
    only some entries says how many in ``merged_entries`` (diff pruning's pruned delta).
    Defined for chapter 03, section "Trained, changed, stored" (chapter 07's table reads it too).
    """
    model = build_model(model_name, device="meta")
    base = {id(p): p for p in model.parameters()}
    base_total = sum(p.numel() for p in base.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_method(model, method_name, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings})
    kept = {id(module.get_parameter(key[:-len(MASK_INDEX_SUFFIX)])): buffer.numel()
            for module in model.modules() for key, buffer in module._buffers.items()
            if key.endswith(MASK_INDEX_SUFFIX) and buffer is not None
            and not getattr(module.get_parameter(key[:-len(MASK_INDEX_SUFFIX)]), "mask_resampled", False)}
    trainable_base = {id(p) for p in model.parameters() if p.requires_grad and id(p) in base}
    before = {k: p._version for k, p in base.items()}
    folded: set[int] = set()
    partly_written: dict[int, int] = {}
    for module in model.modules():
        if module is model or not callable(getattr(module, "merge", None)):
            continue
        own = [p for p in module.parameters() if id(p) in base]
        versions = [p._version for p in own]
        module.merge()
        written_own = [p for p, v in zip(own, versions, strict=True) if p._version != v]
        if written_own:
            folded |= {id(p) for p in module.parameters() if id(p) not in base}
            entries = getattr(module, "merged_entries", None)
            if entries is not None:
                partly_written[id(written_own[0])] = entries
    written = {k for k, p in base.items() if p._version != before[k]}
    changed = sum(partly_written.get(k, kept.get(k, base[k].numel())) for k in written | trainable_base)
    changed += sum(p.numel() for p in model.parameters()
                   if p.requires_grad and id(p) not in base and id(p) not in folded)
    return changed, base_total


def apply_method(model: nn.Module, method: str | Method, **overrides: Any) -> nn.Module:
    """Apply a registered method from scratch to a built model (hyper-parameters resolved and checked)."""
    method = get_method(method) if isinstance(method, str) else method
    hp = method.resolve(model.config, **overrides)
    applied = method.apply(model, **hp)
    train_task_head(applied, method.trains_whole_model)  # a task head trains beside the method (modules_to_save)
    return applied


def peft_model(model: nn.Module, method: str | Method, **overrides: Any) -> nn.Module:
    """Wrap a built model with HF peft's implementation of the method."""
    import peft

    method = get_method(method) if isinstance(method, str) else method
    if method.peft_config is None:
        raise SurveyError(f"HF peft has no implementation of method '{method.name}'")
    hp = method.resolve(model.config, **overrides)
    config = method.peft_config(model.config, **hp)
    with_task_type(config, model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about meta tensors and fan_in_fan_out; neither matters here
        wrapped = peft.get_peft_model(model, config)
    if method.peft_fixup is not None:  # undoes an artifact of building peft's model on meta
        method.peft_fixup(wrapped)
    return wrapped


def with_task_type(peft_config: Any, config: PretrainedConfig) -> Any:
    """Give a peft config the model's task type (:attr:`Layout.task_type`), so that ``get_peft_model`` builds peft's
    task-type model, which puts the task head in ``modules_to_save`` (peft 0.21.2, peft_model.py,
    PeftModelForSequenceClassification.__init__ and its token-classification and question-answering siblings). A
    peft config without ``modules_to_save`` could not train the head: refused in one line."""
    shape = layout(config)
    if shape.task_type is None:
        return peft_config
    if shape.task_head and not hasattr(peft_config, "modules_to_save"):
        raise SurveyError(f"peft's {type(peft_config).__name__} has no modules_to_save: peft cannot train the task "
                          f"head {', '.join(shape.task_head)} of {shape.family}'s {shape.task_type} model")
    peft_config.task_type = shape.task_type
    return peft_config


def count(model: str | os.PathLike[str] | PretrainedConfig, method: str | Method,
          implementation: str = "formula", **overrides: Any) -> ParameterCount:
    """Trainable and total parameters of ``model`` under ``method``, by one of :data:`IMPLEMENTATIONS`."""
    if implementation not in IMPLEMENTATIONS:
        raise SurveyError(f"implementation '{implementation}' is not one of {', '.join(IMPLEMENTATIONS)}")
    config = load_config(model)
    if implementation == "formula":
        return closed_form(config, method, **overrides)
    built = build_model(config, device="meta")
    if implementation == "scratch":
        return count_parameters(apply_method(built, method, **overrides))
    import torch

    with torch.device("meta"):  # modules peft creates itself (prompt encoders) go on meta too: no memory
        wrapped = peft_model(built, method, **overrides)
    trainable, printed = wrapped.get_nb_trainable_parameters()
    split = count_parameters(wrapped).by_component
    shape = layout(config)
    # peft's "all params" hold each ModulesToSaveWrapper's original and copy: the model has the copy's tensors once
    copies = sum(p.numel() for name, p in wrapped.named_parameters() if ".original_module." in name)
    method = get_method(method) if isinstance(method, str) else method
    unfrozen = method.unfrozen_params(config, **method.resolve(config, **overrides)) \
        if method.unfrozen_params is not None else ()
    head = task_head_trainable(shape, method.trains_whole_model, unfrozen)
    fields = _task_fields(shape, method, printed - copies, head)
    if fields:
        fields["peft_total"] = printed
    return ParameterCount(trainable, printed - copies, split, **fields)


def model_name(model: str | os.PathLike[str] | PretrainedConfig) -> str:
    """A short name for ``model`` in a printed row or line: a zoo name as given; for a config, or a path to a
    ``config.json``, its ``_name_or_path`` if set, else its ``model_type``, else the file's name.

    ``str()`` of a transformers config is its whole JSON; and a config the zoo read from a path has that path as its
    ``name_or_path``, so a name that is a file is read back to what the file says.
    """
    if not isinstance(model, (str, os.PathLike)):
        named = str(getattr(model, "name_or_path", "") or "")
        if not named or not Path(named).is_file():  # a hub id ("meta-llama/Llama-2-7b-hf") is a name, not a path
            return named or str(getattr(model, "model_type", "") or type(model).__name__)
        model = named
    text = str(model)
    if not (text.endswith(".json") or os.sep in text or Path(text).is_file()):  # zoo.config_path's rule
        return text  # a zoo name
    try:
        raw = json.loads(Path(text).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # count() has already read it, or refused it in one line
        raw = {}
    raw = raw if isinstance(raw, dict) else {}
    return str(raw.get("_name_or_path") or raw.get("model_type") or Path(text).name)


def three_way(model: str | os.PathLike[str] | PretrainedConfig, method: str | Method,
              **overrides: Any) -> dict[str, Any]:
    """Trainable parameters by the formula, by counting our built model, and by peft, with ``match``.

    ``peft`` is None for methods peft does not have. ``model`` is the row's :func:`model_name`. Every chapter
    prints this table.
    """
    method = get_method(method) if isinstance(method, str) else method
    formula = count(model, method, "formula", **overrides)
    scratch = count(model, method, "scratch", **overrides)
    row: dict[str, Any] = {"model": model_name(model), "method": method.name, "formula": formula.trainable,
                           "scratch": scratch.trainable, "peft": None, "total": formula.total}
    counts = {formula.trainable, scratch.trainable}
    if method.peft_config is not None:
        row["peft"] = count(model, method, "peft", **overrides).trainable
        counts.add(row["peft"])
    row["match"] = len(counts) == 1 and formula.total == scratch.total
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of :func:`three_way` rows for printing in a chapter."""
    head = f"{'model':<16}{'method':<16}{'formula':>16}{'built (ours)':>16}{'peft':>16}{'total':>18}  match"
    lines = [head, "-" * len(head)]
    for r in rows:
        peft_text = f"{r['peft']:>16,}" if r["peft"] is not None else f"{'n/a':>16}"
        lines.append(f"{r['model']:<16}{r['method']:<16}{r['formula']:>16,}{r['scratch']:>16,}{peft_text}"
                     f"{r['total']:>18,}  {'match' if r['match'] else 'MISMATCH'}")
    return "\n".join(lines)
