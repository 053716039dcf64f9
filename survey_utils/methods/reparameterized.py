"""Reparameterized methods: the weight update is trained in a low-dimensional form (chapter 04).

Xu et al. 2023 and Wang et al. 2024 call the family "reparameterized"; Lialin et al. 2023 put LoRA in the
"reparametrization-based" region of their Venn diagram. Every method here can be merged into the base
weight after training, so inference costs what the base model costs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import ModuleSpec, layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import (
    LINEAR_KINDS,
    adapt_targets,
    freeze,
    model_label,
    replace_module,
    target_specs,
)
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register
from survey_utils.methods.shapes import factorization, lokr_numel
from survey_utils.targeting import (
    TargetParameter,
    peft_lora_incompatible,
    peft_lora_targets,
    select_parameters,
)

if TYPE_CHECKING:  # typing only: the layers (and torch) are imported inside ``apply``
    from torch import nn
    from transformers import PretrainedConfig

TARGET_HPS = (
    HyperParam("target_modules", "targets", None,
               "module names (or one regex) to adapt; None takes the architecture's query and value projections",
               nullable=True),
    HyperParam("layers_to_transform", "int_list", None, "block indices to adapt; None adapts every block",
               nullable=True),
    HyperParam("layers_pattern", "str", None, "name of the block list (layers, h, block) when it is ambiguous",
               nullable=True),
)


def lora_targets(config: PretrainedConfig, hp: dict[str, Any], method: str = "lora"
                 ) -> tuple[list[tuple[ModuleSpec, int]], list[TargetParameter]]:
    """What LoRA adapts, as peft 0.21.2 does: ``(modules with their rank factor, parameters)``.

    ``target_modules=None`` is the architecture's default (none, where peft has none and ``target_parameters`` are
    given); then peft's transformers-5 conversion (:func:`survey_utils.targeting.peft_lora_targets`) moves the
    experts' and router's v4 names to ``target_parameters`` on the fused-expert MoE types (so ``"all-linear"``
    there adapts the attention's linears, the fused expert tensors and the routers, not the dense MLPs), and the
    parameters are matched by peft's suffix rule (:func:`~survey_utils.targeting.select_parameters`)."""
    shape = layout(config)
    # Remembered per layout and settings: a count asks for the targets several times, and the advisor and the
    # widgets ask again at every batch and sequence length (peft's suffix matching over a 671B MoE's names costs
    # ~10 ms a time). Layouts are cached per config content, so an edited config gets its own.
    key = (id(shape), method, repr([hp.get(name) for name in TARGETING]))
    hit = _TARGETS.get(key)
    if hit is not None and hit[0] is shape:
        return list(hit[1]), list(hit[2])
    modules, params = _lora_targets(config, shape, hp, method)
    if len(_TARGETS) >= 512:
        _TARGETS.clear()
    _TARGETS[key] = (shape, tuple(modules), tuple(params))
    return list(modules), list(params)


_TARGETS: dict[tuple[Any, ...], tuple[Any, tuple[Any, ...], tuple[Any, ...]]] = {}
# The settings that decide LoRA's targets (all that lora_targets and target_specs read): the rank, alpha or dropout
# change no target, so a rank slider reuses the selection.
TARGETING = ("target_modules", "target_parameters", "layers_to_transform", "layers_pattern")


def _lora_targets(config: PretrainedConfig, shape: Any, hp: dict[str, Any], method: str
                  ) -> tuple[list[tuple[ModuleSpec, int]], list[TargetParameter]]:
    plan = peft_lora_targets(shape, _requested_modules(shape, hp), hp.get("target_parameters"))
    modules: list[ModuleSpec] = []
    if plan.target_modules is None or plan.target_modules or not plan.target_parameters:
        modules = target_specs(config, method, {**hp, "target_modules": plan.target_modules})
    params = select_parameters(shape, plan)
    if not modules and not params:
        raise SurveyError(f"target_parameters {', '.join(plan.target_parameters)} match no parameter of "
                          f"{model_label(config)}, and no target module is left: {method} would adapt nothing")
    return [(m, plan.rank_factor(m.name)) for m in modules], params


def _requested_modules(shape: Any, hp: dict[str, Any]) -> Any:
    """``target_modules`` with ``None`` spelt out: the default targets, or none beside ``target_parameters``."""
    if hp.get("target_modules") is not None:
        return hp["target_modules"]
    if shape.default_lora_targets:
        return list(shape.default_lora_targets)
    return [] if hp.get("target_parameters") else None


def apply_lora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
               **targets: Any) -> nn.Module:
    """Freeze ``model``, wrap each target linear layer in :class:`~survey_utils.methods.layers.lowrank.LoRALinear`
    and each module holding target parameters in :class:`~survey_utils.methods.layers.experts.ParameterLoRA`
    (rank and alpha times peft's factor where it fused two adapters into one)."""
    from survey_utils.methods.layers import experts, lowrank

    freeze(model)
    modules, params = lora_targets(model.config, targets)
    for spec, f in modules:
        replace_module(model, spec.name, lowrank.LoRALinear(model.get_submodule(spec.name), r * f, lora_alpha * f,
                                                            lora_dropout, use_rslora))
    owners: dict[str, list[TargetParameter]] = {}
    for target in params:
        owners.setdefault(target.module.name, []).append(target)
    for name, group in owners.items():
        replace_module(model, name, experts.ParameterLoRA(
            model.get_submodule(name), {t.param: r * t.rank_factor for t in group},
            {t.param: lora_alpha * t.rank_factor for t in group}, use_rslora))
    return model


