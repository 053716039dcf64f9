r"""Hybrids as compositions of registered methods (chapter 05), as AdapterHub's ``ConfigUnion``.

A hybrid such as the MAM adapter (prefix tuning on attention + a scaled parallel adapter on the FFN, He et
al. 2022) re-implements nothing: :func:`compose` builds a :class:`~survey_utils.methods.registry.Method`
from registered *parts*, each a method with the settings the hybrid's recipe fixes. The composition

- exposes every part's hyper-parameters under ``<part>.<name>`` (the recipe's settings as defaults);
- applies the parts in order to one model, keeping trainable exactly what each part trains (a part's
  ``apply`` freezes the model first, so the composition re-enables the earlier parts' parameters);
- counts :math:`\sum_{p} \text{count}_p + \text{extra}` (its own additions, such as UniPELT's gates);
- sums the parts' memory terms, extra positions and frozen parameters, and takes the union of their
  gradient sites;
- refuses parts that collide: two parts adding positions (they share the model's one prompt hook), or two
  parts wrapping the same module.

Everything here is arithmetic on the parts' fields, so a composition loads without torch like every family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError
from survey_utils.methods.registry import HyperParam, Method, Taxonomy, get_method

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

SEPARATOR = "."


@dataclass(frozen=True)
class Part:
    """One registered method inside a hybrid, with the settings the hybrid's recipe fixes as defaults."""

    label: str
    """Namespace of the part's hyper-parameters (``prefix`` -> ``prefix.num_virtual_tokens``)."""
    method: str
    """The registered method's name."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The recipe's values; they become the defaults of the part's hyper-parameters."""

    @property
    def registered(self) -> Method:
        return get_method(self.method)


@dataclass(frozen=True)
class Extra:
    """What a hybrid adds beyond its parts (UniPELT's gates): its own count, layers and memory."""

    trainable_params: Callable[..., int]
    """``trainable_params(config, parts_hp) -> int``, ``parts_hp`` mapping each part label to its resolved
    hyper-parameters."""
    apply: Callable[..., Any]
    """``apply(model, parts_hp) -> None``: add the extra modules after every part is in place."""
    memory_terms: Callable[..., dict[str, int]] | None = None
    """Like ``Method.memory_terms`` with ``parts_hp`` instead of ``**hp``; ``None``: saves nothing."""
    param_prefixes: tuple[str, ...] = ()


