r"""Layers of the multi-task methods (chapter 08); the methods are registered in ``methods/multi_task.py``.

- :class:`TaskContext` and :func:`install_task_ids`: a model pre-hook takes ``task_ids`` (one task index per
  example) off the model's keyword arguments, checks it, and keeps it where every task-conditioned layer of
  the model reads it (as peft's Polytropon passes ``task_ids`` to its layers through forward pre-hooks);
- :class:`MultitaskPromptEmbedding` (MPT): a shared prompt, rescaled element-wise by a low-rank task matrix;
- :class:`PolyLinear` (Polytropon): an inventory of LoRA skills around a frozen linear layer, mixed per
  task by a learned, relaxed-binary allocation.

A task-conditioned layer lists in ``task_parameters`` its tensors indexed by task on their first dimension: row
:math:`k` is all that task :math:`k` owns (chapter 08 adds a task by training only that row). Only the methods'
``apply`` functions (and output parity's ``peft_state_sync``) import this module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from survey_utils.errors import SurveyError
from survey_utils.methods.common import linear_dims, new_parameter

EPS = 1e-12  # peft's (and mttl's) guard when normalising Polytropon's allocation


# --- task ids: one per example, read by every task-conditioned layer ------------------------------------
class TaskContext:
    """The ``task_ids`` of the forward pass in progress, shared by the task-conditioned layers of one model."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.task_ids: torch.Tensor | None = None

    def set(self, task_ids: Any) -> None:
        """Check and keep ``task_ids`` (``None``: allowed only when the model serves one task)."""
        if task_ids is None:
            self.task_ids = None
            return
        if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int64, torch.int32):
            raise SurveyError(f"task_ids={task_ids!r} must be an integer tensor with one task index per example")
        if task_ids.device.type != "meta" and task_ids.numel():
            low, high = int(task_ids.min()), int(task_ids.max())
            if low < 0 or high >= self.num_tasks:
                bad = low if low < 0 else high
                raise SurveyError(f"task id {bad} is out of range: this model serves {self.num_tasks} tasks "
                                  f"(ids 0..{self.num_tasks - 1})")
        self.task_ids = task_ids.long()

    def ids(self, batch: int, device: torch.device) -> torch.Tensor:
        """The current task ids for a batch of ``batch`` examples."""
        if self.task_ids is None:
            if self.num_tasks == 1:
                return torch.zeros(batch, dtype=torch.long, device=device)
            raise SurveyError(f"task_ids must be passed to the forward: this model serves {self.num_tasks} tasks")
        if self.task_ids.shape[0] != batch:
            raise SurveyError(f"task_ids has {self.task_ids.shape[0]} entries for a batch of {batch} examples")
        return self.task_ids.to(device)


def install_task_ids(model: nn.Module, num_tasks: int) -> TaskContext:
    """Give ``model`` a :class:`TaskContext` and the pre-hook that fills it from ``task_ids=`` on every call.

    The hook runs before any other (a soft prompt's hook then finds the ids set) and removes ``task_ids`` from
    the keyword arguments, so the transformer never sees it."""
    if hasattr(model, "task_context"):
        raise SurveyError("the model already routes task_ids; apply one task-conditioned method per model")
    context = TaskContext(num_tasks)

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        context.set(kwargs.pop("task_ids", None))
        return args, kwargs

    model.task_context = context
    model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return context


# --- multitask prompt tuning ---------------------------------------------------------------------------------
class MultitaskPromptEmbedding(nn.Module):
    r"""Multitask prompt tuning (Wang et al. 2023, arXiv:2303.02861): the prompt of task :math:`k` is

    .. math:: P_k = P^\ast \odot (U_k V_k), \qquad P^\ast \in \mathbb{R}^{n\times d},\;
              U_k \in \mathbb{R}^{n\times r},\; V_k \in \mathbb{R}^{r\times d}

    a prompt shared by every task, rescaled element-wise by a rank-:math:`r` task matrix (the paper's rank one
    :math:`u_k \otimes v_k` is :math:`r = 1`, peft's default). Trainable: :math:`nd + T(nr + rd)`; a new task adds
    :math:`nr + rd`. Init as peft's ``RANDOM``: :math:`P^\ast` like ``nn.Embedding`` (N(0, 1)), :math:`U, V` from
    N(0, 0.02). The module is prepended by the soft-prompt hook of chapter 02 (``layers/prompts.py``); the task
    ids come from the model's :class:`TaskContext`.
    """

    task_parameters = ("prefix_task_cols", "prefix_task_rows")

    def __init__(self, num_virtual_tokens: int, like: torch.Tensor, num_tasks: int, num_ranks: int,
                 context: TaskContext) -> None:
        super().__init__()
        d = like.shape[1]
        self.num_virtual_tokens = num_virtual_tokens
        self.context = context
        self.embedding = nn.Embedding(num_virtual_tokens, d, device=like.device, dtype=like.dtype)
        self.prefix_task_cols = new_parameter((num_tasks, num_virtual_tokens, num_ranks), like,
                                              lambda t: nn.init.normal_(t, 0.0, 0.02))
        self.prefix_task_rows = new_parameter((num_tasks, num_ranks, d), like, lambda t: nn.init.normal_(t, 0.0, 0.02))

    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """:math:`P^\\ast \\odot (U_k V_k)` for each example's task: (batch, n, d)."""
        scale = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]
        return self.embedding.weight.unsqueeze(0) * scale

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.task_prompts(self.context.ids(batch_size, self.embedding.weight.device))