def lora_trainable_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    r""":math:`\sum_{W \in \text{modules}} r_W\,(d_\text{in} + d_\text{out})
    + \sum_{P \in \text{parameters}} r_P\,E_P\,(d_\text{in} + d_\text{out})`: every target matrix, and every
    expert of a fused expert tensor, gets its own A and B (``r_P = 2r`` on a fused ``gate_up_proj``, as peft)."""
    modules, params = lora_targets(config, hp)
    return (sum(r * f * (m.in_features + m.out_features) for m, f in modules)
            + sum(r * p.rank_factor * p.experts * (p.in_features + p.out_features) for p in params))


def lora_routed_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    """LoRA's A and B on tensors of the routed experts (``Method.routed_added_params``): a token uses its top-k
    experts' pairs only."""
    _, params = lora_targets(config, hp)
    return sum(r * p.rank_factor * p.experts * (p.in_features + p.out_features) for p in params
               if p.module.moe == "routed" and p.experts > 1)


def lora_peft_config(config: PretrainedConfig, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool, **hp: Any) -> Any:
    """peft's ``LoraConfig`` with our settings; peft runs its transformers-5 conversion on it itself."""
    from peft import LoraConfig

    modules, _ = lora_targets(config, hp)
    targets = _requested_modules(layout(config), hp)
    if hp["target_modules"] is None and targets is not None:
        targets = sorted(set(targets))
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, target_modules=targets,
        target_parameters=hp.get("target_parameters"), layers_to_transform=hp["layers_to_transform"],
        layers_pattern=hp["layers_pattern"],
        fan_in_fan_out=any(spec.kind == "conv1d" for spec, _ in modules),
    )


def check_targets(method: str, kinds: tuple[str, ...] = LINEAR_KINDS, peft_lora: bool = False):
    """A ``validate`` for ``method``: targets exist and are of ``kinds``; peft's rules on the layer options.
    ``peft_lora``: the method is peft's ``LoraConfig``, whose transformers-5 conversion may move targets to the
    fused expert tensors (:func:`survey_utils.targeting.peft_lora_targets`). Only LoRA itself (and rsLoRA), whose
    hyper-parameters include ``target_parameters``, adapts parameters; a LoRA variant without it (DoRA: peft's
    ``ParamWrapper`` refuses ``use_dora``; QLoRA, LoftQ, QA-LoRA and PEQA call this check with their targets only)
    is refused there in one line, so that no count disagrees with peft's. peft's ``ParamWrapper`` also refuses
    ``lora_dropout``, and a parameter of a module that ``target_modules`` adapts too."""

    def validate(config: PretrainedConfig, **hp: Any) -> None:
        if isinstance(hp.get("target_modules"), str) and hp.get("layers_to_transform") is not None:
            raise SurveyError("layers_to_transform cannot be combined with a regex target_modules (peft's rule)")
        if hp.get("layers_pattern") and hp.get("layers_to_transform") is None:
            raise SurveyError(f"layers_pattern={hp['layers_pattern']!r} needs layers_to_transform (peft's rule)")
        if not peft_lora:
            target_specs(config, method, hp, kinds)
            return
        modules, params = lora_targets(config, {**hp, "target_parameters": hp.get("target_parameters")}, method)
        if params and (method != "lora" or "target_parameters" not in hp):
            names = sorted({p.param for p in params})
            raise SurveyError(f"{method} on '{config.model_type}' would adapt the parameters {', '.join(names)} "
                              "(peft 0.21.2 turns expert and router targets into target_parameters on fused-expert "
                              "MoE types), which this method does not reproduce; name the target modules instead")
        refused = peft_lora_incompatible(config.model_type, [m for m, _ in modules])
        if refused:
            raise SurveyError(f"peft refuses LoRA on '{refused}' of a Mamba-type model ('{config.model_type}': "
                              "out_proj and conv1d are incompatible); leave it out of target_modules")
        if params:
            _check_parameter_targets(modules, params, hp)

    return validate


def _check_parameter_targets(modules: list[tuple[ModuleSpec, int]], params: list[TargetParameter],
                             hp: dict[str, Any]) -> None:
    """peft 0.21.2's ``ParamWrapper`` refusals, as one line each."""
    if hp.get("lora_dropout"):
        raise SurveyError(f"lora_dropout={hp['lora_dropout']} with LoRA on parameters ({params[0].name}): peft's "
                          "ParamWrapper cannot factor dropout out of W + BA; set lora_dropout=0")
    adapted = {m.name for m, _ in modules}
    both = next((p for p in params if p.module.name in adapted), None)
    if both is not None:
        raise SurveyError(f"target parameter '{both.name}' belongs to '{both.module.name}', which target_modules "
                          "adapts too (peft refuses both on one module)")
    conv = next((m for m, _ in modules if m.kind == "conv1d"), None)
    if conv is not None:
        raise SurveyError(f"target_parameters with the Conv1D target '{conv.name}': peft's LoRA on parameters "
                          "does not work with fan_in_fan_out")


