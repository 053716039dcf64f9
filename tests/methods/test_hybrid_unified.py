"""Xu et al.'s unified methods of chapter 05: ProPETL, AdaMix, SparseAdapter.

Neither peft nor AdapterHub has them, so the count is checked two ways (closed form, built model) on the zoo (less
the bigger configs of walked families, ``tests/conftest.py``'s ``SAME_FAMILY_AS``); the real-tensor checks are
the issue's: identity at init, AdaMix's averaged module is the mean of its experts, ProPETL's layers share one
prototype's storage (stored bytes counted, not just parameters), SparseAdapter's pruned entries stay zero; and the memory
estimate against the fake-tensor simulation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from survey_utils.counting import apply_method, closed_form, count_parameters
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.memory.simulation import simulate
from survey_utils.methods import get_method
from survey_utils.methods.hybrid import ADAMIX, PROPETL, SPARSE_ADAPTER, propetl_stored_bytes, sparse_kept
from survey_utils.methods.registry import Method
from survey_utils.parity import example_inputs, forward
from survey_utils.zoo import build_model, load_config
from tests.conftest import MATRIX_MODELS, TINY

UNIFIED = [PROPETL, ADAMIX, SPARSE_ADAPTER]


def _ids(methods: list[Method]) -> list[str]:
    return [m.name for m in methods]


def _built(model: str, method: Method, **hp: object) -> torch.nn.Module:
    return apply_method(build_model(load_config(model), device="cpu", seed=0), method, **hp)


def test_registered_in_chapter_05() -> None:
    for method in UNIFIED:
        assert get_method(method.name) is method and method.chapter == "05_hybrid_unified"
        assert method.taxonomy.xu == "unified" and method.peft_config is None


@pytest.mark.parametrize("model", MATRIX_MODELS)
@pytest.mark.parametrize("method", UNIFIED, ids=_ids(UNIFIED))
def test_closed_form_equals_the_built_model(method: Method, model: str) -> None:
    config = load_config(model)
    try:
        method.resolve(config)
    except SurveyError as error:
        assert "\n" not in str(error)
        return
    formula = closed_form(config, method)
    built = count_parameters(apply_method(build_model(config, device="meta"), method))
    assert (formula.trainable, formula.total) == (built.trainable, built.total)


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", UNIFIED, ids=_ids(UNIFIED))
def test_identity_at_init(method: Method, model: str) -> None:
    """In eval mode and in training mode (same dropout draws: the methods' own randomness, AdaMix's routing, uses
    Python's generator, not torch's), the adapted model is the base model at initialisation."""
    config = load_config(model)
    inputs = example_inputs(config)
    base = build_model(config, device="cpu", seed=0, dtype=torch.float64)
    built = apply_method(build_model(config, device="cpu", seed=0, dtype=torch.float64), method)
    for training in (True, False):
        base.train(training)
        built.train(training)
        torch.manual_seed(0)
        expected = forward(base, inputs)
        torch.manual_seed(0)
        assert torch.equal(forward(built, inputs), expected)


# Chapter 05 quotes these (trainable parameters at the papers' defaults).
AT_DEFAULTS = {
    ("propetl", "roberta-base"): 1_278_784, ("propetl", "t5-large"): 8_531_029,
    ("adamix", "roberta-base"): 747_264, ("adamix", "t5-large"): 3_984_384,
    ("sparse_adapter", "roberta-base"): 540_648, ("sparse_adapter", "t5-large"): 3_827_136,
}


@pytest.mark.parametrize(("name", "model"), sorted(AT_DEFAULTS))
def test_counts_at_defaults(name: str, model: str) -> None:
    assert get_method(name).count(load_config(model)) == AT_DEFAULTS[(name, model)]


def test_defaults_are_the_papers() -> None:
    assert {k: ADAMIX.defaults()[k] for k in ("bottleneck_size", "num_experts", "share_down", "share_up")} == \
        {"bottleneck_size": 16, "num_experts": 4, "share_down": False, "share_up": True}  # microsoft/AdaMix README
    assert (PROPETL.defaults()["reduction_factor"], PROPETL.defaults()["sparsity"]) == (12.0, 0.5)  # ProPETL script
    assert SPARSE_ADAPTER.defaults()["sparsity"] == 0.4  # Lialin et al.: about 40% pruned


# --- AdaMix -------------------------------------------------------------------------------------------------------


def test_adamix_averaged_module_is_the_mean_of_its_experts() -> None:
    from survey_utils.methods.layers.hybrid import MixtureOfAdapters

    built = _built("tiny-bert", ADAMIX, share_up=False)
    mixtures = [m for m in built.modules() if isinstance(m, MixtureOfAdapters)]
    assert mixtures and all(len(m.adamix_down) == len(m.adamix_up) == 4 for m in mixtures)
    mixture = mixtures[0]
    with torch.no_grad():
        for p in mixture.parameters():
            p.normal_(std=0.1)  # the up-projections start at zero: make every expert different
    x = torch.randn(2, 5, mixture.adamix_down[0].weight.shape[1])
    mean = [torch.stack([getattr(e, name) for e in experts]).mean(0) for experts in
            (mixture.adamix_down, mixture.adamix_up) for name in ("weight", "bias")]
    expected = F.linear(mixture.act(F.linear(x, mean[0], mean[1])), mean[2], mean[3])
    mixture.eval()
    with torch.no_grad():
        assert torch.allclose(mixture(x), expected, atol=1e-6)
        mixture.train()  # training routes through one down and one up expert
        routed = mixture(x)
        singles = [e_up(mixture.act(e_down(x))) for e_down in mixture.adamix_down for e_up in mixture.adamix_up]
        assert any(torch.allclose(routed, single, atol=1e-6) for single in singles)
        assert not torch.allclose(routed, expected, atol=1e-4)


# --- ProPETL ------------------------------------------------------------------------------------------------------


def test_propetl_layers_share_one_prototype_and_store_bits() -> None:
    from survey_utils.methods.layers.hybrid import MaskedPrototype, stored_bytes

    config = load_config("tiny-bert")
    hp = PROPETL.resolve(config)
    built = _built("tiny-bert", PROPETL)
    layers = [m for m in built.modules() if isinstance(m, MaskedPrototype)]
    assert len(layers) > 1
    assert len({m.prototype.adapter_down.weight.untyped_storage().data_ptr() for m in layers}) == 1
    trainable = [p for p in built.parameters() if p.requires_grad]
    distinct = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in trainable}
    assert sum(distinct.values()) == PROPETL.trainable_params(config, **hp) * 4  # fp32: the prototype once
    assert stored_bytes(built) == propetl_stored_bytes(config, 4, **hp)
    n = layers[0].propetl_down_scores.numel()
    masks = [m.masks()[0] for m in layers]
    assert all(int(mask.sum()) == n - int(hp["sparsity"] * n) for mask in masks)
    assert not torch.equal(masks[0], masks[1])  # each layer selects its own sub-network


def test_propetl_scores_train_through_the_straight_through_mask() -> None:
    built = _built("tiny-bert", PROPETL)
    with torch.no_grad():  # the prototype's up-projection starts at zero: no gradient reaches the scores then
        for name, p in built.named_parameters():
            if "adapter_up" in name:
                p.normal_(std=0.1)
    built(**example_inputs(built.config)).logits.pow(2).mean().backward()
    scores = [p for name, p in built.named_parameters() if "propetl_" in name]
    assert scores and all(p.grad is not None and p.grad.abs().sum() > 0 for p in scores)


# --- SparseAdapter ------------------------------------------------------------------------------------------------


def test_sparse_adapter_keeps_only_its_kept_entries() -> None:
    """Each pruned weight holds ``n - int(s n)`` values at distinct positions; its dense form is non-zero only there
    (the down-projection: every kept entry, drawn from a default init) and its gradient reaches only those values."""
    from survey_utils.methods.layers.hybrid import SparseProjection

    built = _built("tiny-bert", SPARSE_ADAPTER)
    projections = [m for m in built.modules() if isinstance(m, SparseProjection)]
    sparsity = SPARSE_ADAPTER.defaults()["sparsity"]
    for projection in projections:
        n = projection.shape[0] * projection.shape[1]
        index = projection.sparse_index
        assert index.numel() == projection.sparse_values.numel() == sparse_kept(n, sparsity)
        assert index.unique().numel() == index.numel() and int(index.max()) < n
    down = projections[0]
    assert torch.count_nonzero(down.weight()) == down.sparse_values.numel()
    assert set(torch.nonzero(down.weight().flatten()).flatten().tolist()) == set(down.sparse_index.tolist())


def test_sparse_adapter_sparsity_trades_entries_for_width() -> None:
    """Large-Sparse: twice the width at half the density trains about as many parameters."""
    config = load_config("roberta-base")
    dense = SPARSE_ADAPTER.count(config, sparsity=0.0, bottleneck_size=48)
    large_sparse = SPARSE_ADAPTER.count(config, sparsity=0.5, bottleneck_size=96)
    assert dense == get_method("pfeiffer").count(config, bottleneck_size=48)
    assert math.isclose(large_sparse, dense, rel_tol=0.01)


# --- memory and bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", UNIFIED, ids=_ids(UNIFIED))
def test_memory_estimate_within_5_percent_of_simulation(method: Method, model: str) -> None:
    estimated = estimate(model, method, batch_size=2, seq_len=64, device="cpu").total
    simulated = simulate(model, method, batch_size=2, seq_len=64).peak
    assert abs(estimated / simulated - 1) < 0.05


@pytest.mark.parametrize(("method", "settings", "fragment"), [
    (SPARSE_ADAPTER, {"sparsity": 1.0}, r"sparsity=1.0 is above its maximum 0.99"),
    (ADAMIX, {"num_experts": 0}, r"num_experts=0 is below its minimum 1"),
    (PROPETL, {"reduction_factor": 1000.0}, r"reduction_factor=1000 leaves an empty bottleneck"),
    (ADAMIX, {"layers_to_transform": [40]}, r"layer 40 out of range"),
], ids=["sparsity", "experts", "empty-prototype", "layer"])
def test_bad_settings_are_one_line(method: Method, settings: dict[str, object], fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment) as info:
        method.resolve(load_config("roberta-base"), **settings)
    assert "\n" not in str(info.value)


def test_the_chapters_checks_hold() -> None:
    """Chapter 05 prints ``unified_checks``: each claim measured on real tensors equals its closed form."""
    from survey_utils.experiments.ch05_hybrid import unified_checks

    checks = unified_checks("tiny-bert")
    assert {c.method for c in checks} == {"propetl", "adamix", "sparse_adapter"}
    assert [c.claim for c in checks if not c.holds] == []
