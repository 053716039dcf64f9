r"""Multi-task methods: reuse what several tasks learned, by sharing, routing or composing modules (chapter 08).

Wang et al. 2024's sixth family ("multi-task": AdapterFusion, AdaMix, MOELoRA, LoRAHub, SPoT, ATTEMPT, MPT). The
methods registered here serve :math:`T` tasks with one set of modules; what matters is what each *added task*
costs, which :attr:`~survey_utils.methods.registry.Method.tasks_hp` names for the widgets:

- **MPT** (multitask prompt tuning): one shared prompt :math:`P^\ast` and, per task, a rank-:math:`r` matrix
  :math:`U_kV_k` that rescales it element-wise; a task adds :math:`nr + rd` parameters;
- **Polytropon**: per target layer an inventory of :math:`S` LoRA skills and a task-skill allocation
  :math:`Z \in \mathbb{R}^{T\times S}`; a task adds :math:`S` numbers per layer.

Both take ``task_ids`` (one task index per example) in the forward, as peft's ``MULTITASK_PROMPT_TUNING`` and
``POLY`` do (:attr:`Method.takes_task_ids`). The layers live in ``layers/multi_task.py``, imported inside ``apply``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError
from survey_utils.methods.common import adapt_targets, freeze, model_label, target_specs
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register
from survey_utils.methods.soft_prompts import (
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