def _peft_targets(config: PretrainedConfig, method: str, hp: dict[str, Any],
                  kinds: tuple[str, ...] = LINEAR_KINDS) -> dict[str, Any]:
    """peft's target fields for the modules we adapt (the architecture default spelt out when None)."""
    specs = target_specs(config, method, hp, kinds)
    targets = hp["target_modules"]
    if targets is None:
        targets = sorted({spec.short_name for spec in specs})
    return {"target_modules": targets, "layers_to_transform": hp["layers_to_transform"],
            "layers_pattern": hp["layers_pattern"]}


def _fan_in_fan_out(config: PretrainedConfig, method: str, hp: dict[str, Any]) -> bool:
    return any(spec.kind == "conv1d" for spec in target_specs(config, method, hp))


def _targets(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")}


# --- memory: the tensors each method's modules save for backward (``Method.memory_terms``) ------------------

def _saved_inputs(specs: list, tokens: int, act_bytes: int, adapter_bytes: int, dropout: float) -> int:
    """Bytes of the adapters' saved inputs: a shared input once (q/k/v read one tensor); with dropout a mask
    (1 B) and a dropped copy per target; in another dtype a cast copy per target (as LoRA's terms)."""
    shared: dict[tuple[str, str], int] = {}
    own = 0
    for spec in specs:
        if dropout > 0:
            own += tokens * spec.in_features * (1 + adapter_bytes)
        elif adapter_bytes != act_bytes:
            own += adapter_bytes * tokens * spec.in_features
        else:
            shared[spec.input_key] = act_bytes * tokens * spec.in_features
    return sum(shared.values()) + own


def _lora_like_terms(config: PretrainedConfig, method: str, batch_size: int, seq_len: int, act_bytes: int,
                     adapter_bytes: int, rank: int, dropout: float, hp: dict[str, Any]) -> dict[str, int]:
    t = batch_size * seq_len
    specs = target_specs(config, method, hp)
    return {"adapter inputs": _saved_inputs(specs, t, act_bytes, adapter_bytes, dropout),
            "x A (rank r)": len(specs) * adapter_bytes * t * rank}


def lora_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                      adapter_bytes: int, r: int, lora_dropout: float, **hp: Any) -> dict[str, int]:
    """LoRA's tensors saved for backward: each target's input (once per distinct input: q/k/v read one
    tensor, :attr:`ModuleSpec.input_key`) and ``x A``; with dropout every target keeps its own mask (1 B)
    and dropped input; an adapter dtype unlike the model's keeps a cast copy per target. rsLoRA's scale
    changes none of this, so rsLoRA registers the same function. Parameters LoRA adapts directly (fused
    experts, routers) add :func:`lora_parameter_terms`."""
    t = batch_size * seq_len
    modules, params = lora_targets(config, hp)
    specs = [m for m, _ in modules]
    terms = {"adapter inputs": _saved_inputs(specs, t, act_bytes, adapter_bytes, lora_dropout),
             "x A (rank r)": sum(adapter_bytes * t * r * f for _, f in modules)}
    if params:
        sites = _sites(modules, params)
        kept = [p for p, site in zip(params, sites[len(modules):], strict=True) if _input_carries_gradient(site, sites)]
        terms.update(lora_parameter_terms(params, layout(config).experts_per_token, t, act_bytes, adapter_bytes, r,
                                          kept))
    return terms


def lora_parameter_terms(params: list[TargetParameter], top_k: int, tokens: int, act_bytes: int,
                         adapter_bytes: int, r: int, keeps_weight: list[TargetParameter] | None = None
                         ) -> dict[str, int]:
    r"""What LoRA on parameters saves for backward, from its mechanism (peft's ``ParamWrapper``, our
    :class:`~survey_utils.methods.layers.experts.ParameterLoRA`): the module runs on :math:`W' = W + s B A`, a
    new tensor that now needs a gradient, so every matmul that reads it keeps

    - its input: for a routed expert tensor, the rows routed to each expert, :math:`t k` rows of
      :math:`d_\text{in}` over the :math:`E` experts (top-k of E: each expert's LoRA sees only its own tokens; the
      frozen model kept none of them, as nothing it read needed a gradient); for any other parameter (a router's
      weight) the :math:`t` rows it reads, once per distinct input;
    - :math:`W'` itself, the whole stack (:math:`E\,d_\text{in}\,d_\text{out}`), in the weight's dtype, for the
      gradient of the input: only where the input carries one (``keeps_weight``, all of ``params`` when None: a
      trainable site upstream, :func:`_input_carries_gradient`);
    - with an adapter dtype unlike the model's, on a tensor of several experts, the factors cast to the weight's
      dtype (which ``baddbmm`` keeps; one matrix adds a :math:`\Delta W` computed in the factors' dtype instead).
    No :math:`xA` is saved: the update is folded into the weight, not run beside it."""
    inputs: dict[tuple[str, str], int] = {}
    for p in params:
        routed = len(p.shape) == 3 and p.module.moe == "routed"
        key = (p.module.name, p.param) if routed else \
            ((p.module.name.rpartition(".")[0], "mlp input") if p.module.moe == "router" else (p.name, "input"))
        inputs[key] = act_bytes * tokens * (top_k if routed else 1) * p.in_features
    terms = {"parameter LoRA inputs (routed rows: top-k of E per expert)": sum(inputs.values()),
             "W + B A (whole adapted tensors)": sum(act_bytes * math.prod(p.shape)
                                                    for p in (params if keeps_weight is None else keeps_weight))}
    if adapter_bytes != act_bytes:
        terms["B, A cast to the weight's dtype"] = sum(act_bytes * r * p.rank_factor * p.experts
                                                       * (p.in_features + p.out_features) for p in params
                                                       if p.experts > 1)
    return terms