def split_settings(parts: Sequence[Part], hp: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"prefix.num_virtual_tokens": 30, ...}`` -> ``{"prefix": {"num_virtual_tokens": 30}, ...}``."""
    by_part: dict[str, dict[str, Any]] = {part.label: {} for part in parts}
    for key, value in hp.items():
        label, _, name = key.partition(SEPARATOR)
        by_part[label][name] = value
    return by_part


def _namespaced(part: Part) -> tuple[HyperParam, ...]:
    method = part.registered
    unknown = set(part.settings) - {hp.name for hp in method.hyperparams}
    if unknown:
        raise ValueError(f"part '{part.label}' sets {sorted(unknown)}, which {method.name} does not have")
    return tuple(replace(hp, name=f"{part.label}{SEPARATOR}{hp.name}", default=part.settings.get(hp.name, hp.default),
                         help=f"{part.registered.title}: {hp.help}")
                 for hp in method.hyperparams)


def _target_names(method: Method, config: PretrainedConfig, hp: dict[str, Any]) -> set[str]:
    """Modules a part wraps: its targets, or the sites its branch joins (adapters); prompts, and parts that only
    unfreeze base parameters (BitFit: ``adds_parameters=False``), wrap nothing."""
    if not method.adds_parameters or ("target_modules" not in hp and method.extra_positions is not None):
        return set()
    sites = method.sites(config, **hp)
    return {spec.name for spec in sites} if isinstance(sites, list) else set()


def check_collisions(parts: Sequence[Part], config: PretrainedConfig, by_part: dict[str, dict[str, Any]]) -> None:
    """Refuse parts that cannot share one model: two that add positions, or two that wrap one module."""
    positional = [p.label for p in parts if p.registered.extra_positions is not None]
    if len(positional) > 1:
        raise SurveyError(f"parts {' and '.join(positional)} both add positions (one prompt hook per model)")
    claimed: dict[str, str] = {}
    labels = [p.label for p in parts]
    for part in parts:
        for name in _target_names(part.registered, config, by_part[part.label]):
            if name in claimed:
                raise SurveyError(f"parts {claimed[name]} and {part.label} both wrap module '{name}'")
            claimed[name] = part.label
    for part in parts:  # a part that unfreezes base parameters finds them by name: before any part wraps them
        method = part.registered
        if method.adds_parameters or method.unfrozen_params is None:
            continue
        for spec, _ in method.unfrozen_params(config, **by_part[part.label]):
            if spec.name in claimed and labels.index(claimed[spec.name]) < labels.index(part.label):
                raise SurveyError(f"part {part.label} must come before part {claimed[spec.name]}, which wraps "
                                  f"module '{spec.name}' whose parameters {part.label} trains")


def compose(name: str, title: str, paper: str, arxiv_id: str | None, taxonomy: Taxonomy, chapter: str,
            parts: Sequence[Part], extra: Extra | None = None, notes: str = "") -> Method:
    """A :class:`Method` that applies ``parts`` (and ``extra``) to one model; see the module docstring.

    Register the result with :func:`~survey_utils.methods.registry.register` like any method.
    """
    labels = [p.label for p in parts]
    if len(set(labels)) != len(labels) or any(SEPARATOR in label for label in labels):
        raise ValueError(f"{name}: part labels must be distinct and contain no '{SEPARATOR}': {labels}")
    hyperparams = tuple(hp for part in parts for hp in _namespaced(part))

    def resolved_parts(config: PretrainedConfig, hp: dict[str, Any]) -> dict[str, dict[str, Any]]:
        by_part = split_settings(parts, hp)
        return {p.label: p.registered.resolve(config, **by_part[p.label]) for p in parts}

    def part_hyperparams(config: PretrainedConfig, **hp: Any) -> dict[str, dict[str, Any]]:
        """Each part's resolved hyper-parameters (``Method.part_hyperparams``)."""
        return resolved_parts(config, hp)

    def validate(config: PretrainedConfig, **hp: Any) -> None:
        check_collisions(parts, config, resolved_parts(config, hp))

    def apply(model: nn.Module, **hp: Any) -> nn.Module:
        """Apply each part in order; keep trainable what each part made trainable; then the extra."""
        by_part = resolved_parts(model.config, hp)
        trained: list[Any] = []
        for part in parts:
            part.registered.apply(model, **by_part[part.label])
            trained.extend(p for p in model.parameters() if p.requires_grad)
        for parameter in trained:  # a later part's freeze() froze the earlier parts' parameters
            parameter.requires_grad_(True)
        if extra is not None:
            extra.apply(model, by_part)
        return model

    def trainable_params(config: PretrainedConfig, **hp: Any) -> int:
        r""":math:`\sum_p \text{count}_p + \text{extra}`: the parts' closed forms and the hybrid's own additions."""
        by_part = resolved_parts(config, hp)
        own = extra.trainable_params(config, by_part) if extra is not None else 0
        return sum(p.registered.trainable_params(config, **by_part[p.label]) for p in parts) + own

    def memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                     **hp: Any) -> dict[str, int]:
        by_part = resolved_parts(config, hp)
        terms: dict[str, int] = {}
        for part in parts:
            own = part.registered.memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes,
                                               **by_part[part.label])
            terms.update({f"{part.label}: {k}": v for k, v in own.items()})
        if extra is not None and extra.memory_terms is not None:
            terms.update(extra.memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, by_part))
        return terms

    def gradient_sites(config: PretrainedConfig, **hp: Any) -> list[Any] | str:
        by_part = resolved_parts(config, hp)
        sites: list[Any] = []
        for part in parts:
            found = part.registered.sites(config, **by_part[part.label])
            if found == "input" or found is None:
                return "input"
            sites.extend(found)
        return sites

    def unfrozen_params(config: PretrainedConfig, **hp: Any) -> list[Any]:
        """The base parameters the parts that unfreeze (BitFit) train, by part."""
        by_part = resolved_parts(config, hp)
        return [found for p in parts if p.registered.unfrozen_params is not None
                for found in p.registered.unfrozen_params(config, **by_part[p.label])]

    def extra_positions(config: PretrainedConfig, **hp: Any) -> int:
        by_part = resolved_parts(config, hp)
        return sum(p.registered.extra_positions(config, **by_part[p.label]) for p in parts
                   if p.registered.extra_positions is not None)

    def frozen_added_params(config: PretrainedConfig, **hp: Any) -> int:
        by_part = resolved_parts(config, hp)
        return sum(p.registered.frozen_added_params(config, **by_part[p.label]) for p in parts
                   if p.registered.frozen_added_params is not None)

    def largest_trainable_tensor(config: PretrainedConfig, **hp: Any) -> int:
        """The biggest part's biggest tensor (a part that declares none is bounded by its whole count)."""
        by_part = resolved_parts(config, hp)
        sizes = [(p.registered.largest_trainable_tensor or p.registered.trainable_params)(config, **by_part[p.label])
                 for p in parts]
        return max(sizes + ([extra.trainable_params(config, by_part)] if extra is not None else []))

    members = [p.registered for p in parts]
    positional = any(m.extra_positions is not None for m in members)
    apply.__doc__ = f"{title}: " + " + ".join(f"{m.title} ({p.label})" for p, m in zip(parts, members, strict=True))
    return Method(
        name=name, title=title, paper=paper, arxiv_id=arxiv_id, taxonomy=taxonomy, chapter=chapter,
        hyperparams=hyperparams, apply=apply, trainable_params=trainable_params, memory_terms=memory_terms,
        validate=validate, gradient_sites=gradient_sites, largest_trainable_tensor=largest_trainable_tensor,
        extra_positions=extra_positions if positional else None,
        key_value_positions=positional and all(m.key_value_positions for m in members if m.extra_positions),
        frozen_added_params=frozen_added_params if any(m.frozen_added_params for m in members) else None,
        unfrozen_params=unfrozen_params if any(m.unfrozen_params for m in members) else None,
        param_prefixes=tuple(dict.fromkeys(x for m in members for x in m.param_prefixes))
        + (extra.param_prefixes if extra else ()),
        mergeable=all(m.mergeable for m in members) and extra is None,
        backprop_through_backbone=any(m.backprop_through_backbone for m in members),
        parts=tuple(parts), part_hyperparams=part_hyperparams,
        notes=notes,
    )
