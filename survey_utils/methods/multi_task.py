r"""Multi-task methods: reuse what several tasks learned, by sharing, routing or composing modules (chapter 08).

Wang et al. 2024's sixth family ("multi-task": AdapterFusion, AdaMix, MOELoRA, LoRAHub, SPoT, ATTEMPT, MPT). The
methods registered here serve :math:`T` tasks with one set of modules; what matters is what each *added task*
costs, which :attr:`~survey_utils.methods.registry.Method.tasks_hp` names for the widgets:

- **MPT** (multitask prompt tuning): one shared prompt :math:`P^\ast` and, per task, a rank-:math:`r` matrix
  :math:`U_kV_k` that rescales it element-wise; a task adds :math:`nr + rd` parameters;
- **Polytropon**: per target layer an inventory of :math:`S` LoRA skills and a task-skill allocation
  :math:`Z \in \mathbb{R}^{T\times S}`; a task adds :math:`S` numbers per layer;
- **AdapterFusion**: :math:`N` task adapters, trained one per task and frozen, and a learned attention over their
  outputs at each adapter site; a task adds one adapter (frozen), the fusion does not grow;
- **MOELoRA**: LoRA experts per layer mixed by a gate that reads a learned task embedding; a task adds one
  embedding (:math:`e` numbers) per layer;
- **LoRAHub**: :math:`N` frozen LoRA modules summed with :math:`N` weights found without gradients; a task (an
  upstream module) adds one LoRA (frozen) and one weight;
- **SPoT**: prompt tuning started from the most similar source task's trained prompt;
- **ATTEMPT**: :math:`t` frozen source prompts and a trainable target prompt mixed per example by a small attention
  module on the pooled input; a source adds one prompt (frozen), the trained part does not grow;
- **X-LoRA**: :math:`N` frozen LoRA experts in every target layer, mixed per token by a classifier that reads the
  hidden states of a first forward pass; an expert adds one LoRA (frozen) and :math:`h + 1` classifier weights
  (depth 1, one set of scalings for all layers).

MPT, Polytropon and MOELoRA take ``task_ids`` (one task index per example) in the forward, as peft's
``MULTITASK_PROMPT_TUNING`` and ``POLY`` do (:attr:`Method.takes_task_ids`). AdapterFusion, LoRAHub, ATTEMPT and
X-LoRA serve one target task from source modules trained beforehand (:attr:`Method.tasks_hp` counts them,
:attr:`Method.composes_trained_sources` is set); what they add frozen is :attr:`Method.frozen_added_params`. The
layers live in ``layers/multi_task.py``, imported inside ``apply``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import adapt_targets, freeze, model_label, target_specs
from survey_utils.methods.registry import (
    NOT_PLACED,
    HyperParam,
    Method,
    Taxonomy,
    get_method,
    register,
    saves_nothing,
)
from survey_utils.methods.soft_prompts import (
    apply_prompt_tuning,
    embedding_width,
    peft_task_type,
    validate_prompt,
    virtual_positions,
)

if TYPE_CHECKING:  # typing only: the layers (and torch) are imported inside ``apply``
    from torch import nn
    from transformers import PretrainedConfig

CHAPTER = "08_multi_task"
MULTI_TASK = Taxonomy(xu=NOT_PLACED, wang="multi-task", lialin=NOT_PLACED)
LINEAR_ONLY = ("linear",)  # peft's Poly adapts nn.Linear only (GPT-2's Conv1D is refused)
MAX_TASKS = 1024
MAX_SKILLS = 64  # the bound of the widgets' skill / expert sliders (more is refused in one line)
PROMPT_TUNING = get_method("prompt_tuning")  # SPoT's model is prompt tuning's (soft_prompts registers it first)


# --- multitask prompt tuning (MPT) ---------------------------------------------------------------------------
def apply_mpt(model: nn.Module, num_virtual_tokens: int, num_tasks: int, num_ranks: int, **_: Any) -> nn.Module:
    r"""Multitask prompt tuning (Wang et al. 2023, arXiv:2303.02861): prepend :math:`P_k = P^\ast \odot (U_k V_k)`.

    Freeze ``model``, prepend task :math:`k`'s prompt to the input embeddings (the soft-prompt hook of chapter 02)
    and read each example's :math:`k` from ``task_ids=`` in the forward.
    """
    from survey_utils.methods.layers.multi_task import MultitaskPromptEmbedding, install_task_ids
    from survey_utils.methods.layers.prompts import install_soft_prompt

    freeze(model)
    context = install_task_ids(model, num_tasks)
    encoder = MultitaskPromptEmbedding(num_virtual_tokens, model.get_input_embeddings().weight, num_tasks,
                                       num_ranks, context)
    return install_soft_prompt(model, encoder)


def mpt_trainable_params(config: PretrainedConfig, num_virtual_tokens: int, num_tasks: int, num_ranks: int,
                         **_: Any) -> int:
    r""":math:`n d + T\,(n r + r d)`: the shared prompt and each task's two factors."""
    n, d = num_virtual_tokens, embedding_width(config)
    return n * d + num_tasks * (n * num_ranks + num_ranks * d)


def mpt_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                     num_virtual_tokens: int, num_ranks: int, **_: Any) -> dict[str, int]:
    """Saved for backward: each example's task factors (gathered, n x r and r x d) and their product (n x d),
    which multiplies the shared prompt."""
    n, d = num_virtual_tokens, embedding_width(config)
    return {"task factors and U V (per example)": adapter_bytes * batch_size * (n * num_ranks + num_ranks * d + n * d)}


def mpt_peft_config(config: PretrainedConfig, num_virtual_tokens: int, num_tasks: int, num_ranks: int,
                    **_: Any) -> Any:
    """peft's ``MultitaskPromptTuningConfig``; one prompt table read by the encoder on T5 (chapter 02's rule)."""
    from peft import MultitaskPromptTuningConfig

    return MultitaskPromptTuningConfig(task_type=peft_task_type(config), num_virtual_tokens=num_virtual_tokens,
                                       num_transformer_submodules=1, token_dim=embedding_width(config),
                                       num_tasks=num_tasks, num_ranks=num_ranks)


