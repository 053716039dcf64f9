"""Gradient-free methods (``Method.gradient_free``, LoRAHub's search): a step is a forward pass and its loss under
``torch.no_grad()``, in the estimate and in the simulation alike (the registry picks the methods)."""

from __future__ import annotations

import pytest

from survey_utils.memory import estimate, simulate
from survey_utils.methods import list_methods

GRADIENT_FREE = [m.name for m in list_methods() if m.gradient_free]


def test_the_registry_has_a_gradient_free_method() -> None:
    assert GRADIENT_FREE, "no registered method is gradient-free: the tests below would check nothing"


@pytest.mark.parametrize("method", GRADIENT_FREE)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_estimate_matches_a_forward_only_simulation(model: str, method: str) -> None:
    est = estimate(model, method, {}, batch_size=2, seq_len=128, device="cpu")
    sim = simulate(model, method, {}, batch_size=2, seq_len=128)
    # nothing saved, nothing held for an optimizer: the simulation's categories say so
    assert sim.by_category["Gradient"] == 0 and sim.by_category["Optstate"] == 0
    assert est.gradients == est.optimizer_states == est.activations == 0 and est.peak_phase == "forward"
    # what is left is the weights, the batch and the loss's transients; the last hidden state is left out (<1%)
    assert abs(est.total - sim.peak) / sim.peak < 0.01, (est.total, sim.peak)


@pytest.mark.parametrize("method", GRADIENT_FREE)
def test_checkpointing_changes_nothing_without_a_backward_pass(method: str) -> None:
    plain = estimate("tiny-llama", method, {}, batch_size=2, seq_len=128)
    checkpointed = estimate("tiny-llama", method, {}, batch_size=2, seq_len=128, gradient_checkpointing=True)
    assert checkpointed.total == plain.total
    assert any("no backward pass" in line for line in checkpointed.assumptions)