def lora_memory_sites(config: PretrainedConfig, **hp: Any) -> list[ModuleSpec]:
    """Where LoRA's gradients enter the backbone (``Method.gradient_sites``): its target modules after peft's
    conversion, and each target parameter as the linear it acts as (its module's name and part, its d_in and
    d_out), so that a fused ``gate_up_proj`` or a router's weight sits at the MLP's input, a ``down_proj`` at its
    output (:attr:`ModuleSpec.stage`)."""
    return _sites(*lora_targets(config, hp))


def _sites(modules: list[tuple[ModuleSpec, int]], params: list[TargetParameter]) -> list[ModuleSpec]:
    return [m for m, _ in modules] + [
        dataclasses.replace(p.module, name=p.name, kind="linear", component="mlp", in_features=p.in_features,
                            out_features=p.out_features) for p in params]


def _input_carries_gradient(site: ModuleSpec, sites: list[ModuleSpec]) -> bool:
    """Whether the input of ``site`` carries a gradient: a trainable site sits below it, in an earlier block or at a
    lower stage of its block (a router's update reaches the block only through the routing weights, which scale
    the experts' outputs, so it is no such site for its own block's experts). A site outside the blocks counts as
    below."""
    for other in sites:
        if other.layer is None or site.layer is None or other.layer < site.layer:
            return True
        if other.layer == site.layer and other.stage < site.stage and other.moe != "router":
            return True
    return False


def lora_largest_tensor(config: PretrainedConfig, r: int, **hp: Any) -> int:
    """The biggest of A (r x d_in) and B (d_out x r) over the targets (E stacked pairs on an expert tensor): the
    optimizer's temporaries."""
    modules, params = lora_targets(config, hp)
    return max([r * f * max(m.in_features, m.out_features) for m, f in modules]
               + [r * p.rank_factor * p.experts * max(p.in_features, p.out_features) for p in params])


def dora_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                      adapter_bytes: int, r: int, lora_dropout: float, **hp: Any) -> dict[str, int]:
    r"""LoRA's saved tensors plus two of size ``t x d_out`` per layer: :math:`W_0x` and :math:`BAx`, both
    kept for the gradient of the magnitude. The norm of :math:`W_0 + \Delta W` is computed without grad:
    a full-size ``d_out x d_in`` transient (two, with :math:`\Delta W`) for one layer at a time during the
    forward, freed before the backward peak, so not a saved term."""
    terms = _lora_like_terms(config, "dora", batch_size, seq_len, act_bytes, adapter_bytes, r, lora_dropout, hp)
    t = batch_size * seq_len
    terms["W0 x and B A x (d_out each)"] = sum(t * s.out_features * (act_bytes + adapter_bytes)
                                              for s in target_specs(config, "dora", hp))
    return terms


def adalora_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                         adapter_bytes: int, init_r: int, lora_dropout: float, **hp: Any) -> dict[str, int]:
    """LoRA's saved tensors at ``init_r``: pruned triplets are zeroed, not removed."""
    targets = {k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")}
    return _lora_like_terms(config, "adalora", batch_size, seq_len, act_bytes, adapter_bytes, init_r,
                            lora_dropout, targets)


def vera_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                      adapter_bytes: int, r: int, vera_dropout: float, **hp: Any) -> dict[str, int]:
    """A and B are frozen, so the input is not saved; ``A x`` (t x r) and ``B(d * A x)`` (t x d_out) are,
    for the gradients of d and b: with VeRA's large r this is more than LoRA's, for far fewer parameters."""
    t = batch_size * seq_len
    specs = target_specs(config, "vera", hp)
    terms = {"A x (rank r)": len(specs) * adapter_bytes * t * r,
             "B d A x (d_out)": sum(adapter_bytes * t * s.out_features for s in specs)}
    if vera_dropout > 0:
        terms["dropout masks"] = sum(t * s.in_features for s in specs)
    return terms


def _materialised_terms(method: str, config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                        adapter_bytes: int, hp: dict[str, Any]) -> dict[str, int]:
    """LoHa and LoKr build the full ``d_out x d_in`` update and multiply the input by it: both are saved."""
    specs = target_specs(config, method, hp, LINEAR_ONLY)
    t = batch_size * seq_len
    return {"adapter inputs": _saved_inputs(specs, t, act_bytes, adapter_bytes, 0.0),
            "full-size update (d_out x d_in)": sum(adapter_bytes * s.in_features * s.out_features for s in specs)}