def load_mpt_from_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Scale peft's task factors up (its N(0, 0.02) init makes every task's prompt nearly zero, a weak check), then
    copy its shared prompt and factors into ours (``Method.peft_state_sync``); returns tensors copied."""
    import torch

    state = theirs.prompt_encoder["default"]
    with torch.no_grad():
        state.prefix_task_cols.mul_(50.0)
        state.prefix_task_rows.mul_(50.0)
        ours.prompt_encoder.load_state_dict(state.state_dict(), strict=False)
    return len(state.state_dict())


register(Method(
    name="mpt", title="Multitask prompt tuning (MPT)",
    paper="Wang et al. 2023, Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning (ICLR 2023)",
    arxiv_id="2303.02861", taxonomy=MULTI_TASK, chapter=CHAPTER,
    hyperparams=(HyperParam("num_virtual_tokens", "int", 20, "n: virtual tokens (prompt length)", minimum=1),
                 HyperParam("num_tasks", "int", 1, "T: tasks served by the shared prompt", minimum=1,
                            maximum=MAX_TASKS),
                 HyperParam("num_ranks", "int", 1, "r: rank of each task's scaling matrix U_k V_k (paper: 1)",
                            minimum=1, maximum=MAX_SKILLS)),
    apply=apply_mpt, trainable_params=mpt_trainable_params, memory_terms=mpt_memory_terms,
    peft_config=mpt_peft_config, peft_state_sync=load_mpt_from_peft,
    validate=validate_prompt, extra_positions=virtual_positions, param_prefixes=("prompt_encoder",),
    tasks_hp="num_tasks", takes_task_ids=True,
    notes="peft 0.21.2's MPT forward fails on BERT (its FEATURE_EXTRACTION forward drops task_ids) and on T5 (its "
          "seq2seq branch drops decoder_input_ids): output parity on decoder-only models, counts everywhere",
))


# --- Polytropon ----------------------------------------------------------------------------------------------------
def apply_poly(model: nn.Module, r: int, n_tasks: int, n_skills: int, n_splits: int, **targets: Any) -> nn.Module:
    r"""Polytropon (Ponti et al. 2023, arXiv:2202.13914): each target linear layer gets :math:`S` LoRA skills
    mixed per task, :math:`h = W_0x + \frac1r x (\sum_s w_{ks} A_s)(\sum_s w_{ks} B_s)`.

    Freeze ``model``, wrap each target ``nn.Linear`` in :class:`~survey_utils.methods.layers.multi_task.PolyLinear`
    and read each example's task from ``task_ids=`` in the forward.
    """
    from survey_utils.methods.layers.multi_task import PolyLinear, install_task_ids

    freeze(model)
    context = install_task_ids(model, n_tasks)
    adapt_targets(model, "poly", targets, lambda base: PolyLinear(base, r, n_tasks, n_skills, n_splits, context),
                  LINEAR_ONLY)
    return model


def poly_trainable_params(config: PretrainedConfig, r: int, n_tasks: int, n_skills: int, n_splits: int,
                          **hp: Any) -> int:
    r""":math:`\sum_W S\,r\,(d_\text{in} + d_\text{out}) + T q S`: the skill inventory and the allocation logits."""
    return sum(n_skills * r * (m.in_features + m.out_features) + n_tasks * n_splits * n_skills
               for m in target_specs(config, "poly", hp, LINEAR_ONLY))


def validate_poly(config: PretrainedConfig, n_splits: int, **hp: Any) -> None:
    """Targets exist and are ``nn.Linear``; ``n_splits`` divides every target's input and output width."""
    for spec in target_specs(config, "poly", hp, LINEAR_ONLY):
        for width in (spec.in_features, spec.out_features):
            if width % n_splits:
                raise SurveyError(f"n_splits={n_splits} does not divide {spec.name}'s width {width} "
                                  f"({model_label(config)})")


def poly_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                      r: int, **hp: Any) -> dict[str, int]:
    """LoRA's saved tensors at rank r (inputs once per distinct input, ``x A``), plus each example's mixed
    :math:`A` and :math:`B` (``r (d_in + d_out)`` per example and layer), kept for the skills' gradients."""
    from survey_utils.methods.reparameterized import lora_memory_terms

    targets = {"target_modules": hp["target_modules"], "layers_to_transform": None, "layers_pattern": None}
    terms = lora_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, r=r, lora_dropout=0.0,
                              **targets)
    specs = target_specs(config, "poly", targets, LINEAR_ONLY)
    terms["mixed A and B (per example)"] = sum(adapter_bytes * batch_size * r * (s.in_features + s.out_features)
                                               for s in specs)
    return terms


def poly_peft_config(config: PretrainedConfig, r: int, n_tasks: int, n_skills: int, n_splits: int, **hp: Any) -> Any:
    from peft import PolyConfig

    targets = hp["target_modules"]
    if targets is None:
        targets = sorted({spec.short_name for spec in target_specs(config, "poly", hp, LINEAR_ONLY)})
    # A task type is needed: peft's bare PeftModel forward never hands task_ids to its Poly layers.
    return PolyConfig(task_type=peft_task_type(config), r=r, n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits,
                      target_modules=targets)


register(Method(
    name="poly", title="Polytropon (Poly)",
    paper="Ponti et al. 2023, Combining Parameter-efficient Modules for Task-level Generalisation (EACL 2023)",
    arxiv_id="2202.13914", taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED), chapter=CHAPTER,
    hyperparams=(HyperParam("r", "int", 8, "rank of each LoRA skill", minimum=1),
                 HyperParam("n_tasks", "int", 1, "T: tasks (rows of the allocation)", minimum=1, maximum=MAX_TASKS),
                 HyperParam("n_skills", "int", 4, "S: LoRA skills per layer", minimum=1, maximum=MAX_SKILLS),
                 HyperParam("n_splits", "int", 1, "q: blocks per skill (q > 1: Multi-Head Routing)", minimum=1,
                            maximum=MAX_SKILLS),
                 HyperParam("target_modules", "targets", None,
                            "module names (or one regex) to adapt; None takes the query and value projections",
                            nullable=True)),
    apply=apply_poly, trainable_params=poly_trainable_params, memory_terms=poly_memory_terms,
    peft_config=poly_peft_config, validate=validate_poly, param_prefixes=("poly_",),
    peft_param_map={"poly_lora_A": "poly_lora_A.default", "poly_lora_B": "poly_lora_B.default",
                    "poly_logits": "poly_router.default.module_logits"},
    tasks_hp="n_tasks", takes_task_ids=True,
    notes="nn.Linear targets only, as peft's Poly; peft's PolyConfig has no layers_to_transform, so neither do we",
))


