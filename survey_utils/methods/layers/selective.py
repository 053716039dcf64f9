"""Layers and mask machinery of the sparse selective methods (chapter 03); the methods are registered in
``methods/selective.py``, which imports this module inside ``apply`` only.

- :func:`attach_mask`: keep a trainable tensor's gradient on ``k`` of its entries (FISH mask, LT-SFT,
  Child-tuning). The kept flat indices live in an int64 buffer ``<name>_mask_index`` beside the parameter
  (:data:`~survey_utils.methods.registry.MASK_INDEX_SUFFIX`): counting reads its length, on ``meta`` too.
- :func:`fisher_scores` and :func:`change_scores`: what ranks the entries (empirical Fisher; the change made
  by a first, full fine-tuning).
- :class:`DiffLinear`: diff pruning's delta with a hard-concrete L0 gate, and :func:`prune_diff`.

Scores need values: on ``meta`` and under ``FakeTensorMode`` nothing is ranked, and an index of the right
length (entries unspecified) stands in, so counts and memory are exact there while *which* entries is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from survey_utils.methods.common import new_parameter
from survey_utils.methods.layers.lowrank import DeltaLinear
from survey_utils.methods.registry import MASK_INDEX_SUFFIX
from survey_utils.methods.selective import kept


def has_values(tensor: torch.Tensor) -> bool:
    """False on ``meta`` and for fake tensors: there is nothing to rank."""
    from torch._subclasses.fake_tensor import is_fake

    return not tensor.is_meta and not is_fake(tensor)


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` flat indices of the largest scores (sorted); a stand-in of length ``k`` without values."""
    if not has_values(score):
        return torch.empty(k, dtype=torch.int64, device=score.device)
    return torch.topk(score.detach().flatten().float(), k, sorted=False).indices.sort().values


def _masked(grad: torch.Tensor, index: torch.Tensor, scale: float) -> torch.Tensor:
    flat = grad.reshape(-1)
    out = torch.zeros_like(flat).index_copy_(0, index, flat.index_select(0, index))
    return (out * scale if scale != 1.0 else out).view_as(grad)


def attach_mask(module: nn.Module, name: str, index: torch.Tensor, resample: bool = False,
                scale: float = 1.0) -> None:
    r"""Make ``module.<name>`` trainable with its gradient kept on ``index`` only:
    :math:`g \leftarrow s\, (m \odot g)`, :math:`m_i = 1` for :math:`i \in` index.

    The parameter keeps ``requires_grad``: autograd still computes its dense gradient and an optimizer keeps
    dense states; entries outside the mask get a zero gradient and, with weight decay off, never move.
    ``resample``: draw a fresh uniform index of the same length at every backward (Child-tuning_F).
    """
    parameter = getattr(module, name)
    buffer = name + MASK_INDEX_SUFFIX
    module.register_buffer(buffer, index, persistent=True)
    parameter.requires_grad_(True)
    parameter.mask_resampled = resample  # read when counting what changed: a resampled mask reaches every entry

    def hook(grad: torch.Tensor) -> torch.Tensor:
        current = getattr(module, buffer)
        if resample:
            current = torch.rand(grad.numel(), device=grad.device).topk(current.numel(), sorted=False).indices
            setattr(module, buffer, current)
        return _masked(grad, current, scale)

    parameter.register_hook(hook)