# --- Polytropon ------------------------------------------------------------------------------------------------
class PolyLinear(nn.Module):
    r"""Polytropon (Ponti et al. 2023, arXiv:2202.13914) around a frozen linear layer.

    ::

        x ──► [ W0 (frozen) ] ───────────────────────────────────────────────┐
        │                                                                   (+) ──► h
        └──► [ Σ_s w_ks A_s ] ─► [ Σ_s w_ks B_s ] ─ × 1/r ──────────────────┘
                     ▲ w_k = normalise(σ-relaxed Bernoulli(Z[k]))   (task k's row of the allocation Z)

    .. math:: h = W_0 x + \frac{1}{r}\, x\,\Big(\sum_{s} w_{ks} A_s\Big)\Big(\sum_{s} w_{ks} B_s\Big),
              \qquad w_{ks} = \frac{z_{ks}}{\sum_{s'} z_{ks'} + \epsilon}

    An inventory of :math:`S` LoRA skills :math:`(A_s \in \mathbb{R}^{d_\text{in}\times r}, B_s \in
    \mathbb{R}^{r\times d_\text{out}})` per layer and a task-skill allocation :math:`Z \in \mathbb{R}^{T\times S}`
    of logits: in training :math:`z_{ks}` is a relaxed Bernoulli sample (temperature 1) of logit :math:`Z_{ks}`,
    in evaluation :math:`\sigma(Z_{ks})`. With ``n_splits`` :math:`q > 1` (Multi-Head Routing, Caccia et al.
    2023) each skill is cut into :math:`q` blocks of the input and output, mixed separately. Init as peft's:
    :math:`A_s` Kaiming-uniform (``nn.Linear``'s), :math:`B_s = 0` (the model starts unchanged), :math:`Z` from
    U(-1e-3, 1e-3). Trainable per layer: :math:`S r (d_\text{in} + d_\text{out}) + T q S`.
    """

    task_parameters = ("poly_logits",)

    def __init__(self, base_layer: nn.Module, r: int, n_tasks: int, n_skills: int, n_splits: int,
                 context: TaskContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, _ = linear_dims(base_layer)
        self.r, self.n_tasks, self.n_skills, self.n_splits = r, n_tasks, n_skills, n_splits
        self.context = context
        weight = base_layer.weight
        d_in, d_out = self.in_features // n_splits, self.out_features // n_splits
        self.poly_lora_A = new_parameter((n_splits, n_skills, d_in, r), weight, _kaiming_per_skill)
        self.poly_lora_B = new_parameter((n_splits, n_skills, r, d_out), weight, nn.init.zeros_)
        self.poly_logits = new_parameter((n_tasks, n_splits * n_skills), weight,
                                         lambda t: nn.init.uniform_(t, -1e-3, 1e-3))

    def allocation(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Each example's skill weights (batch, splits, skills): relaxed-Bernoulli samples in training."""
        logits = self.poly_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        z = RelaxedBernoulli(temperature=1.0, logits=logits).rsample() if self.training else torch.sigmoid(logits)
        return z / (z.sum(dim=-1, keepdim=True) + EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        weights = self.allocation(self.context.ids(x.shape[0], x.device))
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(x.shape[0], self.in_features, self.r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.poly_lora_B).transpose(1, 2)
        b = b.reshape(x.shape[0], self.r, self.out_features)
        return result + (x.to(a.dtype).bmm(a).bmm(b) / self.r).to(result.dtype)


def _kaiming_per_skill(tensor: torch.Tensor) -> None:
    """Each (split, skill) slice of A is the transpose of an ``nn.Linear``-initialised (r x d) matrix (peft's)."""
    for split in range(tensor.shape[0]):
        for skill in range(tensor.shape[1]):
            block = torch.empty(tensor.shape[3], tensor.shape[2], dtype=tensor.dtype, device=tensor.device)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            tensor[split, skill] = block.T