# --- AdapterFusion -----------------------------------------------------------------------------------------------
# AdapterHub's `adapters` (1.3.0) pins transformers ~=4.57 and this project runs transformers 5, so it cannot be
# installed beside it: its defaults are transcribed from adapters 1.3.0, configuration/adapter_fusion_config.py
# (DEFAULT_ADAPTERFUSION_CONFIG = "dynamic": key, query, value, value_initialized, regularization on; temperature
# and residual_before off) and configuration/adapter_config.py (SeqBnConfig: reduction_factor 16, relu, the
# Pfeiffer placement), and the count is checked closed form against built model only.
FUSION_PLACEMENT = "pfeiffer"


def apply_adapter_fusion(model: nn.Module, num_sources: int, reduction_factor: float, bottleneck_size: int,
                         non_linearity: str, fusion_value: bool, **_: Any) -> nn.Module:
    r"""AdapterFusion (Pfeiffer et al. 2021, arXiv:2005.00247): :math:`y = h + \sum_n a_n V\,\mathrm{adapter}_n(h)`,
    :math:`a = \mathrm{softmax}_n((Qh)^\top K\,\mathrm{adapter}_n(h))`, at every Pfeiffer site (after each block's
    FFN output projection).

    Freeze ``model``, put :math:`N` frozen bottleneck adapters and one trainable fusion layer
    (:class:`~survey_utils.methods.layers.multi_task.AdapterFusionLayer`) at each site. The adapters start as
    chapter 01's (zero up-projection); :func:`~survey_utils.methods.layers.multi_task.load_fusion_sources` loads
    trained ones (stage one of the paper: one adapter per task; stage two, this method: the fusion).
    """
    from survey_utils.methods.adapters import adapter_sites, bottleneck_width
    from survey_utils.methods.common import replace_module
    from survey_utils.methods.layers.adapters import Bottleneck
    from survey_utils.methods.layers.multi_task import AdapterFusionLayer

    freeze(model)
    for spec, _ffn_in in adapter_sites(model.config, FUSION_PLACEMENT):
        base = model.get_submodule(spec.name)
        size = bottleneck_width(spec.out_features, reduction_factor, bottleneck_size)
        sources = [Bottleneck(spec.out_features, size, non_linearity, base.weight) for _ in range(num_sources)]
        replace_module(model, spec.name, AdapterFusionLayer(base, sources, fusion_value, base.weight))
    return model


def _fusion_widths(config: PretrainedConfig, reduction_factor: float, bottleneck_size: int) -> list[tuple[int, int]]:
    from survey_utils.methods.adapters import adapter_sites, bottleneck_width

    return [(spec.out_features, bottleneck_width(spec.out_features, reduction_factor, bottleneck_size))
            for spec, _ffn_in in adapter_sites(config, FUSION_PLACEMENT)]


def adapter_fusion_trainable_params(config: PretrainedConfig, reduction_factor: float, bottleneck_size: int,
                                    fusion_value: bool, **_: Any) -> int:
    r""":math:`\sum_\text{sites} (2d^2 + 2d + [\text{value}]\,d^2)`: query and key with biases, the value matrix
    without; independent of the number of fused adapters :math:`N`."""
    return sum(2 * d * d + 2 * d + (d * d if fusion_value else 0)
               for d, _k in _fusion_widths(config, reduction_factor, bottleneck_size))


def adapter_fusion_frozen_params(config: PretrainedConfig, num_sources: int, reduction_factor: float,
                                 bottleneck_size: int, **_: Any) -> int:
    r""":math:`N \sum_\text{sites} (2dk + d + k)`: the fused adapters, trained beforehand, frozen here."""
    return num_sources * sum(2 * d * k + d + k for d, k in _fusion_widths(config, reduction_factor, bottleneck_size))


def adapter_fusion_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                                adapter_bytes: int, num_sources: int, reduction_factor: float, bottleneck_size: int,
                                non_linearity: str, fusion_value: bool, **_: Any) -> dict[str, int]:
    """Saved for backward at each site, ``t = batch x seq_len`` positions: the query's input :math:`h` (cast to
    the adapter dtype), the :math:`N` adapters' outputs (read by K and V), the keys and the values
    (:math:`N` each), the query, the attention weights (twice: softmax output and the mixing's input), and
    each frozen adapter's bottleneck activations (gradients pass through them to the blocks below)."""
    t = batch_size * seq_len
    n = num_sources
    inner = 1 if non_linearity in ("relu", "tanh") else 2
    fusion = adapters = 0
    for d, k in _fusion_widths(config, reduction_factor, bottleneck_size):
        fusion += adapter_bytes * t * (2 * d + n * d * (3 if fusion_value else 2) + 2 * n)
        adapters += adapter_bytes * t * n * (inner * k + d)
    return {"fusion: query input, adapter outputs, keys, values, weights": fusion,
            "fused adapters' inputs and bottleneck activations": adapters}


def adapter_fusion_sites(config: PretrainedConfig, **_: Any) -> list[Any]:
    from survey_utils.methods.adapters import adapter_memory_sites

    return adapter_memory_sites(config, FUSION_PLACEMENT)


def validate_adapter_fusion(config: PretrainedConfig, **hp: Any) -> None:
    """The bottleneck fits every site (the closed form raises the one-line error)."""
    adapter_fusion_frozen_params(config, **hp)


register(Method(
    name="adapter_fusion", title="AdapterFusion",
    composes_trained_sources=True,
    paper="Pfeiffer et al. 2021, AdapterFusion: Non-Destructive Task Composition for Transfer Learning (EACL 2021)",
    arxiv_id="2005.00247", taxonomy=MULTI_TASK, chapter=CHAPTER,
    hyperparams=(HyperParam("num_sources", "int", 2, "N: task adapters fused (AdapterHub: the adapters named in "
                            "Fuse(...); 2 is the smallest fusion)", minimum=1, maximum=MAX_SKILLS),
                 HyperParam("bottleneck_size", "int", 0, "bottleneck width k of the fused adapters; 0 takes "
                            "hidden_size // reduction_factor", minimum=0, maximum=16384),
                 HyperParam("reduction_factor", "float", 16.0, "fused adapters' k = hidden_size // reduction_factor "
                            "(AdapterHub's SeqBnConfig)", minimum=0.5, maximum=1024),
                 HyperParam("non_linearity", "str", "relu", "the fused adapters' activation (SeqBnConfig)",
                            choices=("relu", "gelu", "swish", "silu", "tanh")),
                 HyperParam("fusion_value", "bool", True, "learn the value matrix V (AdapterHub's default "
                            "'dynamic' fusion; False: 'static')")),
    apply=apply_adapter_fusion, trainable_params=adapter_fusion_trainable_params,
    memory_terms=adapter_fusion_memory_terms, frozen_added_params=adapter_fusion_frozen_params,
    gradient_sites=adapter_fusion_sites, validate=validate_adapter_fusion, param_prefixes=("fusion_",),
    largest_trainable_tensor=lambda config, **hp: max(d * d for d, _k in _fusion_widths(
        config, hp["reduction_factor"], hp["bottleneck_size"])),
    tasks_hp="num_sources",
    notes="AdapterHub's `adapters` cannot be installed beside transformers 5 (it pins ~=4.57): defaults transcribed "
          "from adapters 1.3.0 (dynamic fusion, SeqBnConfig adapters); counts closed form vs built model only. "
          "A new task costs one adapter (trained alone, then frozen); the fusion's size does not grow with N",
))


