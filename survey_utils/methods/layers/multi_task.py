r"""Layers of the multi-task methods (chapter 08); the methods are registered in ``methods/multi_task.py``.

- :class:`TaskContext` and :func:`install_task_ids`: a model pre-hook takes ``task_ids`` (one task index per
  example) off the model's keyword arguments, checks it, and keeps it where every task-conditioned layer of
  the model reads it (as peft's Polytropon passes ``task_ids`` to its layers through forward pre-hooks);
- :class:`MultitaskPromptEmbedding` (MPT): a shared prompt, rescaled element-wise by a low-rank task matrix;
- :class:`PolyLinear` (Polytropon): an inventory of LoRA skills around a frozen linear layer, mixed per
  task by a learned, relaxed-binary allocation;
- :class:`AdapterFusionLayer` (AdapterFusion): frozen task adapters and a learned attention over their outputs;
  :func:`load_fusion_sources` copies trained single-task adapters in;
- :class:`MoELoRALinear` (MOELoRA): LoRA experts mixed by a gate on a learned task embedding;
- :class:`LoraHubLinear` (LoRAHub): frozen LoRA modules summed with one shared weight vector, found by the
  gradient-free :func:`search_weights`;
- :func:`transfer_prompt` (SPoT): the most similar source prompt starts the target's;
- :class:`AttemptPromptEmbedding` (ATTEMPT): a target prompt plus an attention mixture of frozen source prompts,
  per example; :func:`load_attempt_sources` copies trained prompts in;
- :class:`XLoraLinear` (X-LoRA): frozen LoRA experts scaled per token by a classifier on a first pass's hidden
  states (:func:`install_xlora`); :func:`load_xlora_experts` copies trained LoRAs in.

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
from torch.nn import functional as F

from survey_utils.errors import SurveyError
from survey_utils.methods.common import linear_dims, new_parameter
from survey_utils.methods.layers.wrapping import ShowsBaseWeightAndBias

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


# --- AdapterFusion ---------------------------------------------------------------------------------------------
class AdapterFusionLayer(ShowsBaseWeightAndBias):
    r"""AdapterFusion (Pfeiffer et al. 2021, arXiv:2005.00247) around a frozen module with :math:`N` source adapters.

    ::

        x ──► [ m (frozen) ] ──► h ──┬──► [ adapter_1 ] … [ adapter_N ]  (frozen, trained one per task)
                                     │          │ u_1 … u_N
                                     └─ Q h ──► softmax_n( (Q h)·(K u_n) ) ──► Σ_n a_n V u_n ──(+ h)──► y

    .. math:: y = h + \sum_{n=1}^{N} a_n\, V u_n, \qquad a = \operatorname{softmax}_n\big((Qh + b_Q)^\top
              (K u_n + b_K)\big), \qquad u_n = \mathrm{adapter}_n(h)

    per position, :math:`h` the output of the adapted module (our Pfeiffer site, chapter 01). Only
    :math:`Q, b_Q, K, b_K` and :math:`V` train: :math:`3d^2 + 2d` per site (:math:`2d^2 + 2d` without the value
    matrix, AdapterHub's "static" fusion). Init as AdapterHub's ``BertFusion`` (adapters 1.3.0,
    ``methods/modeling.py``): :math:`Q, K` from N(0, 0.02) with zero biases, :math:`V = I` with 1e-6 off the
    diagonal (``value_initialized=True``), so fusion starts as an average of the adapters' outputs. AdapterHub's
    temperature schedule is off by default (``temperature=False``: the softmax's temperature stays 1); its
    attention dropout and its value regularisation :math:`\lambda\lVert I - V\rVert^2` (``regularization=True``)
    belong to training, not to the layer. The query is the adapted module's output :math:`h` (AdapterHub reads it
    after the residual and layer norm of its own ``seq_bn`` placement).
    """

    def __init__(self, base_layer: nn.Module, sources: list[nn.Module], value: bool, like: torch.Tensor) -> None:
        super().__init__()
        width = linear_dims(base_layer)[1]
        self.base_layer = base_layer
        self.sources = nn.ModuleList(sources)
        self.sources.requires_grad_(False)  # trained one per task beforehand; frozen while fusing
        bert_init = lambda t: nn.init.normal_(t, 0.0, 0.02)  # noqa: E731 - AdapterHub's init_bert_weights
        self.fusion_query = new_parameter((width, width), like, bert_init)
        self.fusion_query_bias = new_parameter((width,), like, nn.init.zeros_)
        self.fusion_key = new_parameter((width, width), like, bert_init)
        self.fusion_key_bias = new_parameter((width,), like, nn.init.zeros_)
        self.fusion_value = new_parameter((width, width), like, _near_identity) if value else None

    def attention(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' outputs ``(..., N, d)`` and the fusion's weights over them ``(..., N)``."""
        h = h.to(self.fusion_query.dtype)
        ups = torch.stack([source(h) for source in self.sources], dim=-2)
        query = F.linear(h, self.fusion_query, self.fusion_query_bias)
        keys = F.linear(ups, self.fusion_key, self.fusion_key_bias)
        return ups, torch.softmax((keys @ query.unsqueeze(-1)).squeeze(-1), dim=-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        ups, weights = self.attention(h)
        values = ups if self.fusion_value is None else F.linear(ups, self.fusion_value)
        return h + (weights.unsqueeze(-2) @ values).squeeze(-2).to(h.dtype)


def _near_identity(tensor: torch.Tensor) -> None:
    """AdapterHub's ``value_initialized``: the identity, with 1e-6 everywhere off the diagonal."""
    tensor.fill_(1e-6)
    tensor.fill_diagonal_(1.0)


def load_fusion_sources(model: nn.Module, sources: list[nn.Module]) -> int:
    """Copy trained single-task adapters into a fusion model's frozen sources; returns tensors copied.

    ``sources[n]`` is a model with adapters of the same placement and width (e.g. the registered ``pfeiffer``
    method applied and trained on task ``n``). Adapters trained on a different model, or with another bottleneck,
    are refused in one line naming the first tensor that does not fit."""
    fusions = [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterFusionLayer)]
    if not fusions:
        raise SurveyError("the model has no AdapterFusion layers: apply adapter_fusion first")
    if len(sources) != len(fusions[0][1].sources):
        raise SurveyError(f"{len(sources)} source models for {len(fusions[0][1].sources)} fused adapters")
    copied = 0
    for n, source in enumerate(sources):
        for name, fusion in fusions:
            try:
                adapter = source.get_submodule(name).adapter
            except AttributeError:
                raise SurveyError(f"source {n} has no adapter at {name}: it was built on another model or "
                                  "placement") from None
            target = fusion.sources[n]
            for key, tensor in adapter.state_dict().items():
                mine = target.state_dict()[key]
                if tensor.shape != mine.shape:
                    raise SurveyError(f"source {n}'s {name}.{key} has shape {tuple(tensor.shape)}, the fusion "
                                      f"model's {tuple(mine.shape)}: adapters trained on a different model")
            target.load_state_dict(adapter.state_dict())
            copied += len(adapter.state_dict())
    return copied


# --- MOELoRA ---------------------------------------------------------------------------------------------------
class MoELoRALinear(ShowsBaseWeightAndBias):
    r"""MOELoRA (Liu et al. 2024, arXiv:2310.18339): LoRA experts mixed by a task-conditioned gate.

    .. math:: h = W_0 x + \frac{\alpha}{r} \sum_{e=1}^{E} \omega_{ke}\, B_e A_e x, \qquad
              \omega_k = \operatorname{softmax}(G\, t_k)

    :math:`E` experts of rank :math:`r/E` each (the total rank :math:`r` is split, as the paper's code does),
    a task embedding :math:`t_k \in \mathbb{R}^{e}` per task and a gate :math:`G \in \mathbb{R}^{E\times e}` (no
    bias), both per layer as in the authors' ``MMOELoraLinearS``. Init: :math:`A_e` like LoRA's (Kaiming-uniform),
    :math:`B_e = 0` (the model starts unchanged), :math:`t_k` like ``nn.Embedding`` (N(0, 1)), :math:`G` like
    ``nn.Linear``. Trainable per layer: :math:`r(d_\text{in} + d_\text{out}) + Te + Ee`; a task adds :math:`e` per
    layer. The authors' table has one spare row (``task_num + 1``); ours has exactly :math:`T`.
    """

    task_parameters = ("moelora_task_embedding",)

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, num_experts: int, n_tasks: int,
                 task_embedding_dim: int, context: TaskContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, _ = linear_dims(base_layer)
        self.r, self.num_experts, self.scaling, self.context = r, num_experts, lora_alpha / r, context
        weight = base_layer.weight
        rank = r // num_experts
        self.moelora_A = new_parameter((num_experts, self.in_features, rank), weight, _kaiming_per_expert)
        self.moelora_B = new_parameter((num_experts, rank, self.out_features), weight, nn.init.zeros_)
        self.moelora_task_embedding = new_parameter((n_tasks, task_embedding_dim), weight, nn.init.normal_)
        self.moelora_gate = new_parameter((num_experts, task_embedding_dim), weight,
                                          lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))

    def gate(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Each example's expert weights ``(batch, E)``: a softmax of the gate applied to its task's embedding."""
        return torch.softmax(self.moelora_task_embedding[task_ids] @ self.moelora_gate.T, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        omega = self.gate(self.context.ids(x.shape[0], x.device)).to(self.moelora_A.dtype)
        experts, rank = self.moelora_A.shape[0], self.moelora_A.shape[2]
        # The experts side by side: x [A_1 .. A_E] (t x r), each expert's block scaled by its gate weight, then
        # times [B_1; ..; B_E]. Contracting in this order keeps every intermediate at rank r (an einsum over
        # (expert, rank, out) may build a t x E x d_out tensor first).
        inner = x.to(self.moelora_A.dtype) @ self.moelora_A.permute(1, 0, 2).reshape(self.in_features, self.r)
        scale = omega.repeat_interleave(rank, dim=-1).view(x.shape[0], *[1] * (x.dim() - 2), experts * rank)
        update = (inner * scale) @ self.moelora_B.reshape(self.r, self.out_features)
        return result + (self.scaling * update).to(result.dtype)


def _kaiming_per_expert(tensor: torch.Tensor) -> None:
    """Each expert's A is the transpose of an ``nn.Linear``-initialised (rank x d_in) matrix, as LoRA's."""
    for expert in range(tensor.shape[0]):
        block = torch.empty(tensor.shape[2], tensor.shape[1], dtype=tensor.dtype, device=tensor.device)
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        tensor[expert] = block.T


# --- LoRAHub ---------------------------------------------------------------------------------------------------
class LoraHubLinear(ShowsBaseWeightAndBias):
    r"""LoRAHub (Huang et al. 2023, arXiv:2307.13269): a weighted sum of :math:`N` frozen LoRA modules.

    .. math:: h = W_0 x + \frac{\alpha}{r} \sum_{n=1}^{N} w_n B_n A_n x

    The :math:`N` modules were trained one per upstream task; the weights :math:`w \in \mathbb{R}^N`, one vector
    shared by every adapted layer of the model, are the method's only learned numbers, found without gradients
    (:func:`search_weights`). Init: :math:`w = 0` (the paper starts its search there: the base model); the
    modules as LoRA's (:math:`A` Kaiming-uniform, :math:`B = 0`) until trained ones are loaded. Added: :math:`N`
    searched numbers and :math:`N r (d_\text{in} + d_\text{out})` frozen per layer. Mergeable:
    :math:`W_0 + \frac{\alpha}{r}\sum_n w_n B_n A_n` once :math:`w` is found.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, num_sources: int,
                 weights: nn.Parameter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_dims(base_layer)
        self.scaling = lora_alpha / r
        weight = base_layer.weight
        self.lorahub_A = new_parameter((num_sources, r, self.in_features), weight,
                                       lambda t: [nn.init.kaiming_uniform_(t[n], a=math.sqrt(5)) for n in range(len(t))])
        self.lorahub_B = new_parameter((num_sources, self.out_features, r), weight, nn.init.zeros_)
        self.lorahub_A.requires_grad_(False)
        self.lorahub_B.requires_grad_(False)
        self.lorahub_weights = weights  # the same Parameter in every layer: counted once
        self.merged = False

    def delta(self) -> torch.Tensor:
        r""":math:`\frac{\alpha}{r}\sum_n w_n B_n A_n`, (d_out x d_in)."""
        w = self.lorahub_weights.to(self.lorahub_A.dtype)
        return self.scaling * torch.einsum("n,nor,nri->oi", w, self.lorahub_B, self.lorahub_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        w = self.lorahub_weights.to(self.lorahub_A.dtype)
        inner = torch.einsum("...i,nri->...nr", x.to(self.lorahub_A.dtype), self.lorahub_A)
        update = torch.einsum("...nr,nor,n->...o", inner, self.lorahub_B, w)
        return result + (self.scaling * update).to(result.dtype)

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                delta = self.delta().to(self.weight.dtype)
                self.weight.add_(delta.T if self.fan_in_fan_out else delta)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                delta = self.delta().to(self.weight.dtype)
                self.weight.sub_(delta.T if self.fan_in_fan_out else delta)
            self.merged = False


def load_lorahub_sources(model: nn.Module, sources: list[nn.Module]) -> int:
    """Copy trained LoRA modules (models with the registered ``lora`` applied, one per upstream task) into a LoRAHub
    model's frozen modules; returns tensors copied. A module of another shape is refused in one line."""
    return copy_lora_stacks(model, sources, LoraHubLinear, "lorahub", "composed LoRA modules")


def _stacks(layer: nn.Module, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return getattr(layer, f"{prefix}_A"), getattr(layer, f"{prefix}_B")


def copy_lora_stacks(model: nn.Module, sources: list[nn.Module], layer_type: type, prefix: str, what: str) -> int:
    """Copy source ``n``'s LoRA factors at each ``layer_type`` layer into slot ``n`` of its stacked
    ``<prefix>_A`` / ``<prefix>_B`` (LoRAHub's composed modules, X-LoRA's experts); returns tensors copied. A
    source without a LoRA there, or with other shapes (another model or rank), is refused in one line."""
    layers = [(name, _stacks(m, prefix)) for name, m in model.named_modules() if isinstance(m, layer_type)]
    if not layers:
        raise SurveyError(f"the model has no {layer_type.__name__} layers: apply {prefix} first")
    slots = layers[0][1][0].shape[0]
    if len(sources) != slots:
        raise SurveyError(f"{len(sources)} source models for {slots} {what}")
    copied = 0
    with torch.no_grad():
        for n, source in enumerate(sources):
            for name, (stack_a, stack_b) in layers:
                try:
                    lora = source.get_submodule(name)
                    a, b = lora.lora_A, lora.lora_B
                except AttributeError:
                    raise SurveyError(f"source {n} has no LoRA at {name}: it adapts other modules") from None
                if a.shape != stack_a.shape[1:] or b.shape != stack_b.shape[1:]:
                    raise SurveyError(f"source {n}'s LoRA at {name} is {tuple(b.shape)} x {tuple(a.shape)}, the "
                                      f"{prefix} slot's {tuple(stack_b.shape[1:])} x {tuple(stack_a.shape[1:])}: "
                                      "another model or rank")
                stack_a[n].copy_(a)
                stack_b[n].copy_(b)
                copied += 2
    return copied


def search_weights(objective: Any, num_sources: int, budget: int, seed: int = 0, sigma: float = 0.5,
                   bound: float = 1.5) -> tuple[torch.Tensor, float]:
    r"""Minimise ``objective(w)`` over :math:`w \in [-1.5, 1.5]^N` without gradients: a (1+1) evolution strategy.

    From :math:`w = 0`, each of ``budget`` steps draws :math:`w' = \mathrm{clip}(w + \sigma z)`,
    :math:`z \sim N(0, I)`, keeps it if it is no worse, and adapts :math:`\sigma` by Rechenberg's one-fifth
    success rule (:math:`\times 1.5` on success, :math:`\times 1.5^{-1/4}` on failure). The paper uses CMA-ES from
    nevergrad (the same family, with a learned covariance) with the same bound and an L1 penalty on :math:`w`,
    which ``objective`` may include. Deterministic in ``seed``. Returns the best :math:`w` and its objective.
    """
    generator = torch.Generator().manual_seed(seed)
    best = torch.zeros(num_sources, dtype=torch.float64)
    best_value = float(objective(best))
    for _ in range(budget):
        candidate = (best + sigma * torch.randn(num_sources, generator=generator, dtype=torch.float64))
        candidate = candidate.clamp(-bound, bound)
        value = float(objective(candidate))
        if value <= best_value:
            best, best_value, sigma = candidate, value, sigma * 1.5
        else:
            sigma *= 1.5 ** -0.25
    return best, best_value


# --- SPoT ------------------------------------------------------------------------------------------------------
def prompt_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""Vu et al.'s task similarity of two prompts (n x d each), "cosine of average tokens":
    :math:`\cos\big(\frac1n\sum_i a_i,\ \frac1n\sum_i b_i\big)`."""
    return float(F.cosine_similarity(a.mean(dim=0), b.mean(dim=0), dim=0))


def transfer_prompt(model: nn.Module, sources: list[torch.Tensor], probe: torch.Tensor) -> int:
    r"""SPoT's retrieval (Vu et al. 2022, arXiv:2110.07904): set the model's prompt to the source prompt most similar
    to ``probe`` (a prompt trained briefly on the target task: its *task embedding*) and return the source's index.

    Prompts of another shape than the model's (trained on another model or length) are refused in one line."""
    weight = model.prompt_encoder.embedding.weight
    for n, prompt in enumerate([*sources, probe]):
        if prompt.shape != weight.shape:
            what = "the probe" if n == len(sources) else f"source prompt {n}"
            raise SurveyError(f"{what} has shape {tuple(prompt.shape)}, the model's prompt {tuple(weight.shape)}: "
                              "trained on another model or prompt length")
    if not sources:
        raise SurveyError("no source prompts to transfer from")
    best = max(range(len(sources)), key=lambda n: prompt_similarity(sources[n], probe))
    with torch.no_grad():
        weight.copy_(sources[best])
    return best


# --- ATTEMPT ---------------------------------------------------------------------------------------------------
class AttemptPromptEmbedding(nn.Module):
    r"""ATTEMPT (Asai et al. 2022, arXiv:2205.11961): each example's prompt is the target prompt plus an attention
    mixture of frozen source prompts and the target prompt itself.

    ::

        E(x) ─ max-pool ─► x̂ ─► W_down ─ SiLU ─► W_up ─► LayerNorm ─► H ──┐
        P_1 … P_t (frozen), P_target ─ max-pool over positions ─► P̂_j ──► a = softmax_j(P̂_j · H / T)
        P_instance = P_target + Σ_j a_j P_j   (j over the t sources and the target)  ─► [P_instance; E(x)]

    .. math:: \hat x = \max_i E(x)_i,\quad H = \mathrm{LN}\big(W_\text{up}\,\mathrm{SiLU}(W_\text{down}\hat x)\big),
              \quad a_j = \frac{\exp(\hat P_j \cdot H / T)}{\sum_{k=1}^{t+1} \exp(\hat P_k \cdot H / T)},\quad
              P = P_\text{target} + \sum_{j=1}^{t+1} a_j P_j

    Transcribed from the authors' code (github.com/AkariAsai/ATTEMPT, commit 613f700,
    ``attempt/third_party/models/t5/modeling_t5.py``, ``T5Stack`` with ``attn_method="sub"``, the method of the
    paper's configs ``attempt/configs/attempt/*.json``): ``attn_W_down = nn.Linear(d, 100, bias=False)``,
    ``attn_W_up = nn.Linear(100, d, bias=False)``, SiLU between, ``nn.LayerNorm(d)`` after; max-pooling over the
    input positions (padding included, as there) and over each prompt's positions; the softmax over the sources
    *and* the target, then the target added once more. Trainable, as ``attempt/utils/utils.py``'s
    ``freeze_model_params`` leaves it for ``"sub"``: ``attn_W_down``, ``attn_W_up`` and the target prompt
    (``prefix_shared``), :math:`nd + 2rd`. Its LayerNorm is not unfrozen there and keeps its initial affine
    (weight 1, bias 0), so here it is a LayerNorm without parameters (the same function). Init: :math:`W` from
    N(0, 0.01) (``T5PreTrainedModel._init_weights``, its ``nn.Linear`` branch "for adapter layers"), the target
    like prompt tuning's U(-0.5, 0.5) (``init_prefix_weights``), the sources zero until
    :func:`load_attempt_sources` copies trained prompts in (and starts the target from the first, as
    ``run_seq2seq.py`` does for single-task training). The authors pool a per-example copy of every prompt; this
    layer pools each prompt once and mixes the frozen sources apart from the target, the same numbers.
    """

    def __init__(self, num_virtual_tokens: int, like: torch.Tensor, num_sources: int, attn_dim: int,
                 temperature: float) -> None:
        super().__init__()
        d = like.shape[1]
        self.num_virtual_tokens, self.temperature = num_virtual_tokens, temperature
        self.embedding = nn.Embedding(num_virtual_tokens, d, device=like.device, dtype=like.dtype)  # the target
        if like.device.type != "meta":
            with torch.no_grad():
                nn.init.uniform_(self.embedding.weight, -0.5, 0.5)
        self.attempt_sources = new_parameter((num_sources, num_virtual_tokens, d), like, nn.init.zeros_)
        self.attempt_sources.requires_grad_(False)  # trained beforehand, one per source task; frozen here
        self.attn_W_down = new_parameter((attn_dim, d), like, lambda t: nn.init.normal_(t, 0.0, 0.01))
        self.attn_W_up = new_parameter((d, attn_dim), like, lambda t: nn.init.normal_(t, 0.0, 0.01))
        self.pooled: torch.Tensor | None = None  # max-pooled input embeddings of the forward in progress

    def attention(self, pooled: torch.Tensor) -> torch.Tensor:
        """Each example's weights over ``[sources..., target]``, ``(batch, t + 1)``, from its pooled input."""
        hidden = F.silu(pooled.to(self.attn_W_down.dtype) @ self.attn_W_down.T) @ self.attn_W_up.T
        hidden = F.layer_norm(hidden, hidden.shape[-1:])
        keys = torch.cat([self.attempt_sources.max(dim=1).values,
                          self.embedding.weight.max(dim=0, keepdim=True).values])
        return torch.softmax(hidden @ keys.T / self.temperature, dim=-1)

    def forward(self, batch_size: int) -> torch.Tensor:
        if self.pooled is None or self.pooled.shape[0] != batch_size:
            raise SurveyError("ATTEMPT's prompt depends on the input: call the model, whose hook pools the input")
        weights = self.attention(self.pooled)
        target = self.embedding.weight
        sources = torch.einsum("bs,snd->bnd", weights[:, :-1], self.attempt_sources)
        return target + sources + weights[:, -1:, None] * target


def _pool_input(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """ATTEMPT's pre-hook (before the soft prompt's): embed the input once, keep its max-pool for the prompt."""
    if len(args) > 1:
        raise SurveyError(f"pass the model's inputs by keyword with ATTEMPT ({len(args)} positional given)")
    kwargs = {**kwargs, "input_ids": args[0]} if args else dict(kwargs)
    embeds, input_ids = kwargs.pop("inputs_embeds", None), kwargs.pop("input_ids", None)
    if embeds is None:
        if input_ids is None:
            raise SurveyError("ATTEMPT needs input_ids or inputs_embeds: its attention reads the input")
        embeds = model.get_input_embeddings()(input_ids)
    model.prompt_encoder.pooled = embeds.max(dim=1).values
    kwargs["inputs_embeds"] = embeds
    return (), kwargs


def install_attempt(model: nn.Module, encoder: AttemptPromptEmbedding) -> nn.Module:
    """Attach ``encoder`` as the model's soft prompt (chapter 02's hook prepends it) and the pooling pre-hook."""
    from survey_utils.methods.layers.prompts import install_soft_prompt

    install_soft_prompt(model, encoder)
    model.register_forward_pre_hook(_pool_input, with_kwargs=True, prepend=True)
    return model


def load_attempt_sources(model: nn.Module, prompts: list[torch.Tensor], target_from_first: bool = True) -> int:
    """Copy trained source prompts (``n x d`` each, e.g. prompt tuning's ``embedding.weight`` on each source task)
    into an ATTEMPT model's frozen sources; with ``target_from_first`` start the target prompt from the first, as
    the authors' ``run_seq2seq.py`` does. Returns the prompts copied; a prompt of another shape is one line."""
    encoder = getattr(model, "prompt_encoder", None)
    if not isinstance(encoder, AttemptPromptEmbedding):
        raise SurveyError("the model has no ATTEMPT prompt: apply attempt first")
    sources = encoder.attempt_sources
    if len(prompts) != sources.shape[0]:
        raise SurveyError(f"{len(prompts)} source prompts for {sources.shape[0]} sources")
    for n, prompt in enumerate(prompts):
        if tuple(prompt.shape) != tuple(sources.shape[1:]):
            raise SurveyError(f"source prompt {n} has shape {tuple(prompt.shape)}, ATTEMPT's sources "
                              f"{tuple(sources.shape[1:])}: trained on another model or prompt length")
    with torch.no_grad():
        sources.copy_(torch.stack([p.to(sources) for p in prompts]))
        if target_from_first:
            encoder.embedding.weight.copy_(sources[0])
    return len(prompts)


# --- X-LoRA ----------------------------------------------------------------------------------------------------
class XLoraContext:
    """The scalings of the forward pass in progress, ``(batch, seq, L, N)``, read by every :class:`XLoraLinear`."""

    def __init__(self, top_k_lora: int | None, enable_softmax_topk: bool, global_scaling_weight: float) -> None:
        self.top_k_lora, self.enable_softmax_topk = top_k_lora, enable_softmax_topk
        self.global_scaling_weight = global_scaling_weight
        self.scalings: torch.Tensor | None = None

    def for_layer(self, layer: int) -> torch.Tensor | None:
        """Layer ``layer``'s scalings ``(batch, seq, N)``: top-k masked and re-normalised where asked (peft's
        ``XLoraLayer.get_maybe_topk_scalings``)."""
        if self.scalings is None:
            return None
        scalings = self.scalings[:, :, layer, :]
        if self.top_k_lora is not None:
            top = torch.topk(scalings, k=self.top_k_lora, dim=-1).indices
            mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
            scalings = scalings * mask.to(scalings.dtype)
        if self.enable_softmax_topk:
            kept = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~kept, float("-inf")), dim=-1).masked_fill(~kept, 0.0)
        return scalings


class XLoraLinear(ShowsBaseWeightAndBias):
    r"""X-LoRA (Buehler & Buehler 2024, arXiv:2402.07148) around a frozen linear layer: :math:`N` frozen LoRA experts,
    each token's input scaled per expert by the classifier's output for this layer.

    .. math:: h = W_0 x + g\,\frac{\alpha}{r} \sum_{n=1}^{N} B_n A_n (\lambda_{\ell n}(t) \odot x), \qquad
              \lambda(t) = \mathrm{softmax}\big(\mathrm{MLP}(z_t) / \tau\big)

    :math:`z_t` is token :math:`t`'s last hidden state from a first forward pass of the same model (the scaling
    pass, experts scaled by ``scaling_pass_value``, 0: the base model), :math:`g` the ``global_scaling_weight``.
    As peft 0.21.2's ``XLoraLinearLayer.forward``: the scaling multiplies the input, before :math:`A_n`. The experts
    start as LoRA's (:math:`A` Kaiming-uniform, :math:`B = 0`) until :func:`load_xlora_experts` copies trained
    ones in; they are frozen (peft's ``use_trainable_adapters=False``). Without scalings (the layer called outside
    the model's hook) the experts are summed unscaled, as peft's layer does with ``scalings=None``.
    """

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, num_adapters: int, context: XLoraContext,
                 trainable: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, _ = linear_dims(base_layer)
        self.scaling, self.context, self.layer_number = lora_alpha / r, context, 0
        weight = base_layer.weight
        self.xlora_A = new_parameter((num_adapters, r, self.in_features), weight,
                                     lambda t: [nn.init.kaiming_uniform_(t[n], a=math.sqrt(5)) for n in range(len(t))])
        self.xlora_B = new_parameter((num_adapters, self.out_features, r), weight, nn.init.zeros_)
        self.xlora_A.requires_grad_(trainable)
        self.xlora_B.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        scalings = self.context.for_layer(self.layer_number)
        weight = 1.0 if scalings is None else self.context.global_scaling_weight
        x = x.to(self.xlora_A.dtype)
        for n in range(self.xlora_A.shape[0]):
            scaled = x if scalings is None else x * scalings[:, :, n].unsqueeze(-1)
            update = scaled @ self.xlora_A[n].T @ self.xlora_B[n].T
            result = result + (update * self.scaling * weight).to(result.dtype)
        return result


def xlora_classifier(hidden_size: int, out_features: int, depth: int, size: int, dropout: float,
                     like: torch.Tensor) -> nn.Sequential:
    """peft's ``XLoraClassifier.layers``: Linear (with bias) to the logits at depth 1; else Linear-ReLU(-Dropout)
    to ``size``, ``depth - 2`` more of those, then the last Linear (default ``nn.Linear`` inits)."""
    f = {"device": like.device, "dtype": like.dtype}
    layers: list[nn.Module] = []
    width = hidden_size
    for _ in range(depth - 1):
        layers += [nn.Linear(width, size, **f), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = size
    return nn.Sequential(*layers, nn.Linear(width, out_features, **f))


def install_xlora(model: nn.Module, classifier: nn.Sequential, context: XLoraContext, num_adapters: int,
                  layerwise: bool, enable_softmax: bool, temperature: float, pass_value: float) -> nn.Module:
    """Number the model's :class:`XLoraLinear` layers in module order (peft's ``convert_layers_to_xlora``), attach
    ``classifier`` as ``model.xlora_classifier`` and the pre-hook of the dual forward: a no-grad scaling pass of
    the model (every scaling ``pass_value``) for the last hidden state, then the classifier's scalings for the
    real pass (peft's ``XLoraModel._enable_peft_forward_hooks`` and ``XLoraClassifier.forward``)."""
    layers = [m for m in model.modules() if isinstance(m, XLoraLinear)]
    for number, layer in enumerate(layers):
        layer.layer_number = number
    model.xlora_classifier = classifier

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("past_key_values") is not None:
            raise SurveyError("past_key_values cannot be passed to X-LoRA: its two passes would both extend the cache")
        ref = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if ref is None:
            raise SurveyError("X-LoRA needs input_ids or inputs_embeds to size its scalings")
        batch, seq = ref.shape[:2]
        dtype = classifier[-1].weight.dtype
        context.scalings = torch.full((batch, seq, len(layers), num_adapters), pass_value, dtype=dtype,
                                      device=classifier[-1].weight.device)
        with torch.no_grad():
            hidden = module.forward(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True})
        logits = classifier(hidden.hidden_states[-1].to(dtype))
        if layerwise:
            scalings = logits.reshape(batch, seq, len(layers), num_adapters)
        else:
            scalings = logits.unsqueeze(2).expand(-1, -1, len(layers), -1).reshape(batch, seq, len(layers),
                                                                                   num_adapters)
        context.scalings = torch.softmax(scalings / temperature, dim=-1) if enable_softmax else scalings
        return args, kwargs

    model.xlora_context = context
    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def load_xlora_experts(model: nn.Module, sources: list[nn.Module]) -> int:
    """Copy trained LoRA modules (models with the registered ``lora`` applied, one per expert) into an X-LoRA model's
    frozen experts; returns tensors copied. A module of another shape or placement is refused in one line."""
    return copy_lora_stacks(model, sources, XLoraLinear, "xlora", "X-LoRA experts")
