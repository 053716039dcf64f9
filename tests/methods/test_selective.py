"""Selective methods (chapter 03): counts three ways, peft parity, one-line refusals, memory, untouched weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from survey_utils.architecture import layout
from survey_utils.counting import apply_method, closed_form, count, count_parameters, peft_model
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch03_selective import footprint, storage_formats, train_and_compare
from survey_utils.memory import estimate
from survey_utils.memory.simulate import simulate
from survey_utils.methods import get_method, list_methods
from survey_utils.parity import example_inputs, forward, parity
from survey_utils.zoo import build_model, load_config
from tests.conftest import TINY

SELECTIVE = [m.name for m in list_methods(family="selective")]
CASES = [("bitfit", {}), ("bitfit", {"bias_modules": ["value"]}), ("ln_tuning", {}), ("partial", {}),
         ("partial", {"top_k": 2, "components": "attention"}), ("partial", {"top_k": 1, "components": "mlp"}),
         ("partial", {"top_k": 2, "components": "cross_attention"})]


def test_the_family_is_registered() -> None:
    assert set(SELECTIVE) == {"bitfit", "ln_tuning", "partial"}
    for name in SELECTIVE:
        method = get_method(name)
        assert not method.adds_parameters and not method.trains_whole_model and method.unfrozen_params


@pytest.mark.parametrize("model", [*TINY, "roberta-base", "t5-base", "llama-2-7b"])
@pytest.mark.parametrize(("method", "hp"), CASES)
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
    for spec, name in chosen.unfrozen_params(config, **chosen.resolve(config, **hp)):
        by_component[spec.component] = by_component.get(spec.component, 0) + dict(spec.params)[name]
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
