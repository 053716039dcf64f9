"""Chapter 04's experiments: what each low-rank form can express, and where AdaLoRA puts its rank.

Each helper names the section of ``notebooks/04_reparameterized.py`` that shows it. The layers themselves
live in :mod:`survey_utils.methods.layers.lowrank`; nothing here is part of a method's contract.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from survey_utils.methods.layers.lowrank import DeltaLinear, RankAllocator, orthogonal_regularization


class _one_thread:
    """Run tiny fits on one intra-op thread: at these sizes threads only add synchronisation, and on a busy
    machine spinning threads slow every step many times over."""

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *_: Any) -> None:
        torch.set_num_threads(self.previous)


def update_spectra(layer: nn.Linear, adapters: dict[str, DeltaLinear], steps: int = 60, lr: float = 3e-2,
                   samples: int = 512, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Fit each adapter of ``layer`` to a full-rank target update; return each learned update's spectrum.

    The target is :math:`W^\\star = W_0 + \\Delta^\\star` with :math:`\\Delta^\\star` Gaussian (full rank);
    each adapter minimises :math:`\\lVert h(x) - W^\\star x\\rVert^2` over random inputs with Adam. The
    singular values of the learned :math:`\\Delta W` show how many directions each form can express for
    its parameter count (LoRA: r; LoHa: up to :math:`r^2`; LoKr: rank W1 x rank W2).

    Defined for chapter 04, section "What each form can express" (the spectra plot).
    """
    generator = torch.Generator().manual_seed(seed)
    weight = layer.weight.detach()
    target = torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * weight.std()
    x = torch.randn(samples, weight.shape[1], generator=generator, dtype=weight.dtype)
    y = x @ (weight + target).T + (layer.bias.detach() if layer.bias is not None else 0)
    with _one_thread():
        results = _fit_each(adapters, x, y, target, steps, lr)
    return results


def _fit_each(adapters: dict[str, DeltaLinear], x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
              steps: int, lr: float) -> dict[str, dict[str, Any]]:
    results = {}
    for name, adapter in adapters.items():
        params = [p for p in adapter.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            loss = (adapter(x) - y).pow(2).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            singular = torch.linalg.svdvals(adapter.delta_weight()).tolist()
        results[name] = {"params": sum(p.numel() for p in params), "singular_values": singular,
                         "loss": losses, "target_singular_values": torch.linalg.svdvals(target).tolist()}
    return results


def adalora_allocation(model: nn.Module, inputs: dict[str, torch.Tensor], teacher: nn.Module, steps: int,
                       orth_reg_weight: float = 0.5, lr: float = 1e-2) -> dict[str, Any]:
    """Train an AdaLoRA-adapted model to imitate ``teacher``'s last hidden state; record ranks per layer.

    ``model`` carries ``rank_allocator`` (from ``apply``); each step: loss (MSE to the teacher plus the
    orthogonality term), backward, Adam step, ``update_and_allocate(step)``. Returns the ranks of every
    adapted layer and the budget after each step.

    Defined for chapter 04, section "AdaLoRA: where the rank goes" (the heat map).
    """
    allocator: RankAllocator = model.rank_allocator
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        wanted = teacher.base_model(**inputs).last_hidden_state
    history: dict[str, Any] = {"layers": list(allocator.layers), "ranks": [], "budget": [], "loss": []}
    model.train()
    with _one_thread():
        _allocation_steps(model, allocator, optimizer, inputs, wanted, steps, orth_reg_weight, history)
    return history


def _allocation_steps(model: nn.Module, allocator: RankAllocator, optimizer: torch.optim.Optimizer,
                      inputs: dict[str, torch.Tensor], wanted: torch.Tensor, steps: int, orth_reg_weight: float,
                      history: dict[str, Any]) -> None:
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        hidden = model.base_model(**inputs).last_hidden_state
        loss = (hidden - wanted).pow(2).mean()
        (loss + orth_reg_weight * orthogonal_regularization(model)).backward()
        optimizer.step()
        history["budget"].append(allocator.update_and_allocate(step))
        history["ranks"].append([allocator.ranks()[name] for name in history["layers"]])
        history["loss"].append(loss.item())
