"""Selective methods (chapter 03): counts three ways, peft parity, one-line refusals, memory, untouched weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from survey_utils.architecture import layout
from survey_utils.counting import (
    apply_method,
    changed_params,
    closed_form,
    count,
    count_parameters,
    peft_model,
)
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch03_selective import footprint, storage_formats, train_and_compare
from survey_utils.memory import estimate
from survey_utils.memory.simulation import simulate
from survey_utils.methods import get_method, list_methods
from survey_utils.parity import example_inputs, forward, parity
from survey_utils.zoo import build_model, load_config
from tests.conftest import TINY

SELECTIVE = [m.name for m in list_methods(family="selective")]
CASES = [("bitfit", {}), ("bitfit", {"bias_modules": ["value"]}), ("ln_tuning", {}), ("partial", {}),
         ("partial", {"top_k": 2, "components": "attention"}), ("partial", {"top_k": 1, "components": "mlp"}),
         ("partial", {"top_k": 2, "components": "cross_attention"})]


SPARSE_CASES = [("fish_mask", {}), ("fish_mask", {"density": 0.1, "target_modules": ["q_proj", "v_proj", "query",
                                                                                   "value", "c_attn", "q", "v"]}),
                ("lt_sft", {}), ("child_tuning", {"variant": "F"}), ("child_tuning", {"reserve_p": 1.0})]


def test_the_family_is_registered() -> None:
    assert set(SELECTIVE) == {"bitfit", "ln_tuning", "partial", "fish_mask", "lt_sft", "child_tuning", "diff_pruning"}
    for name in SELECTIVE:
        method = get_method(name)
        assert not method.trains_whole_model
        assert method.adds_parameters == (method.unfrozen_params is None)  # diff pruning adds; the others unfreeze


@pytest.mark.parametrize("model", [*TINY, "roberta-base", "t5-base", "llama-2-7b"])
@pytest.mark.parametrize(("method", "hp"), CASES + SPARSE_CASES)
def test_formula_equals_built_model_by_component(model: str, method: str, hp: dict) -> None:
    """The closed form, the layout's selection split by component, and the model built on meta agree."""
    config = load_config(model)
    chosen = get_method(method)
    try:
        formula = closed_form(config, chosen, **hp)
    except SurveyError:
        with pytest.raises(SurveyError):
            apply_method(build_model(model, device="meta"), chosen, **hp)
        return
    built = count_parameters(apply_method(build_model(model, device="meta"), chosen, **hp))
    assert (formula.trainable, formula.total) == (built.trainable, built.total)
    by_component: dict[str, int] = {}
    resolved = chosen.resolve(config, **hp)
    for spec, name in chosen.unfrozen_params(config, **resolved):
        n = dict(spec.params)[name]
        kept = chosen.mask_kept(n, **resolved) if chosen.mask_kept else n
        by_component[spec.component] = by_component.get(spec.component, 0) + kept
    assert by_component == {c: t for c, (t, _) in built.by_component.items() if t}


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "roberta-base",
                                   "bloom-560m", "qwen2.5-0.5b", "opt-350m", "llama-2-7b"])
def test_ln_tuning_counts_equal_pefts(model: str) -> None:
    """Trainable equal; peft's total is ours plus the frozen originals it keeps beside its trainable copies."""
    config = load_config(model)
    ours = closed_form(config, "ln_tuning")
    theirs = count(model, "ln_tuning", implementation="peft")
    method = get_method("ln_tuning")
    assert theirs.trainable == ours.trainable
    assert theirs.total == ours.total + method.peft_frozen_copies(config, **method.resolve(config))


@pytest.mark.parametrize("model", TINY)
def test_ln_tuning_output_parity_with_peft(model: str) -> None:
    report = parity(model, "ln_tuning")
    assert report.ok and report.copied_tensors > 0, report