def loha_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                      adapter_bytes: int, **hp: Any) -> dict[str, int]:
    """Inputs, and the materialised update (its two factor products are recomputed in backward)."""
    return _materialised_terms("loha", config, batch_size, seq_len, act_bytes, adapter_bytes, hp)


def lokr_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                      adapter_bytes: int, **hp: Any) -> dict[str, int]:
    """Inputs, and the materialised Kronecker product."""
    return _materialised_terms("lokr", config, batch_size, seq_len, act_bytes, adapter_bytes, hp)


def krona_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                       adapter_bytes: int, krona_factor: int, **hp: Any) -> dict[str, int]:
    """Inputs and the intermediate :math:`A X` (``t x a_1 x b_2``); the Kronecker matrix is never formed."""
    specs = target_specs(config, "krona", hp)
    t = batch_size * seq_len
    middle = 0
    for s in specs:
        a1, _ = factorization(s.out_features, krona_factor)
        _, b2 = factorization(s.in_features, krona_factor)
        middle += adapter_bytes * t * a1 * b2
    return {"adapter inputs": _saved_inputs(specs, t, act_bytes, adapter_bytes, 0.0), "A X (t x a1 x b2)": middle}


LORA = register(Method(
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
        HyperParam("target_parameters", "str_list", None,
                   "parameters to adapt directly, by name or name suffix, e.g. mlp.experts.gate_up_proj (fused "
                   "experts: one A and B per expert); None adapts none beyond what peft's MoE conversion adds",
                   nullable=True),
    ),
    apply=apply_lora,
    trainable_params=lora_trainable_params,
    peft_config=lora_peft_config,
    memory_terms=lora_memory_terms,
    gradient_sites=lora_memory_sites,
    routed_added_params=lora_routed_params,
    validate=check_targets("lora", peft_lora=True),
    largest_trainable_tensor=lora_largest_tensor,
    param_prefixes=("lora_",),
    mergeable=True,
    peft_param_map={"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"},
))


# ---------------------------------------------------------------------------------------------------------
# The family beyond LoRA. Every layer lives in ``layers/lowrank.py``; every registration is here.
# ---------------------------------------------------------------------------------------------------------


# --- DoRA -------------------------------------------------------------------------------------------------

def apply_dora(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
               **targets: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target linear layer in :class:`~survey_utils.methods.layers.lowrank.DoRALinear`."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    adapt_targets(model, "dora", targets,
                  lambda base: lowrank.DoRALinear(base, r, lora_alpha, lora_dropout, use_rslora))
    return model


def dora_trainable_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    r""":math:`\sum_W r\,(d_\text{in} + d_\text{out}) + d_\text{out}`: LoRA plus one magnitude per output."""
    return sum(r * (m.in_features + m.out_features) + m.out_features for m in target_specs(config, "dora", hp))


def dora_peft_config(config: PretrainedConfig, r: int, lora_alpha: float, lora_dropout: float,
                     use_rslora: bool, **hp: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=True,
                      fan_in_fan_out=_fan_in_fan_out(config, "dora", hp), **_peft_targets(config, "dora", hp))


register(Method(
    name="dora",
    title="DoRA",
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (ICML 2024)",
    arxiv_id="2402.09353",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="reparameterized / LoRA derivatives", lialin=NOT_PLACED),
    chapter="04_reparameterized",
    hyperparams=LORA.hyperparams,
    apply=apply_dora,
    trainable_params=dora_trainable_params,
    peft_config=dora_peft_config,
    validate=check_targets("dora", peft_lora=True),
    memory_terms=dora_memory_terms,
    param_prefixes=("lora_",),
    mergeable=True,
    notes="peft: LoraConfig(use_dora=True); the magnitude is lora_magnitude_vector there.",
    peft_param_map={"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
                    "lora_magnitude": "lora_magnitude_vector.default.weight"},
))


# --- rsLoRA -----------------------------------------------------------------------------------------------

register(dataclasses.replace(
    LORA,
    name="rslora",
    title="rsLoRA",
    paper="Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
    arxiv_id="2312.03732",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    hyperparams=tuple(dataclasses.replace(hp, default=True) if hp.name == "use_rslora" else hp
                      for hp in LORA.hyperparams),
    notes="LoRA with the scale alpha / sqrt(r), so the update's size does not shrink as r grows.",
    peft_variant={"use_rslora": True},
))


# --- AdaLoRA ----------------------------------------------------------------------------------------------