def random_batches(config: Any, count: int, seq_len: int = 16, seed: int = 0,
                   device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """``count`` one-example batches of random tokens (labels = inputs): data for scoring when none is given."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator).to(device)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def fisher_scores(model: nn.Module, params: list[nn.Parameter], batches: Iterable[dict[str, torch.Tensor]]
                  ) -> list[torch.Tensor]:
    r"""Empirical Fisher information of each entry: :math:`\hat F_i = \frac1N \sum_{n=1}^N
    (\partial_{\theta_i} \log p(y_n \mid x_n))^2`, one backward per batch (per example with batches of one)."""
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()
    n = 0
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, params)
        for score, g in zip(scores, grads, strict=True):
            score += g.float() ** 2
        n += 1
    model.train(was_training)
    for p, state in zip(params, states, strict=True):
        p.requires_grad_(state)
    return [s / max(n, 1) for s in scores]


def change_scores(model: nn.Module, params: list[nn.Parameter], batches: list[dict[str, torch.Tensor]],
                  steps: int, lr: float = 1e-4) -> list[torch.Tensor]:
    r"""LT-SFT's first phase: fine-tune every parameter of ``params`` for ``steps`` AdamW steps, score each entry
    by :math:`|\theta^{(1)}_i - \theta^{(0)}_i|`, then rewind to :math:`\theta^{(0)}` (the values, in place)."""
    start = [p.detach().clone() for p in params]
    states = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    scores = [(p.detach() - s).abs().float() for p, s in zip(params, start, strict=True)]
    with torch.no_grad():
        for p, s, state in zip(params, start, states, strict=True):
            p.copy_(s)
            p.grad = None
            p.requires_grad_(state)
    return scores


def mask_by_scores(model: nn.Module, names: list[str], density: float,
                   score: Callable[[list[nn.Parameter]], list[torch.Tensor]] | None, resample: bool = False,
                   scale: float = 1.0) -> None:
    """Freeze ``model``, then mask each named parameter (``"module.weight"``) to its top ``kept(density, n)``
    entries by ``score`` (``None``: uniformly random, Child-tuning_F's draw, redrawn every step with ``resample``);
    tensors keeping none stay frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [model.get_parameter(n) for n in names]
    real = all(has_values(p) for p in params)
    scores = score(params) if score is not None and real else [None] * len(params)
    for name, p, s in zip(names, params, scores, strict=True):
        k = kept(density, p.numel())
        if k == 0:
            continue
        module_name, _, leaf = name.rpartition(".")
        ranked = s if s is not None else (torch.rand(p.shape, device=p.device) if real else p)
        attach_mask(model.get_submodule(module_name), leaf, top_indices(ranked, k), resample, scale)


# --- diff pruning -------------------------------------------------------------------------------------------

# Louizos, Welling & Kingma 2018 (arXiv:1712.01312), section 4: the hard-concrete stretch and temperature.
HC_BETA, HC_GAMMA, HC_ZETA = 2 / 3, -0.1, 1.1
# Guo et al.'s released code starts every gate's log-alpha at 5 (gates nearly open).
LOG_ALPHA_INIT = 5.0


class DiffLinear(DeltaLinear):
    r"""Diff pruning around a frozen linear layer (Guo, Rush & Kim 2021, arXiv:2012.07463).

    .. math:: W = W_0 + z \odot \delta, \qquad z = \min(1, \max(0, \bar s)), \quad
              \bar s = \sigma\!\left(\tfrac{\log u - \log(1-u) + \log\alpha}{\beta}\right)(\zeta - \gamma) + \gamma,
              \quad u \sim U(0, 1)

    a dense delta :math:`\delta` (zero at init: ``h = W0 x``) and one hard-concrete gate logit
    :math:`\log\alpha` per weight (5 at init), both trained, with the expected-L0 penalty
    :math:`\sum_i \sigma(\log\alpha_i - \beta \log(-\gamma/\zeta))` (:meth:`l0`) added to the loss. In eval mode
    the gate is deterministic, :math:`\min(1, \max(0, \sigma(\log\alpha)(\zeta-\gamma)+\gamma))`.
    :meth:`prune` keeps the ``density`` fraction of :math:`|z \odot \delta|` with the largest magnitude, fixes
    the gate, and leaves :math:`\delta` trainable on those entries only (the paper's fixed-mask phase);
    ``merge`` then writes only those entries (``merged_entries``).
    """

    def __init__(self, base_layer: nn.Module, density: float) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        shape = (self.out_features, self.in_features)
        self.density = density
        self.diff_delta = new_parameter(shape, weight, nn.init.zeros_)
        self.diff_log_alpha = new_parameter(shape, weight, lambda t: nn.init.constant_(t, LOG_ALPHA_INIT))
        self.pruned = False
        self.merged_entries: int | None = None

    def gate(self) -> torch.Tensor:
        log_alpha = self.diff_log_alpha
        if self.training:
            u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / HC_BETA)
        else:
            s = torch.sigmoid(log_alpha)
        return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def delta_weight(self) -> torch.Tensor:
        if self.pruned:
            return self.diff_delta
        return self.gate() * self.diff_delta

    def l0(self) -> torch.Tensor:
        """Expected number of non-zero gates (Louizos et al. eq. 12)."""
        return torch.sigmoid(self.diff_log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA)).sum()

    @torch.no_grad()
    def prune(self, density: float | None = None) -> int:
        """Magnitude-prune :math:`z \\odot \\delta` (deterministic gate) to ``density``; return the entries kept."""
        if self.pruned:
            return getattr(self, "diff_delta" + MASK_INDEX_SUFFIX).numel()
        was_training = self.training
        self.eval()
        effective = self.gate() * self.diff_delta
        self.train(was_training)
        k = kept(self.density if density is None else density, effective.numel())
        index = top_indices(effective.abs(), k)
        if has_values(effective):
            sparse = torch.zeros_like(effective).view(-1)
            sparse[index] = effective.view(-1)[index]
            self.diff_delta.copy_(sparse.view_as(effective))
        self.diff_log_alpha.requires_grad_(False)
        self.pruned = True
        attach_mask(self, "diff_delta", index)
        return k

    @torch.no_grad()
    def merge(self) -> None:
        """Prune (if not yet), then fold the sparse delta into the base weight: ``merged_entries`` are written."""
        if not self.merged:
            self.merged_entries = self.prune()
            super().merge()


def prune_diff(model: nn.Module, density: float | None = None) -> int:
    """Prune every :class:`DiffLinear` of ``model`` (each to its own ``density`` unless given); entries kept."""
    return sum(m.prune(density) for m in model.modules() if isinstance(m, DiffLinear))


def l0_penalty(model: nn.Module) -> torch.Tensor:
    """The sum of every unpruned :class:`DiffLinear`'s expected L0 norm: add ``lambda * l0_penalty(model)`` to the loss."""
    terms = [m.l0() for m in model.modules() if isinstance(m, DiffLinear) and not m.pruned]
    return torch.stack(terms).sum() if terms else torch.zeros(())