# --- MOELoRA -------------------------------------------------------------------------------------------------------
# Neither peft nor AdapterHub has MOELoRA: counts are checked closed form against built model. LoRA's settings are
# peft's LoRA defaults (r=8, lora_alpha=8, query and value projections); the experts and the task embedding's width
# are the authors' (liuqidong07/MOELoRA-peft: Gate(task_embedding_dim=64 -> expert_num=8), as its scripts train it).
def _only_targets(hp: dict[str, Any]) -> dict[str, Any]:
    return {"target_modules": hp.get("target_modules"), "layers_to_transform": None, "layers_pattern": None}


def apply_moelora(model: nn.Module, r: int, lora_alpha: float, num_experts: int, n_tasks: int,
                  task_embedding_dim: int, **targets: Any) -> nn.Module:
    r"""MOELoRA (Liu et al. 2024, arXiv:2310.18339): :math:`h = W_0x + \frac{\alpha}{r}\sum_e \omega_{ke} B_eA_ex`,
    :math:`\omega_k = \mathrm{softmax}(G t_k)`, in every target linear layer.

    Freeze ``model``, wrap each target in :class:`~survey_utils.methods.layers.multi_task.MoELoRALinear` and read
    each example's task :math:`k` from ``task_ids=`` in the forward.
    """
    from survey_utils.methods.layers.multi_task import MoELoRALinear, install_task_ids

    freeze(model)
    context = install_task_ids(model, n_tasks)
    adapt_targets(model, "moelora", _only_targets(targets), lambda base: MoELoRALinear(
        base, r, lora_alpha, num_experts, n_tasks, task_embedding_dim, context))
    return model


def moelora_trainable_params(config: PretrainedConfig, r: int, num_experts: int, n_tasks: int,
                             task_embedding_dim: int, **hp: Any) -> int:
    r""":math:`\sum_W r(d_\text{in} + d_\text{out}) + Te + Ee`: the experts (rank :math:`r/E` each), the task
    embeddings and the gate, per target layer."""
    return sum(r * (m.in_features + m.out_features) + (n_tasks + num_experts) * task_embedding_dim
               for m in target_specs(config, "moelora", _only_targets(hp)))


def validate_moelora(config: PretrainedConfig, r: int, num_experts: int, **hp: Any) -> None:
    """``r`` splits evenly over the experts; the targets exist."""
    if r % num_experts:
        raise SurveyError(f"r={r} does not split over num_experts={num_experts}: each expert gets rank "
                          f"r / num_experts, so r must be a multiple of it")
    target_specs(config, "moelora", _only_targets(hp))


def moelora_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                         adapter_bytes: int, r: int, **hp: Any) -> dict[str, int]:
    """LoRA's saved tensors at the total rank r (each distinct input once, ``x A``) plus the gate-weighted
    ``x A`` that multiplies the experts' :math:`B` (``t x r`` per layer)."""
    from survey_utils.methods.reparameterized import lora_memory_terms

    targets = _only_targets(hp)
    terms = lora_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, r=r, lora_dropout=0.0,
                              **targets)
    terms["gate-weighted x A"] = len(target_specs(config, "moelora", targets)) * adapter_bytes * batch_size \
        * seq_len * r
    return terms


register(Method(
    name="moelora", title="MOELoRA (task-routed LoRA experts)",
    paper="Liu et al. 2024, When MOE Meets LLMs: Parameter Efficient Fine-tuning for Multi-task Medical "
          "Applications (SIGIR 2024)",
    arxiv_id="2310.18339", taxonomy=MULTI_TASK, chapter=CHAPTER,
    hyperparams=(HyperParam("r", "int", 8, "total rank, split evenly over the experts (peft's LoRA default)",
                            minimum=1),
                 HyperParam("lora_alpha", "float", 8.0, "scale alpha / r of the update (peft's LoRA default)",
                            minimum=0),
                 HyperParam("num_experts", "int", 8, "E: LoRA experts per layer (authors' code)", minimum=1,
                            maximum=MAX_SKILLS),
                 HyperParam("n_tasks", "int", 1, "T: tasks (rows of each layer's task embedding)", minimum=1,
                            maximum=MAX_TASKS),
                 HyperParam("task_embedding_dim", "int", 64, "e: width of a task's embedding (authors' code)",
                            minimum=1, maximum=4096),
                 HyperParam("target_modules", "targets", None,
                            "module names (or one regex) to adapt; None takes the query and value projections",
                            nullable=True)),
    apply=apply_moelora, trainable_params=moelora_trainable_params, memory_terms=moelora_memory_terms,
    validate=validate_moelora, param_prefixes=("moelora_",), tasks_hp="n_tasks", takes_task_ids=True,
    notes="in neither peft nor AdapterHub: counts closed form vs built model; the authors' per-layer task "
          "embedding has one spare row (task_num + 1), ours exactly n_tasks",
))


# --- LoRAHub -------------------------------------------------------------------------------------------------------
# Neither peft nor AdapterHub has LoRAHub: counts closed form vs built model. The LoRA modules take peft's LoRA
# defaults (r=8, lora_alpha=8, query and value); the paper composes N=20 modules drawn from ~200 FLAN-task LoRAs.
def apply_lorahub(model: nn.Module, r: int, lora_alpha: float, num_sources: int, **targets: Any) -> nn.Module:
    r"""LoRAHub (Huang et al. 2023, arXiv:2307.13269): :math:`h = W_0x + \frac{\alpha}{r}\sum_n w_n B_nA_nx`.

    Freeze ``model`` and wrap each target in :class:`~survey_utils.methods.layers.multi_task.LoraHubLinear`, all
    sharing one weight vector :math:`w` (zero: the base model), the only numbers the method learns, by the
    gradient-free :func:`~survey_utils.methods.layers.multi_task.search_weights`.
    """
    from torch import nn as torch_nn

    from survey_utils.methods.layers.multi_task import LoraHubLinear

    freeze(model)
    like = model.get_input_embeddings().weight
    weights = torch_nn.Parameter(like.new_zeros(num_sources))
    adapt_targets(model, "lorahub", _only_targets(targets),
                  lambda base: LoraHubLinear(base, r, lora_alpha, num_sources, weights))
    return model