def apply_adalora(model: nn.Module, init_r: int, lora_alpha: float, lora_dropout: float, **hp: Any) -> nn.Module:
    """Freeze ``model``, wrap each target in :class:`~survey_utils.methods.layers.lowrank.SVDLinear`, and attach
    ``model.rank_allocator`` (a :class:`~survey_utils.methods.layers.lowrank.RankAllocator`): call its
    ``update_and_allocate(step)`` after each optimizer step, and add
    ``orth_reg_weight * orthogonal_regularization(model)`` to the loss."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    adapt_targets(model, "adalora", _targets(hp),
                  lambda base: lowrank.SVDLinear(base, init_r, lora_alpha, lora_dropout))
    model.rank_allocator = lowrank.RankAllocator(model, **hp)
    return model


def adalora_trainable_params(config: PretrainedConfig, init_r: int, **hp: Any) -> int:
    r""":math:`\sum_W r_0\,(d_\text{in} + d_\text{out} + 1)`: P, Q and :math:`\lambda` at the initial rank.

    This is what peft counts (``lora_A``, ``lora_B``, ``lora_E`` at ``init_r``), and what sits in memory:
    pruning zeroes :math:`\lambda_i` but keeps the tensors. After allocation only about ``target_r``
    triplets per layer carry an update (:func:`adalora_effective_params`).
    """
    return sum(init_r * (m.in_features + m.out_features + 1) for m in target_specs(config, "adalora", hp))


def adalora_effective_params(config: PretrainedConfig, target_r: int, **hp: Any) -> int:
    """Triplets left after the budget reaches ``target_r`` per layer on average: the final update's size."""
    return sum(target_r * (m.in_features + m.out_features + 1) for m in target_specs(config, "adalora", hp))


def adalora_frozen_params(config: PretrainedConfig, **hp: Any) -> int:
    """One frozen ``ranknum`` per adapted layer (peft keeps it as a parameter, so the total counts it)."""
    return len(target_specs(config, "adalora", hp))


def adalora_peft_fixup(wrapped: nn.Module) -> None:
    """Freeze peft's ``ranknum`` again after building on ``meta``.

    peft creates ``ranknum`` frozen, but when the base layer is on ``meta`` its
    ``_move_adapter_to_device_of_base_layer`` replaces it by ``ranknum.to("meta")``, which the
    ``ParameterDict`` re-wraps as a *trainable* parameter: built on ``meta`` peft reports one extra trainable
    parameter per layer (on a real device it does not; ``tests/methods/test_reparameterized.py`` pins both).
    Counting runs on ``meta``, so :func:`survey_utils.counting.peft_model` calls this (``Method.peft_fixup``).
    """
    for name, parameter in wrapped.named_parameters():
        if ".ranknum." in name:
            parameter.requires_grad_(False)


def validate_adalora(config: PretrainedConfig, **hp: Any) -> None:
    check_targets("adalora")(config, **hp)
    for beta in ("beta1", "beta2"):
        if not 0 < hp[beta] < 1:
            raise SurveyError(f"{beta}={hp[beta]} must lie strictly between 0 and 1")
    if hp["target_r"] > hp["init_r"]:
        raise SurveyError(f"target_r={hp['target_r']} exceeds init_r={hp['init_r']}: AdaLoRA only prunes rank")
    if hp["tinit"] >= hp["total_step"] - hp["tfinal"]:
        raise SurveyError(f"tinit={hp['tinit']} leaves no budgeting phase before total_step - tfinal = "
                          f"{hp['total_step'] - hp['tfinal']}")


def adalora_peft_config(config: PretrainedConfig, **hp: Any) -> Any:
    from peft import AdaLoraConfig

    fields = ("init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
              "orth_reg_weight", "total_step")
    return AdaLoraConfig(fan_in_fan_out=_fan_in_fan_out(config, "adalora", hp),
                         **{k: hp[k] for k in fields}, **_peft_targets(config, "adalora", hp))


register(Method(
    name="adalora",
    title="AdaLoRA",
    paper="Zhang et al. 2023, Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (ICLR 2023)",
    arxiv_id="2303.10512",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="reparameterized / LoRA derivatives", lialin=NOT_PLACED),
    chapter="04_reparameterized",
    hyperparams=(
        HyperParam("init_r", "int", 12, "initial rank of every update P diag(lambda) Q", minimum=1),
        HyperParam("target_r", "int", 8, "average rank per layer once the budget is reached", minimum=1),
        HyperParam("lora_alpha", "float", 8.0, "scale numerator: the update is multiplied by alpha / init_r",
                   minimum=0),
        HyperParam("lora_dropout", "float", 0.0, "dropout on the adapter's input", minimum=0, maximum=0.99),
        HyperParam("tinit", "int", 0, "warm-up steps before any pruning", minimum=0),
        HyperParam("tfinal", "int", 0, "final steps at the target budget", minimum=0),
        HyperParam("deltaT", "int", 1, "steps between two budget allocations", minimum=1),
        HyperParam("beta1", "float", 0.85, "EMA coefficient of the sensitivity", minimum=0, maximum=1),
        HyperParam("beta2", "float", 0.85, "EMA coefficient of the uncertainty", minimum=0, maximum=1),
        HyperParam("orth_reg_weight", "float", 0.5, "weight of the orthogonality regulariser of P and Q",
                   minimum=0),
        HyperParam("total_step", "int", 1000, "training steps (the schedule needs it in advance)", minimum=1),
        *TARGET_HPS,
    ),
    apply=apply_adalora,
    trainable_params=adalora_trainable_params,
    peft_config=adalora_peft_config,
    validate=validate_adalora,
    memory_terms=adalora_memory_terms,
    frozen_added_params=adalora_frozen_params,
    param_prefixes=("lora_",),
    mergeable=True,
    notes="Counts are at init_r (peft's convention); the final update uses about target_r per layer.",
    peft_fixup=adalora_peft_fixup,
    peft_param_map={p: f"{p}.default" for p in ("lora_A", "lora_B", "lora_E")},
))