def test_ln_tuning_defaults_are_pefts() -> None:
    """peft's LNTuningConfig has no default targets of its own: ours are its per-architecture mapping."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as PEFT

    from survey_utils.methods.selective import PEFT_LN_TARGETS

    assert all(PEFT[family] == targets for family, targets in PEFT_LN_TARGETS.items())
    assert get_method("ln_tuning").defaults() == {"target_modules": None}


def test_bitfit_on_value_biases_matches_pefts_beft() -> None:
    """peft's BEFT adds a zero-started bias vector to its targets (BERT: the value projection); training it is
    training the value bias itself: same count, and the same outputs when our bias = base bias + BEFT's vector."""
    from peft import BeftConfig

    model = "tiny-bert"
    config = load_config(model)
    ours = apply_method(build_model(config, device="cpu", seed=0, dtype=torch.float64), "bitfit",
                        bias_modules=["value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft

        theirs = peft.get_peft_model(build_model(config, device="cpu", seed=0, dtype=torch.float64), BeftConfig())
    assert theirs.get_nb_trainable_parameters()[0] == closed_form(config, "bitfit", bias_modules=["value"]).trainable
    generator = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, vector in theirs.named_parameters():
            if ".beft_bias.default" in name:
                vector.copy_(torch.randn(vector.shape, generator=generator, dtype=vector.dtype) * 0.05)
                bias = name.removeprefix("base_model.model.").replace(".beft_bias.default", ".bias")
                mine[bias].add_(vector.flatten())
    inputs = example_inputs(config)
    ours.eval()
    theirs.eval()
    assert (forward(ours, inputs) - forward(theirs, inputs)).abs().max().item() < 1e-10


@pytest.mark.parametrize(("model", "method", "hp", "fragment"), [
    ("tiny-llama", "bitfit", {}, "tiny-llama has no bias parameter"),
    ("tiny-t5", "bitfit", {}, "has no bias parameter"),
    ("tiny-bert", "bitfit", {"bias_modules": ["nonexistent"]}, "target module 'nonexistent' not found"),
    ("tiny-gpt2", "partial", {"top_k": 5}, "top_k=5 is more than the 4 blocks of tiny-gpt2"),
    ("tiny-llama", "partial", {"components": "cross_attention"}, "components='cross_attention'"),
    ("tiny-llama", "partial", {"components": "ffn"}, "components='ffn' is not one of"),
    ("tiny-llama", "partial", {"top_k": 0}, "top_k=0 is below its minimum 1"),
    ("tiny-t5", "partial", {"top_k": 5, "components": "cross_attention"}, "top_k=5 is more than the 4 blocks with"),
    ("tiny-bert", "ln_tuning", {"target_modules": ["query"]}, "adapts norm modules"),
])
def test_bad_input_is_one_line_naming_the_value(model: str, method: str, hp: dict, fragment: str) -> None:
    with pytest.raises(SurveyError) as info:
        closed_form(model, method, **hp)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_ln_tuning_refuses_norms_without_parameters() -> None:
    config = copy.deepcopy(load_config("opt-350m", full=True))
    config.layer_norm_elementwise_affine = False
    with pytest.raises(SurveyError, match="have no parameters"):
        closed_form(config, "ln_tuning")


def test_gradient_sites() -> None:
    """BERT's embedding LayerNorm bias trains under BitFit: gradients reach the input. Partial tuning of the top
    block starts there: the blocks below save nothing."""
    bitfit = get_method("bitfit")
    assert bitfit.gradient_sites(load_config("tiny-bert"), bias_modules=None) == "input"
    config = load_config("llama-2-7b")
    sites = get_method("partial").gradient_sites(config, top_k=1, components="block")
    assert {s.layer for s in sites} == {31}
    top = estimate("llama-2-7b", "partial", {"top_k": 1}, seq_len=2048)
    assert any("gradients start at block 31" in line for line in top.assumptions)


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-bert", "bitfit", {}), ("tiny-gpt2", "bitfit", {"bias_modules": ["c_attn"]}),
    ("tiny-llama", "ln_tuning", {}), ("tiny-t5", "ln_tuning", {}), ("tiny-bert", "ln_tuning", {}),
    ("tiny-llama", "partial", {"top_k": 4}), ("tiny-gpt2", "partial", {"top_k": 2, "components": "attention"}),
    ("tiny-bert", "partial", {}), ("tiny-t5", "partial", {"top_k": 2, "components": "cross_attention"}),
    ("tiny-t5", "partial", {"top_k": 2, "components": "mlp"}),
])
def test_estimate_within_five_percent_of_the_simulation(model: str, method: str, hp: dict) -> None:
    est = estimate(model, method, hp, batch_size=2, seq_len=128, device="cpu")
    sim = simulate(model, method, hp, batch_size=2, seq_len=128)
    assert abs(est.total - sim.peak) / sim.peak < 0.05


def test_partial_keeps_the_inputs_of_its_trained_linears() -> None:
    """Trained weights need their inputs for the weight gradient: more saved than LoRA on the same blocks."""
    partial = estimate("llama-2-7b", "partial", {"top_k": 8}, seq_len=1024)
    # per block: the q/k/v input once, the gate/up input once, down_proj's input (o_proj's is the kernel's output)
    assert partial.activations_by_term["method: inputs of trained linears"] == 8 * 2 * 1024 * (4096 * 2 + 11008)


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-bert", "bitfit", {}), ("tiny-llama", "ln_tuning", {}), ("tiny-gpt2", "partial", {"top_k": 1}),
    ("tiny-t5", "partial", {"top_k": 2, "components": "cross_attention"}),
])
def test_untouched_parameters_stay_bit_identical(model: str, method: str, hp: dict) -> None:
    report = train_and_compare(model, method, steps=2, **hp)
    assert report.frozen_identical
    assert report.frozen + report.trained == report.total
    assert 0.99 * report.trained <= report.changed <= report.trained