def lorahub_trainable_params(config: PretrainedConfig, num_sources: int, **hp: Any) -> int:
    r""":math:`N`: one composition weight per LoRA module, shared by every layer (found without gradients)."""
    target_specs(config, "lorahub", _only_targets(hp))
    return num_sources


def lorahub_frozen_params(config: PretrainedConfig, r: int, num_sources: int, **hp: Any) -> int:
    r""":math:`N \sum_W r(d_\text{in} + d_\text{out})`: the composed LoRA modules, trained one per upstream task."""
    return num_sources * sum(r * (m.in_features + m.out_features)
                             for m in target_specs(config, "lorahub", _only_targets(hp)))


register(Method(
    name="lorahub", title="LoRAHub (gradient-free LoRA composition)",
    composes_trained_sources=True, gradient_free=True,
    paper="Huang et al. 2023, LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition (COLM 2024)",
    arxiv_id="2307.13269", taxonomy=MULTI_TASK, chapter=CHAPTER,
    hyperparams=(HyperParam("r", "int", 8, "rank of each composed LoRA module (peft's LoRA default)", minimum=1),
                 HyperParam("lora_alpha", "float", 8.0, "scale alpha / r (peft's LoRA default)", minimum=0),
                 HyperParam("num_sources", "int", 20, "N: LoRA modules composed (the paper's 20)", minimum=1,
                            maximum=MAX_TASKS),
                 HyperParam("target_modules", "targets", None,
                            "module names (or one regex) to adapt; None takes the query and value projections",
                            nullable=True)),
    apply=apply_lorahub, trainable_params=lorahub_trainable_params, memory_terms=saves_nothing,
    frozen_added_params=lorahub_frozen_params, param_prefixes=("lorahub_",), mergeable=True,
    backprop_through_backbone=False, largest_trainable_tensor=lambda config, num_sources, **hp: num_sources,
    tasks_hp="num_sources",
    notes="the weights are searched without gradients (a (1+1) evolution strategy here, CMA-ES in the paper): no "
          "backward pass, so nothing is saved for one; in neither peft nor AdapterHub: counts closed form vs built "
          "model",
))


# --- SPoT ----------------------------------------------------------------------------------------------------------
# SPoT is prompt tuning whose prompt starts from a source task's trained prompt: the model, its count and peft's
# configuration are prompt tuning's (peft's PROMPT_TUNING, counts and outputs checked against it); what SPoT adds is
# the retrieval of the source, layers/multi_task.transfer_prompt.
def apply_spot(model: nn.Module, **hp: Any) -> nn.Module:
    r"""SPoT (Vu et al. 2022, arXiv:2110.07904): prompt tuning, :math:`[P; E(x)]` with :math:`P \in \mathbb{R}^{n\times
    d}` trainable, initialised from the source prompt :math:`P_s` whose task embedding is closest (cosine of the
    average token) to the target task's.

    Builds chapter 02's prompt tuning; :func:`~survey_utils.methods.layers.multi_task.transfer_prompt` then copies
    the retrieved source prompt in (the init rule is the transfer, not the layer).
    """
    return apply_prompt_tuning(model, **hp)


register(Method(
    name="spot", title="SPoT (soft prompt transfer)",
    paper="Vu et al. 2022, SPoT: Better Frozen Model Adaptation through Soft Prompt Transfer (ACL 2022)",
    arxiv_id="2110.07904", taxonomy=Taxonomy(xu=NOT_PLACED, wang="multi-task", lialin="A:soft_prompts"),
    chapter=CHAPTER, hyperparams=PROMPT_TUNING.hyperparams,
    apply=apply_spot, trainable_params=PROMPT_TUNING.trainable_params, peft_config=PROMPT_TUNING.peft_config,
    validate=PROMPT_TUNING.validate, extra_positions=PROMPT_TUNING.extra_positions,
    param_prefixes=PROMPT_TUNING.param_prefixes, memory_terms=PROMPT_TUNING.memory_terms,
    peft_state_sync=PROMPT_TUNING.peft_state_sync,
    notes="a target prompt starts from the most similar source prompt (transfer_prompt); then it trains as prompt "
          "tuning: one prompt (n d parameters) per task, nothing shared at inference",
))


# --- ATTEMPT -------------------------------------------------------------------------------------------------------
# Neither peft nor AdapterHub has ATTEMPT: counts closed form vs built model. Defaults transcribed from the authors'
# code (github.com/AkariAsai/ATTEMPT, commit 613f700): prompt length = attempt/options.py's prefix_dim (100, also
# every config in attempt/configs/attempt/), G's width r = the 100 hard-coded in modeling_t5.py's T5Stack
# (nn.Linear(model_dim, 100)), six source prompts (prefix_num 6 in the configs: MNLI, QNLI, QQP, SST-2, SQuAD, ReCoRD),
# temperature d * e (the configs' 2087 for T5-base's d = 768; modeling_t5.py's learned temperature starts at
# model_dim * exp(1)).
def _attempt_temperature(config: PretrainedConfig, temperature: float | None) -> float:
    return temperature if temperature is not None else embedding_width(config) * math.e


def apply_attempt(model: nn.Module, num_virtual_tokens: int, num_sources: int, attn_dim: int,
                  temperature: float | None, **_: Any) -> nn.Module:
    r"""ATTEMPT (Asai et al. 2022, arXiv:2205.11961): prepend :math:`P = P_\text{target} + \sum_j a_j(x) P_j`, an
    attention over :math:`t` frozen source prompts and the target prompt computed per example from its pooled input.

    Freeze ``model`` and prepend the instance prompt of
    :class:`~survey_utils.methods.layers.multi_task.AttemptPromptEmbedding` with the soft-prompt hook of chapter
    02; :func:`~survey_utils.methods.layers.multi_task.load_attempt_sources` copies trained source prompts in.
    """
    from survey_utils.methods.layers.multi_task import AttemptPromptEmbedding, install_attempt

    freeze(model)
    encoder = AttemptPromptEmbedding(num_virtual_tokens, model.get_input_embeddings().weight, num_sources, attn_dim,
                                     _attempt_temperature(model.config, temperature))
    return install_attempt(model, encoder)


