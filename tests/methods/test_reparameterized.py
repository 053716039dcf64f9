"""The LoRA family beyond LoRA (DoRA, rsLoRA, AdaLoRA, VeRA, LoHa, LoKr, KronA) against peft and itself.

Parity: our layers and peft's, given the same non-zero adapter values, give the same outputs (float64,
tiny models). Identity at initialisation; merge == unmerged; unmerge restores the base weight; counts
where peft's convention needs pinning; one-line errors for bad values.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from survey_utils.counting import apply_method, closed_form, count, peft_model
from survey_utils.errors import SurveyError
from survey_utils.methods import get_method, merge, unmerge
from survey_utils.methods.layers import lowrank as _lowrank
from survey_utils.methods.layers.lowrank import DoRALinear
from survey_utils.parity import example_inputs, forward, parity, randomise_method_params
from survey_utils.zoo import build_model, load_config
from tests.conftest import TINY

FAMILY = ["dora", "rslora", "adalora", "vera", "loha", "lokr", "krona"]
PEFT_FAMILY = ["dora", "rslora", "adalora", "vera", "loha", "lokr"]
SMALL_HP = {
    "dora": {"r": 4, "lora_alpha": 12.0},
    "rslora": {"r": 4, "lora_alpha": 12.0},
    "adalora": {"init_r": 6, "target_r": 2, "lora_alpha": 4.0},
    "vera": {"r": 16, "d_initial": 0.2},
    "loha": {"r": 4, "alpha": 3.0},
    "lokr": {"r": 2, "alpha": 3.0},
    "krona": {"scale": 2.0},
}
LINEAR_ONLY = {"loha", "lokr"}


def _accepts(method: str, model: str) -> bool:
    return not (method in LINEAR_ONLY and model == "tiny-gpt2")


# --- parity with peft ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", PEFT_FAMILY)
def test_family_outputs_match_peft_with_equal_weights(method: str, model: str) -> None:
    if not _accepts(method, model):
        pytest.skip("peft's LoHa/LoKr adapt nn.Linear only; the refusal is tested below")
    report = parity(model, method, **SMALL_HP[method])
    assert report.copied_tensors > 0
    assert report.max_diff_vs_peft <= 1e-10, report
    assert report.max_diff_merged is not None and report.max_diff_merged <= 1e-10, report


@pytest.mark.parametrize("settings", [
    {"r": 2, "decompose_both": True},
    {"r": 2, "decompose_factor": 4},
    {"r": 64, "alpha": 5.0},  # r large against the factors: both Kronecker factors stored full
])
def test_lokr_factor_layouts_match_peft(settings: dict) -> None:
    report = parity("tiny-llama", "lokr", **settings)
    assert report.ok and report.max_diff_vs_peft <= 1e-10, report


def test_lokr_factorization_is_peft_s() -> None:
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in [1, 2, 7, 12, 64, 96, 128, 344, 768, 4096, 11008]:
        for factor in [-1, 0, 1, 3, 4, 16, 64]:
            assert _lowrank.factorization(dimension, factor) == peft_factorization(dimension, factor)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_vera_shared_projections_equal_peft_s(model: str) -> None:
    """Same seed, same order, same Kaiming bound: our frozen A and B are peft's, bit for bit."""
    ours = apply_method(build_model(model, dtype=torch.float64), "vera", r=16, projection_prng_key=7)
    theirs = peft_model(build_model(model, dtype=torch.float64), "vera", r=16, projection_prng_key=7)
    assert torch.equal(ours.vera_projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(ours.vera_projections.vera_B, theirs.base_model.vera_B["default"])
    assert not any("vera_A" in name or "vera_B" in name for name, _ in ours.named_parameters())


def test_dora_gradients_match_peft() -> None:
    """The detached norm: magnitude and factors get peft's gradients."""
    method = get_method("dora")
    ours = apply_method(build_model("tiny-gpt2", dtype=torch.float64), method, r=4)
    theirs = peft_model(build_model("tiny-gpt2", dtype=torch.float64), method, r=4)
    randomise_method_params(ours, method)
    from survey_utils.parity import copy_into_peft

    copy_into_peft(ours, theirs, method)
    inputs = example_inputs(ours.config)
    for m in (ours, theirs):
        m(**inputs).logits.pow(2).mean().backward()
    their_params = dict(theirs.named_parameters())
    mapping = method.peft_param_map
    checked = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            module, _, leaf = name.rpartition(".")
            other = their_params[f"base_model.model.{module}.{mapping[leaf]}"]
            assert torch.allclose(p.grad, other.grad.reshape(p.shape), rtol=1e-9, atol=1e-12), name
            checked += 1
    assert checked == 3 * 4  # A, B, magnitude on c_attn of 4 blocks


def test_rank_allocator_masks_the_same_triplets_as_peft() -> None:
    """Same weights, same gradients, same schedule: our RankAllocator prunes peft's triplets."""
    method = get_method("adalora")
    hp = {"init_r": 6, "target_r": 2, "total_step": 6, "tinit": 1, "tfinal": 1, "beta1": 0.7, "beta2": 0.8}
    ours = apply_method(build_model("tiny-llama", dtype=torch.float64), method, **hp)
    theirs = peft_model(build_model("tiny-llama", dtype=torch.float64), method, **hp)
    randomise_method_params(ours, method, std=0.3)
    from survey_utils.parity import copy_into_peft

    copy_into_peft(ours, theirs, method)
    inputs = example_inputs(ours.config)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    masked_at_some_step = False
    for step in range(1, 7):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(**inputs).logits.pow(2).mean().backward()
            opt.step()
        budget = ours.rank_allocator.update_and_allocate(step)
        theirs.base_model.update_and_allocate(step)
        for name, layer in ours.rank_allocator.layers.items():
            their_e = theirs.get_submodule(f"base_model.model.{name}").lora_E["default"]
            assert torch.equal(layer.lora_E == 0, their_e == 0), (step, name)
        ranks = ours.rank_allocator.ranks()
        masked_at_some_step |= sum(ranks.values()) < 6 * len(ranks)
        if step > 1:
            assert sum(ranks.values()) <= budget
    assert masked_at_some_step
    assert sum(ours.rank_allocator.ranks().values()) <= 2 * len(ours.rank_allocator.layers)


# --- counts where peft's convention needs pinning --------------------------------------------------------

def test_adalora_counts_pinned_against_peft() -> None:
    """peft counts P, Q and lambda at init_r (pruned triplets stay allocated), plus one frozen ranknum each.

    On a real device peft's trainable count is ours. Built on meta (how counting runs) peft's device move
    turns ranknum trainable: one more per layer. ``Method.peft_fixup`` undoes that for counting.
    """
    hp = {"init_r": 12, "target_r": 8}
    layers = 2 * 4  # q_proj and v_proj of 4 blocks; d_in = 128, d_out = 128 and 64
    ours = closed_form("tiny-llama", "adalora", **hp)
    assert ours.trainable == 12 * ((128 + 128 + 1) + (128 + 64 + 1)) * 4 == 21_600
    real = peft_model(build_model("tiny-llama", device="cpu"), "adalora", **hp).get_nb_trainable_parameters()
    assert real == (ours.trainable, ours.total)
    import peft

    method = get_method("adalora")
    raw = peft.get_peft_model(build_model("tiny-llama", device="meta"),
                              method.peft_config(load_config("tiny-llama"), **method.resolve(**hp)))
    assert raw.get_nb_trainable_parameters() == (ours.trainable + layers, ours.total)
    assert count("tiny-llama", "adalora", "peft", **hp).trainable == ours.trainable
    from survey_utils.methods.reparameterized import adalora_effective_params

    assert adalora_effective_params(load_config("tiny-llama"), **method.resolve(**hp)) == 14_400


def test_vera_count_excludes_the_shared_buffers() -> None:
    """peft and we store A and B as buffers: r (max d_in + max d_out) numbers not in any count."""
    from survey_utils.methods.reparameterized import vera_projection_numel

    config = load_config("llama-2-7b")
    hp = get_method("vera").resolve(config, r=256, target_modules=["q_proj", "v_proj"])
    assert closed_form(config, "vera", **hp).trainable == 64 * (4096 + 256) == 278_528
    assert count(config, "vera", "peft", **hp).trainable == 278_528
    assert vera_projection_numel(config, **hp) == 256 * (4096 + 4096)


@pytest.mark.parametrize("method", FAMILY)
def test_llama_2_7b_q_v_r8_counts_agree_three_ways(method: str) -> None:
    rank = {"adalora": {"init_r": 8, "target_r": 8}, "krona": {}}.get(method, {"r": 8})
    hp = {"target_modules": ["q_proj", "v_proj"], **rank}
    formula = closed_form("llama-2-7b", method, **hp)
    assert count("llama-2-7b", method, "scratch", **hp).trainable == formula.trainable
    if get_method(method).peft_config is not None:
        assert count("llama-2-7b", method, "peft", **hp).trainable == formula.trainable


# --- from-scratch behaviour ----------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-t5"])
@pytest.mark.parametrize("method", FAMILY)
def test_family_is_the_identity_at_initialisation(method: str, model: str) -> None:
    if not _accepts(method, model):
        pytest.skip("linear layers only")
    config = load_config(model)
    inputs = example_inputs(config)
    base = forward(build_model(config, seed=0, dtype=torch.float64), inputs)
    adapted = forward(apply_method(build_model(config, seed=0, dtype=torch.float64), method,
                                   **SMALL_HP[method]), inputs)
    assert torch.allclose(base, adapted, atol=1e-12)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("method", FAMILY)
def test_family_merges_and_unmerges(method: str, model: str) -> None:
    if not _accepts(method, model):
        pytest.skip("linear layers only")
    spec = get_method(method)
    assert spec.mergeable
    adapted = apply_method(build_model(model, dtype=torch.float64), spec, **SMALL_HP[method])
    randomise_method_params(adapted, spec, std=0.2)
    weights = {n: p.clone() for n, p in adapted.named_parameters() if "base_layer" in n}
    inputs = example_inputs(adapted.config)
    unmerged = forward(adapted, inputs)
    merged = forward(merge(adapted), inputs)
    changed = any(not torch.equal(weights[n], p) for n, p in adapted.named_parameters() if n in weights)
    assert changed and torch.allclose(unmerged, merged, atol=1e-9)
    unmerge(adapted)
    for name, p in adapted.named_parameters():
        if name in weights:
            assert torch.allclose(weights[name], p, atol=1e-12), name
    assert torch.allclose(forward(adapted, inputs), unmerged, atol=1e-12)


@pytest.mark.parametrize("method", FAMILY)
def test_only_the_method_parameters_train(method: str) -> None:
    adapted = apply_method(build_model("tiny-llama"), method, **SMALL_HP[method])
    prefixes = get_method(method).param_prefixes
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(any(prefix in n for prefix in prefixes) for n in trainable)


@pytest.mark.parametrize("method", FAMILY)
def test_family_builds_under_fake_tensors(method: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        adapted = apply_method(build_model("tiny-llama", device="cpu"), method, **SMALL_HP[method])
        inputs = {"input_ids": torch.zeros((1, 4), dtype=torch.long)}
        assert adapted(**inputs).logits.shape == (1, 4, 8192)


def test_krona_factored_product_equals_the_kronecker_matrix() -> None:
    layer = _lowrank.KronALinear(nn.Linear(96, 344, dtype=torch.float64), krona_factor=-1, scale=1.5)
    nn.init.normal_(layer.krona_B)
    assert layer.krona_A.shape == (8, 8) and layer.krona_B.shape == (43, 12)
    x = torch.randn(2, 5, 96, dtype=torch.float64)
    assert torch.allclose(layer.delta_output(x), x @ layer.delta_weight().T, atol=1e-12)


def test_dora_magnitude_starts_at_the_row_norms() -> None:
    base = nn.Linear(16, 8)
    layer = DoRALinear(base, r=2, lora_alpha=2.0)
    assert torch.allclose(layer.lora_magnitude, base.weight.norm(dim=1))
    assert not layer.weight_norm().requires_grad


def test_loha_and_lokr_reach_higher_rank_than_lora_per_parameter() -> None:
    """LoHa: two rank-2 products, Hadamard, rank 4. LoKr: full 8x8 W1 kron rank-2 W2, rank 16 (LoRA r=2: 2)."""
    base = nn.Linear(64, 64, dtype=torch.float64)
    loha = _lowrank.LoHaLinear(base, r=2, alpha=2.0)
    nn.init.normal_(loha.hada_w2_b)
    assert torch.linalg.matrix_rank(loha.delta_weight()) == 4
    lokr = _lowrank.LoKrLinear(nn.Linear(64, 64, dtype=torch.float64), r=2, alpha=2.0)
    nn.init.normal_(lokr.lokr_w1)
    assert torch.linalg.matrix_rank(lokr.delta_weight()) == 8 * 2  # rank(W1) * rank(W2), from 96 numbers


# --- errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "hp", "fragment"), [
    ("loha", {}, "conv1d"),
    ("lokr", {}, "conv1d"),
])
def test_linear_only_methods_refuse_gpt2(method: str, hp: dict, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment) as info:
        closed_form("tiny-gpt2", method, **hp)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("method", "hp", "fragment"), [
    ("adalora", {"beta1": 1.0}, "beta1=1.0"),
    ("adalora", {"target_r": 16, "init_r": 12}, "target_r=16"),
    ("adalora", {"tinit": 10, "tfinal": 5, "total_step": 15}, "tinit=10"),
    ("dora", {"r": 0}, "r=0"),
    ("vera", {"target_modules": ["nonexistent"]}, "nonexistent"),
    ("krona", {"layers_pattern": "layers"}, "layers_pattern"),
    ("lokr", {"decompose_factor": -3}, "decompose_factor=-3"),
])
def test_bad_values_raise_one_line_errors(method: str, hp: dict, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment) as info:
        closed_form("tiny-llama", method, **hp)
    assert "\n" not in str(info.value)


# --- memory terms ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "hp"), [("dora", {"r": 8}), ("vera", {"r": 64}), ("loha", {"r": 8}),
                                            ("lokr", {"r": 8}), ("adalora", {"init_r": 8, "target_r": 8}),
                                            ("krona", {})])
def test_family_memory_estimate_is_within_one_percent_of_the_simulated_step(method: str, hp: dict) -> None:
    """DoRA's two d_out-wide saved tensors are 2.4% of this step: leaving them out would fail the check."""
    from survey_utils.memory.closed_form import estimate
    from survey_utils.memory.simulation import simulate

    est = estimate("tiny-llama", method, hp=hp, batch_size=2, seq_len=256)
    sim = simulate("tiny-llama", method, hp=hp, batch_size=2, seq_len=256)
    assert any(k.startswith("method: ") for k in est.activations_by_term)
    assert abs(est.total - sim.peak) <= 0.01 * sim.peak