def test_storage_picks_the_smallest_format() -> None:
    formats = storage_formats(trained=10, changed=10, total=10**6, adds_parameters=False, dtype="bf16")
    assert min(formats, key=formats.get) == "changed tensors" and formats["changed tensors"] == 20
    sparse = storage_formats(trained=2 * 10**6, changed=5000, total=10**6, adds_parameters=True, dtype="fp32")
    assert sparse["bitmask + values"] == 125_000 + 20_000 and sparse["COO"] == 40_000
    lora = footprint("roberta-base", "lora")
    assert lora.best[0] == "method's parameters" and lora.changed > 40 * lora.trained
    bitfit = footprint("roberta-base", "bitfit")
    assert bitfit.changed == bitfit.trained and bitfit.best == ("changed tensors", 2 * bitfit.trained)
    assert layout(load_config("roberta-base")).total == bitfit.total


def test_peft_model_wraps_ln_tuning_on_meta() -> None:
    wrapped = peft_model(build_model("tiny-llama", device="meta"), "ln_tuning")
    assert wrapped.get_nb_trainable_parameters()[0] == closed_form("tiny-llama", "ln_tuning").trainable


# --- sparse methods: masks, diff pruning -------------------------------------------------------------------

@pytest.mark.parametrize(("model", "method", "hp", "fragment"), [
    ("tiny-llama", "fish_mask", {"density": 0.0}, "density=0.0 must be in (0, 1]"),
    ("tiny-llama", "fish_mask", {"density": 1.5}, "density=1.5 is above its maximum 1"),
    ("tiny-llama", "lt_sft", {"density": -0.1}, "density=-0.1 must be in (0, 1]"),
    ("tiny-llama", "child_tuning", {"reserve_p": 0.0}, "density=0.0 must be in (0, 1]"),
    ("tiny-llama", "child_tuning", {"variant": "E"}, "variant='E' is not one of F, D"),
    ("tiny-llama", "diff_pruning", {"density": 2.0}, "density=2.0 is above its maximum 1"),
    ("tiny-llama", "diff_pruning", {"target_modules": ["query"]}, "target module 'query' not found"),
    ("tiny-bert", "fish_mask", {"target_modules": ["q_proj"]}, "target module 'q_proj' not found"),
    ("tiny-llama", "fish_mask", {"density": 1e-9}, "density=1e-09 keeps no entry"),
])
def test_sparse_bad_input_is_one_line(model: str, method: str, hp: dict, fragment: str) -> None:
    with pytest.raises(SurveyError) as info:
        closed_form(model, method, **hp)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_mask_counts_are_the_mask_entries_rounded_down() -> None:
    """k = int(density * n) per weight: the closed form is this sum, the built model holds indices that long."""
    config = load_config("tiny-llama")
    density = 0.013
    expected = sum(int(density * m.in_features * m.out_features) for m in layout(config).modules
                   if m.kind == "linear" and m.layer is not None)
    assert closed_form(config, "fish_mask", density=density).trainable == expected
    built = apply_method(build_model("tiny-llama", device="cpu", dtype=torch.float32), "fish_mask", density=density,
                         num_samples=2)
    indices = [b for n, b in built.named_buffers() if n.endswith("_mask_index")]
    assert sum(i.numel() for i in indices) == expected == count_parameters(built).trainable
    assert all(i.unique().numel() == i.numel() for i in indices)


def test_fish_mask_keeps_the_largest_fisher_entries() -> None:
    from survey_utils.methods.layers.selective import fisher_scores, random_batches

    model = build_model("tiny-gpt2", device="cpu", dtype=torch.float32)
    reference = copy.deepcopy(model)
    batches = random_batches(model.config, 3)
    apply_method(model, "fish_mask", density=0.02, target_modules=["c_fc"], num_samples=3)
    name = "transformer.h.1.mlp.c_fc.weight"
    score = fisher_scores(reference, [reference.get_parameter(name)], batches)[0].flatten()
    index = model.get_buffer("transformer.h.1.mlp.c_fc.weight_mask_index")
    assert score[index].min() >= score.topk(index.numel()).values.min()