def attempt_trainable_params(config: PretrainedConfig, num_virtual_tokens: int, attn_dim: int, **_: Any) -> int:
    r""":math:`n d + 2 r d`: the target prompt and the attention module's :math:`W_\text{down}, W_\text{up}` (no
    biases; its LayerNorm has no parameters); independent of the number of sources :math:`t`."""
    d = embedding_width(config)
    return num_virtual_tokens * d + 2 * attn_dim * d


def attempt_frozen_params(config: PretrainedConfig, num_virtual_tokens: int, num_sources: int, **_: Any) -> int:
    r""":math:`t\,n d`: the source prompts, trained beforehand (prompt tuning on each source task), frozen here."""
    return num_sources * num_virtual_tokens * embedding_width(config)


def attempt_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                         num_sources: int, attn_dim: int, **_: Any) -> dict[str, int]:
    r"""Saved for backward by the attention module, per example: the pooled input (read by :math:`W_\text{down}`),
    the SiLU's input and output (:math:`r` each), the LayerNorm's input and its two statistics (fp32), :math:`H`
    (read with the pooled prompts) and the :math:`t + 1` attention weights; once per step, the pooled prompts
    :math:`\hat P` (:math:`(t + 1) \times d`, read with :math:`H`) and the argmax of the target's max-pool (int64,
    :math:`d`). The instance prompt itself joins the input positions, which the backbone's terms count
    (:attr:`Method.extra_positions`)."""
    d = embedding_width(config)
    per_example = adapter_bytes * (3 * d + 2 * attn_dim + num_sources + 1) + 2 * 4
    return {"attention module (per example)": batch_size * per_example,
            "pooled prompts and the target's max-pool indices": adapter_bytes * (num_sources + 1) * d + 8 * d}


def validate_attempt(config: PretrainedConfig, temperature: float | None, **hp: Any) -> None:
    """The prompt leaves room for a real token; the temperature is positive."""
    validate_prompt(config, **hp)
    if temperature is not None and temperature <= 0:
        raise SurveyError(f"temperature={temperature} must be positive (None takes d * e)")


register(Method(
    name="attempt", title="ATTEMPT (attentional mixtures of soft prompts)",
    composes_trained_sources=True,
    paper="Asai et al. 2022, ATTEMPT: Parameter-Efficient Multi-task Tuning via Attentional Mixtures of Soft Prompts "
          "(EMNLP 2022)",
    arxiv_id="2205.11961", taxonomy=MULTI_TASK, chapter=CHAPTER,
    hyperparams=(HyperParam("num_virtual_tokens", "int", 100, "n: prompt length of the target and every source "
                            "(the authors' prefix_dim, 100)", minimum=1),
                 HyperParam("num_sources", "int", 6, "t: frozen source prompts (the authors' six: MNLI, QNLI, QQP, "
                            "SST-2, SQuAD, ReCoRD)", minimum=1, maximum=MAX_TASKS),
                 HyperParam("attn_dim", "int", 100, "r: width of the attention module's bottleneck (100 in the "
                            "authors' code)", minimum=1, maximum=16384),
                 HyperParam("temperature", "float", None, "T: softmax temperature; None takes d * e (the authors' "
                            "2087 for d = 768)", minimum=0, nullable=True)),
    apply=apply_attempt, trainable_params=attempt_trainable_params, memory_terms=attempt_memory_terms,
    frozen_added_params=attempt_frozen_params, validate=validate_attempt, extra_positions=virtual_positions,
    param_prefixes=("prompt_encoder",), tasks_hp="num_sources",
    largest_trainable_tensor=lambda config, num_virtual_tokens, attn_dim, **_: embedding_width(config) * max(
        num_virtual_tokens, attn_dim),
    notes="in neither peft nor AdapterHub: counts closed form vs built model, architecture transcribed from the "
          "authors' code (attn_method 'sub'); one target prompt (the paper's multi-task ATTEMPT-m, one target per "
          "task sharing G, is not built); a new target task costs n d + 2 r d, a new source n d frozen",
))


# --- X-LoRA --------------------------------------------------------------------------------------------------------
# peft 0.21.2 has X-LoRA (XLoraConfig, XLoraModel) and it runs on CPU on the zoo's tiny decoders, but it loads its
# experts from LoRA adapters saved on disk and refuses a config with use_cache on: it cannot be built on meta from a
# config as the registry's peft paths do, so the registry has no peft_config and the three-way check (closed form,
# built model, peft's XLoraModel) lives in tests/methods/test_multi_task.py and chapter 08, through
# peft_xlora_model below. Defaults are XLoraConfig's; the experts take peft's LoRA defaults (r=8, lora_alpha=8,
# query and value projections).
def apply_xlora(model: nn.Module, num_adapters: int, r: int, lora_alpha: float, xlora_depth: int, xlora_size: int,
                xlora_dropout_p: float, layerwise_scalings: bool, enable_softmax: bool, enable_softmax_topk: bool,
                softmax_temperature: float, top_k_lora: int | None, scaling_pass_value: float,
                global_scaling_weight: float, use_trainable_adapters: bool, **targets: Any) -> nn.Module:
    r"""X-LoRA (Buehler & Buehler 2024, arXiv:2402.07148): :math:`N` frozen LoRA experts in every target layer, mixed
    per token and layer by scalings a trainable classifier predicts from a first pass's last hidden state.

    Freeze ``model``, wrap each target in :class:`~survey_utils.methods.layers.multi_task.XLoraLinear` and attach the
    classifier and the dual-forward hook
    (:func:`~survey_utils.methods.layers.multi_task.install_xlora`);
    :func:`~survey_utils.methods.layers.multi_task.load_xlora_experts` copies trained LoRAs in.
    """
    from survey_utils.methods.layers.multi_task import (
        XLoraContext,
        XLoraLinear,
        install_xlora,
        xlora_classifier,
    )

    freeze(model)
    context = XLoraContext(top_k_lora, enable_softmax_topk, global_scaling_weight)
    names = adapt_targets(model, "xlora", _only_targets(targets), lambda base: XLoraLinear(
        base, r, lora_alpha, num_adapters, context, use_trainable_adapters))
    out = num_adapters * (len(names) if layerwise_scalings else 1)
    classifier = xlora_classifier(layout(model.config).hidden_size, out, xlora_depth, xlora_size, xlora_dropout_p,
                                  model.get_input_embeddings().weight)
    return install_xlora(model, classifier, context, num_adapters, layerwise_scalings, enable_softmax,
                         softmax_temperature, scaling_pass_value)