# --- VeRA -------------------------------------------------------------------------------------------------

def apply_vera(model: nn.Module, r: int, projection_prng_key: int, vera_dropout: float, d_initial: float,
               **targets: Any) -> nn.Module:
    """Freeze ``model``; create the shared random A, B once (``model.vera_projections``), sized for the
    largest adapted layer; wrap each target in :class:`~survey_utils.methods.layers.lowrank.VeRALinear`."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    specs = target_specs(model.config, "vera", targets)
    max_in = max(s.in_features for s in specs)
    max_out = max(s.out_features for s in specs)
    like = model.get_submodule(specs[0].name).weight
    shared = lowrank.VeRAProjections(r, max_in, max_out, projection_prng_key, like)
    model.vera_projections = shared
    for spec in specs:
        base = model.get_submodule(spec.name)
        replace_module(model, spec.name, lowrank.VeRALinear(base, shared, r, vera_dropout, d_initial))
    return model


def vera_trainable_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    r""":math:`\sum_W (d_\text{out} + r)`: the vectors b and d only.

    The shared A (r x max d_in) and B (max d_out x r) are buffers, as in peft, so neither the trainable
    nor the total count includes them; they still take :math:`r(\max d_\text{in} + \max d_\text{out})`
    numbers of memory (:func:`vera_projection_numel`).
    """
    return sum(m.out_features + r for m in target_specs(config, "vera", hp))


def vera_projection_numel(config: PretrainedConfig, r: int, **hp: Any) -> int:
    specs = target_specs(config, "vera", hp)
    return r * (max(s.in_features for s in specs) + max(s.out_features for s in specs))


def vera_peft_config(config: PretrainedConfig, r: int, projection_prng_key: int, vera_dropout: float,
                     d_initial: float, **hp: Any) -> Any:
    from peft import VeraConfig

    return VeraConfig(r=r, projection_prng_key=projection_prng_key, vera_dropout=vera_dropout, d_initial=d_initial,
                      fan_in_fan_out=_fan_in_fan_out(config, "vera", hp), **_peft_targets(config, "vera", hp))


register(Method(
    name="vera",
    title="VeRA",
    paper="Kopiczko et al. 2024, VeRA: Vector-based Random Matrix Adaptation (ICLR 2024)",
    arxiv_id="2310.11454",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="04_reparameterized",
    hyperparams=(
        HyperParam("r", "int", 256, "rank of the shared random projections (higher than LoRA's: they are free)",
                   minimum=1),
        HyperParam("projection_prng_key", "int", 0, "seed of the shared random A and B", minimum=0),
        HyperParam("vera_dropout", "float", 0.0, "dropout on the adapter's input", minimum=0, maximum=0.99),
        HyperParam("d_initial", "float", 0.1, "initial value of every entry of d", minimum=0),
        *TARGET_HPS,
    ),
    apply=apply_vera,
    trainable_params=vera_trainable_params,
    peft_config=vera_peft_config,
    validate=check_targets("vera"),
    memory_terms=vera_memory_terms,
    param_prefixes=("vera_lambda_",),
    mergeable=True,
    notes="The shared random matrices are buffers (not counted as parameters), as in peft.",
    peft_param_map={p: f"{p}.default" for p in ("vera_lambda_b", "vera_lambda_d")},
))


# --- LoHa and LoKr ------------------------------------------------------------------------------------------

LYCORIS_HPS = (
    HyperParam("r", "int", 8, "rank of each low-rank factor", minimum=1),
    HyperParam("alpha", "float", 8.0, "scale numerator: the update is multiplied by alpha / r", minimum=0),
    HyperParam("rank_dropout", "float", 0.0, "while training, drop rows of the update with this probability",
               minimum=0, maximum=0.99),
    HyperParam("module_dropout", "float", 0.0, "while training, skip the whole adapter with this probability",
               minimum=0, maximum=0.99),
)
LINEAR_ONLY = ("linear",)  # peft's LoHa and LoKr adapt nn.Linear, not GPT-2's Conv1D


def apply_loha(model: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float,
               **targets: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target ``nn.Linear`` in :class:`~survey_utils.methods.layers.lowrank.LoHaLinear`."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    adapt_targets(model, "loha", targets,
                  lambda base: lowrank.LoHaLinear(base, r, alpha, rank_dropout, module_dropout), LINEAR_ONLY)
    return model


def loha_trainable_params(config: PretrainedConfig, r: int, **hp: Any) -> int:
    r""":math:`\sum_W 2r\,(d_\text{in} + d_\text{out})`: two LoRA-sized pairs."""
    return sum(2 * r * (m.in_features + m.out_features) for m in target_specs(config, "loha", hp, LINEAR_ONLY))


def loha_peft_config(config: PretrainedConfig, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                     **hp: Any) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(r=r, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout,
                      **_peft_targets(config, "loha", hp, LINEAR_ONLY))


register(Method(
    name="loha",
    title="LoHa",
    paper="Hyeon-Woo et al. 2022, FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated "
          "Learning (ICLR 2022); as packaged by LyCORIS (Yeh et al. 2024, arXiv:2309.14859)",
    arxiv_id="2108.06098",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="04_reparameterized",
    hyperparams=(*LYCORIS_HPS, *TARGET_HPS),
    apply=apply_loha,
    trainable_params=loha_trainable_params,
    peft_config=loha_peft_config,
    validate=check_targets("loha", LINEAR_ONLY),
    memory_terms=loha_memory_terms,
    param_prefixes=("hada_",),
    mergeable=True,
    notes="Linear layers only, as peft's LoHa (GPT-2's Conv1D is refused).",
    peft_param_map={p: f"{p}.default" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
))


def apply_lokr(model: nn.Module, r: int, alpha: float, rank_dropout: float, module_dropout: float,
               decompose_both: bool, decompose_factor: int, rank_dropout_scale: bool, **targets: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target ``nn.Linear`` in :class:`~survey_utils.methods.layers.lowrank.LoKrLinear`."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    adapt_targets(model, "lokr", targets,
                  lambda base: lowrank.LoKrLinear(base, r, alpha, rank_dropout, module_dropout, decompose_both,
                                                   decompose_factor, rank_dropout_scale), LINEAR_ONLY)
    return model


def lokr_trainable_params(config: PretrainedConfig, r: int, decompose_both: bool, decompose_factor: int,
                          **hp: Any) -> int:
    """Per layer: each Kronecker factor full (``a c`` or ``b d``) or rank-r (``r (a + c)``), by peft's rule."""
    return sum(lokr_numel(m.in_features, m.out_features, r, decompose_both, decompose_factor)
               for m in target_specs(config, "lokr", hp, LINEAR_ONLY))