def test_lt_sft_rewinds_to_the_pretrained_values() -> None:
    model = build_model("tiny-llama", device="cpu", dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_method(model, "lt_sft", full_ft_steps=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert count_parameters(model).trainable == closed_form("tiny-llama", "lt_sft").trainable


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-llama", "fish_mask", {"density": 0.05, "num_samples": 2}), ("tiny-gpt2", "lt_sft", {"full_ft_steps": 2}),
    ("tiny-bert", "child_tuning", {"num_samples": 2}), ("tiny-t5", "fish_mask", {"num_samples": 2}),
])
def test_masked_entries_and_frozen_weights_stay_bit_identical(model: str, method: str, hp: dict) -> None:
    report = train_and_compare(model, method, steps=2, **hp)
    assert report.frozen_identical
    assert report.trained == closed_form(model, method, **hp).trainable
    assert 0.98 * report.trained <= report.changed <= report.trained


def test_child_tuning_f_redraws_its_mask_every_step() -> None:
    """Child-tuning_F: k entries per step, a new draw each step: after two steps more than k have moved."""
    report = train_and_compare("tiny-llama", "child_tuning", steps=2, variant="F", reserve_p=0.1)
    assert report.trained == closed_form("tiny-llama", "child_tuning", variant="F", reserve_p=0.1).trainable
    assert 1.5 * report.trained < report.changed <= 2 * report.trained


def test_diff_pruning_trains_twice_the_targets_and_changes_the_pruned_delta() -> None:
    """Trained: a dense delta and a gate per weight; after pruning to the density, merging changes that many."""
    from survey_utils.memory.simulation import make_batch
    from survey_utils.methods.common import merge
    from survey_utils.methods.layers.selective import l0_penalty, prune_diff

    config = load_config("tiny-llama")
    model = build_model(config, device="cpu", dtype=torch.float32)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_method(model, "diff_pruning")  # density 0.005, the paper's 0.5%
    targets = sum(m.in_features * m.out_features for m in layout(config).modules
                  if m.kind == "linear" and m.layer is not None)
    assert count_parameters(model).trainable == 2 * targets == closed_form(config, "diff_pruning").trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(2):
        loss = model(**make_batch(load_config("tiny-llama", full=True), 2, 16, "cpu")).loss + 1e-6 * l0_penalty(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    kept = prune_diff(model)
    assert kept == sum(int(0.005 * m.in_features * m.out_features) for m in layout(config).modules
                       if m.kind == "linear" and m.layer is not None)
    assert count_parameters(model).trainable == kept  # the fixed-mask phase trains the kept entries only
    model.eval()
    merge(model)
    after = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if "diff_" not in n}
    assert sum(int((after[n] != w).sum()) for n, w in weights.items()) == kept
    assert count("tiny-llama", "diff_pruning").trainable == 2 * targets
    assert changed_params("tiny-llama", "diff_pruning")[0] == kept


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-llama", "fish_mask", {}), ("tiny-gpt2", "lt_sft", {}), ("tiny-bert", "child_tuning", {"variant": "F"}),
    ("tiny-t5", "child_tuning", {}), ("tiny-llama", "diff_pruning", {}), ("tiny-gpt2", "diff_pruning", {}),
    ("tiny-bert", "diff_pruning", {}), ("tiny-t5", "diff_pruning", {"target_modules": ["q", "v"]}),
])
def test_sparse_estimate_within_five_percent_of_the_simulation(model: str, method: str, hp: dict) -> None:
    """Masked weights hold dense gradients and AdamW states; diff pruning holds weights, a dense delta and gate,
    and their AdamW states: the estimate says so and agrees with the fake-tensor step."""
    est = estimate(model, method, hp, batch_size=2, seq_len=128, device="cpu")
    sim = simulate(model, method, hp, batch_size=2, seq_len=128)
    assert abs(est.total - sim.peak) / sim.peak < 0.05


def test_a_mask_keeps_dense_gradients_and_states() -> None:
    fish = estimate("llama-2-7b", "fish_mask", seq_len=512)
    partial = estimate("llama-2-7b", "partial", {"top_k": 32}, seq_len=512)
    assert fish.trainable_params < partial.trainable_params / 100
    assert fish.gradients == partial.gradients - 2 * 32 * 2 * 4096  # every block linear; partial adds the norms
    diff = estimate("llama-2-7b", "diff_pruning", seq_len=512)
    assert diff.optimizer_states == 2 * diff.gradients and diff.trainable_params == 2 * fish.gradients // 2


def test_sparse_footprints() -> None:
    fish = footprint("roberta-base", "fish_mask")
    assert fish.changed == fish.trained and fish.best[0] == "COO"
    diff = footprint("roberta-base", "diff_pruning")
    assert diff.trained > 200 * diff.changed and diff.best[0] == "COO"
    assert diff.changed == fish.changed  # the same density of the same weights