def _xlora_classifier_params(config: PretrainedConfig, num_adapters: int, xlora_depth: int, xlora_size: int,
                             layerwise_scalings: bool, layers: int) -> int:
    h, s = layout(config).hidden_size, xlora_size
    out = num_adapters * (layers if layerwise_scalings else 1)
    if xlora_depth == 1:
        return (h + 1) * out
    return (h + 1) * s + (xlora_depth - 2) * (s + 1) * s + (s + 1) * out


def _xlora_experts(config: PretrainedConfig, num_adapters: int, r: int, hp: dict[str, Any]) -> int:
    return num_adapters * sum(r * (m.in_features + m.out_features)
                              for m in target_specs(config, "xlora", _only_targets(hp)))


def xlora_trainable_params(config: PretrainedConfig, num_adapters: int, r: int, xlora_depth: int, xlora_size: int,
                           layerwise_scalings: bool, use_trainable_adapters: bool, **hp: Any) -> int:
    r"""The classifier: :math:`(h + 1)\,N'` at depth 1, else :math:`(h+1)s + (k-2)(s+1)s + (s+1)N'`, with
    :math:`N' = N` (or :math:`NL` with layer-wise scalings, :math:`L` adapted layers), :math:`h` the hidden size,
    :math:`s` = ``xlora_size``, :math:`k` = ``xlora_depth``; plus the experts,
    :math:`N\sum_W r(d_\text{in} + d_\text{out})`, only with ``use_trainable_adapters``."""
    layers = len(target_specs(config, "xlora", _only_targets(hp)))
    classifier = _xlora_classifier_params(config, num_adapters, xlora_depth, xlora_size, layerwise_scalings, layers)
    return classifier + (_xlora_experts(config, num_adapters, r, hp) if use_trainable_adapters else 0)


def xlora_frozen_params(config: PretrainedConfig, num_adapters: int, r: int, use_trainable_adapters: bool,
                        **hp: Any) -> int:
    r""":math:`N\sum_W r(d_\text{in} + d_\text{out})`: the LoRA experts, trained beforehand, frozen (peft's default)."""
    return 0 if use_trainable_adapters else _xlora_experts(config, num_adapters, r, hp)


def xlora_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                       num_adapters: int, r: int, xlora_depth: int, xlora_size: int, xlora_dropout_p: float,
                       layerwise_scalings: bool, enable_softmax: bool, top_k_lora: int | None,
                       enable_softmax_topk: bool, **hp: Any) -> dict[str, int]:
    r"""Saved for backward, ``t = batch x seq_len`` tokens: each target's input (once per distinct input, read by
    :math:`\lambda_n \odot x` for the scalings' gradient; the frozen experts keep nothing else), the classifier's
    input (the scaling pass's last hidden state, the only tensor that pass leaves behind) and hidden activations
    (depth > 1: ReLU output, dropout mask (1 B, as LoRA's terms) and output), and the scalings: the softmax's
    :math:`t \times L \times N` output (without softmax and layer-wise scalings only the :math:`t \times N`
    logits, which every layer reads through a view); with top-k, per layer its mask and the masked scalings, with
    ``enable_softmax_topk`` its 1-byte mask and softmax output too."""
    from survey_utils.methods.reparameterized import _saved_inputs  # LoRA's rule for saved inputs, shared

    specs = target_specs(config, "xlora", _only_targets(hp))
    layers = len(specs)
    t = batch_size * seq_len
    inputs = _saved_inputs(specs, t, act_bytes, adapter_bytes, 0.0)
    hidden = (xlora_depth - 1) * t * xlora_size * (adapter_bytes + (1 + adapter_bytes if xlora_dropout_p > 0 else 0))
    per_token = layers * num_adapters if enable_softmax or layerwise_scalings else num_adapters
    terms = {"expert inputs (once per distinct input)": inputs,
             "classifier input and activations": adapter_bytes * t * layout(config).hidden_size + hidden,
             "scalings": adapter_bytes * t * per_token}
    if top_k_lora is not None or enable_softmax_topk:
        per_layer = adapter_bytes * (1 + (top_k_lora is not None) + enable_softmax_topk) + enable_softmax_topk
        terms["top-k scalings per layer"] = layers * t * num_adapters * per_layer
    return terms


def validate_xlora(config: PretrainedConfig, num_adapters: int, top_k_lora: int | None, softmax_temperature: float,
                   **hp: Any) -> None:
    """A decoder-only or encoder-only model (the scalings are sized by the one input sequence and read from the
    output's ``hidden_states``); top-k within the experts; a positive temperature; the targets exist."""
    if layout(config).is_encoder_decoder:
        raise SurveyError(f"xlora needs a decoder-only or encoder-only model: {model_label(config)} is encoder-decoder "
                          "(its scalings are sized by the encoder input, its output has no hidden_states)")
    if top_k_lora is not None and top_k_lora > num_adapters:
        raise SurveyError(f"top_k_lora={top_k_lora} is more than num_adapters={num_adapters}")
    if softmax_temperature <= 0:
        raise SurveyError(f"softmax_temperature={softmax_temperature} must be positive")
    target_specs(config, "xlora", _only_targets(hp))


def xlora_peft_config(config: PretrainedConfig, adapters: dict[str, str], num_adapters: int, xlora_depth: int,
                      xlora_size: int, xlora_dropout_p: float, layerwise_scalings: bool, enable_softmax: bool,
                      enable_softmax_topk: bool, softmax_temperature: float, top_k_lora: int | None,
                      scaling_pass_value: float, global_scaling_weight: float, use_trainable_adapters: bool,
                      **_: Any) -> Any:
    """peft's ``XLoraConfig`` for these settings, with ``adapters`` (``{"0": folder, ...}``: peft names the loaded
    experts by position, so the keys must be ``"0"``, ``"1"``, ...) saved by :func:`save_lora_experts`."""
    from peft import XLoraConfig

    if sorted(adapters) != [str(n) for n in range(num_adapters)]:
        raise SurveyError(f"adapters must be keyed '0'..'{num_adapters - 1}' (peft's X-LoRA names the experts by "
                          f"position); got {sorted(adapters)}")
    return XLoraConfig(task_type=peft_task_type(config), hidden_size=layout(config).hidden_size, adapters=adapters,
                       xlora_depth=xlora_depth, xlora_size=xlora_size, xlora_dropout_p=xlora_dropout_p,
                       layerwise_scalings=layerwise_scalings, enable_softmax=enable_softmax,
                       enable_softmax_topk=enable_softmax_topk, softmax_temperature=softmax_temperature,
                       top_k_lora=top_k_lora, scaling_pass_value=scaling_pass_value,
                       global_scaling_weight=global_scaling_weight, use_trainable_adapters=use_trainable_adapters)