def lokr_peft_config(config: PretrainedConfig, r: int, alpha: float, rank_dropout: float, module_dropout: float,
                     decompose_both: bool, decompose_factor: int, rank_dropout_scale: bool, **hp: Any) -> Any:
    from peft import LoKrConfig

    return LoKrConfig(r=r, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout,
                      decompose_both=decompose_both, decompose_factor=decompose_factor,
                      rank_dropout_scale=rank_dropout_scale, **_peft_targets(config, "lokr", hp, LINEAR_ONLY))


register(Method(
    name="lokr",
    title="LoKr",
    paper="Yeh et al. 2024, Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model "
          "Evaluation (ICLR 2024)",
    arxiv_id="2309.14859",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="04_reparameterized",
    hyperparams=(
        *LYCORIS_HPS,
        HyperParam("decompose_both", "bool", False, "also store the left Kronecker factor as a rank-r product"),
        HyperParam("decompose_factor", "int", -1, "size of the left factor's sides (-1: near the square root)",
                   minimum=-1),
        HyperParam("rank_dropout_scale", "bool", False, "rescale the kept rows under rank dropout"),
        *TARGET_HPS,
    ),
    apply=apply_lokr,
    trainable_params=lokr_trainable_params,
    peft_config=lokr_peft_config,
    validate=check_targets("lokr", LINEAR_ONLY),
    memory_terms=lokr_memory_terms,
    param_prefixes=("lokr_",),
    mergeable=True,
    notes="Linear layers only, as peft's LoKr (GPT-2's Conv1D is refused).",
    peft_param_map={p: f"{p}.default" for p in
                    ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
))


# --- KronA ------------------------------------------------------------------------------------------------

def apply_krona(model: nn.Module, krona_factor: int, scale: float, **targets: Any) -> nn.Module:
    """Freeze ``model`` and wrap each target linear layer in :class:`~survey_utils.methods.layers.lowrank.KronALinear`."""
    from survey_utils.methods.layers import lowrank

    freeze(model)
    adapt_targets(model, "krona", targets, lambda base: lowrank.KronALinear(base, krona_factor, scale))
    return model


def krona_trainable_params(config: PretrainedConfig, krona_factor: int, **hp: Any) -> int:
    r""":math:`\sum_W a_1 a_2 + b_1 b_2` with :math:`(a_1, b_1)`, :math:`(a_2, b_2)` the factorizations of
    :math:`d_\text{out}` and :math:`d_\text{in}`."""
    total = 0
    for m in target_specs(config, "krona", hp):
        a1, b1 = factorization(m.out_features, krona_factor)
        a2, b2 = factorization(m.in_features, krona_factor)
        total += a1 * a2 + b1 * b2
    return total


register(Method(
    name="krona",
    title="KronA",
    paper="Edalati et al. 2022, KronA: Parameter Efficient Tuning with Kronecker Adapter (ENLSP-III @ NeurIPS 2023)",
    arxiv_id="2212.10650",
    taxonomy=Taxonomy(xu="reparameterized / low-rank decomposition", wang="reparameterized / low-rank decomposition",
                      lialin="R"),
    chapter="04_reparameterized",
    hyperparams=(
        HyperParam("krona_factor", "int", -1, "side of the factor A (-1: sides near the square root)", minimum=-1),
        HyperParam("scale", "float", 1.0, "s: the update is s (A kron B)", minimum=0),
        *TARGET_HPS,
    ),
    apply=apply_krona,
    trainable_params=krona_trainable_params,
    validate=check_targets("krona"),
    memory_terms=krona_memory_terms,
    param_prefixes=("krona_",),
    mergeable=True,
    notes="No peft implementation: checked closed form == built model only.",
))