def save_lora_experts(model_name: str, folder: str, seed: int = 0, **overrides: Any) -> dict[str, str]:
    """Save ``num_adapters`` LoRA adapters with peft (r, lora_alpha and targets of ``overrides``, B drawn from
    N(0, 0.1) so that each expert changes the model) into ``folder``; returns X-LoRA's ``adapters`` mapping."""
    import os

    import torch
    from peft import LoraConfig, get_peft_model

    from survey_utils.zoo import build_model, load_config

    method = get_method("xlora")
    hp = method.resolve(load_config(model_name), **overrides)
    targets = hp["target_modules"] or sorted({s.short_name for s in target_specs(load_config(model_name), "xlora",
                                                                                  _only_targets(hp))})
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for n in range(hp["num_adapters"]):
        lora = get_peft_model(build_model(model_name, device="cpu", seed=0),
                              LoraConfig(r=hp["r"], lora_alpha=hp["lora_alpha"], target_modules=targets))
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        adapters[str(n)] = os.path.join(folder, str(n))
        lora.save_pretrained(adapters[str(n)])
    return adapters


def peft_xlora_model(model_name: str, adapters: dict[str, str], dtype: Any = None, **overrides: Any) -> Any:
    """peft's X-LoRA on a fresh zoo model (seed 0, ``use_cache`` off as peft requires) over saved ``adapters``."""
    import warnings

    from peft import get_peft_model

    from survey_utils.zoo import build_model, load_config

    config = load_config(model_name)
    hp = get_method("xlora").resolve(config, **overrides)
    base = build_model(model_name, device="cpu", seed=0, **({"dtype": dtype} if dtype is not None else {}))
    base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, xlora_peft_config(config, adapters, **hp))


def load_xlora_from_peft(ours: nn.Module, theirs: Any) -> int:
    """Copy peft's X-LoRA classifier and experts into ours; returns tensors copied (output parity)."""
    import torch

    from survey_utils.methods.layers.multi_task import XLoraLinear

    xlora = theirs.base_model
    copied = 0
    with torch.no_grad():
        ours.xlora_classifier.load_state_dict(xlora.internal_xlora_classifier.layers.state_dict())
        copied += len(ours.xlora_classifier.state_dict())
        for name, layer in ours.named_modules():
            if isinstance(layer, XLoraLinear):
                lora = theirs.get_submodule(f"base_model.model.{name}")
                for n in range(layer.xlora_A.shape[0]):
                    layer.xlora_A[n].copy_(lora.lora_A[str(n)].weight)
                    layer.xlora_B[n].copy_(lora.lora_B[str(n)].weight)
                    copied += 2
    return copied


register(Method(
    name="xlora", title="X-LoRA (mixture of LoRA experts, token-level scalings)",
    composes_trained_sources=True,
    paper="Buehler & Buehler 2024, X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible Framework for Large "
          "Language Models with Applications in Protein Mechanics and Molecular Design (APL Machine Learning 2024)",
    arxiv_id="2402.07148", taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED), chapter=CHAPTER,
    hyperparams=(HyperParam("num_adapters", "int", 2, "N: frozen LoRA experts (peft: len(adapters), no default; 2 is "
                            "the smallest mixture)", minimum=1, maximum=MAX_SKILLS),
                 HyperParam("r", "int", 8, "rank of each expert (peft's LoRA default)", minimum=1),
                 HyperParam("lora_alpha", "float", 8.0, "experts' scale alpha / r (peft's LoRA default)", minimum=0),
                 HyperParam("xlora_depth", "int", 1, "layers of the classifier (peft's default 1: one Linear)",
                            minimum=1, maximum=8),
                 HyperParam("xlora_size", "int", 2048, "hidden width of the classifier (used when xlora_depth > 1)",
                            minimum=1, maximum=16384),
                 HyperParam("xlora_dropout_p", "float", 0.2, "dropout between the classifier's layers (depth > 1)",
                            minimum=0, maximum=0.99),
                 HyperParam("layerwise_scalings", "bool", False, "one set of scalings per adapted layer (else one "
                            "broadcast to every layer)"),
                 HyperParam("enable_softmax", "bool", True, "softmax over the experts of the classifier's logits"),
                 HyperParam("enable_softmax_topk", "bool", False, "softmax over the top-k experts only"),
                 HyperParam("softmax_temperature", "float", 1.0, "temperature of that softmax", minimum=0),
                 HyperParam("top_k_lora", "int", None, "keep each token's k largest scalings (None: dense)", minimum=1,
                            nullable=True),
                 HyperParam("scaling_pass_value", "float", 0.0, "every scaling during the first pass (0: the base "
                            "model's hidden states)"),
                 HyperParam("global_scaling_weight", "float", 1.0, "multiplies every expert's output"),
                 HyperParam("use_trainable_adapters", "bool", False, "train the experts too"),
                 HyperParam("target_modules", "targets", None,
                            "module names (or one regex) the experts adapt; None takes the query and value projections",
                            nullable=True)),
    apply=apply_xlora, trainable_params=xlora_trainable_params, memory_terms=xlora_memory_terms,
    frozen_added_params=xlora_frozen_params, validate=validate_xlora, param_prefixes=("xlora_",),
    tasks_hp="num_adapters",
    notes="peft 0.21.2's XLoraModel runs on CPU on the zoo's tiny decoders, but loads its experts from adapters saved "
          "on disk and needs use_cache off, so it cannot be built from a config on meta: the registry has no "
          "peft_config; counts are checked three ways (closed form, built model, peft) and outputs against peft in "
          "tests/methods/test_multi_task.py on tiny models. Two forward passes per step (the first without "
          "gradients); encoder-decoder models refused (peft's classifier reads the output's hidden_states). All "
          "experts share one rank and one set of targets (peft allows each its own config)",
))
