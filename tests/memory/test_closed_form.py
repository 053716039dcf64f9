"""The closed-form memory estimate: its terms, its errors, and its agreement with the simulation."""

from __future__ import annotations

import pytest

from survey_utils.architecture import total_params
from survey_utils.errors import SurveyError
from survey_utils.memory import estimate, simulate
from survey_utils.memory.closed_form import NF4_BYTES_PER_WEIGHT
from survey_utils.methods import list_methods
from survey_utils.zoo import list_models, load_config


def test_weights_gradients_and_adam_states_of_full_fine_tuning() -> None:
    n = total_params(load_config("tiny-llama"))
    result = estimate("tiny-llama", "full", dtype="fp32", optimizer="adamw")
    assert result.weights == 4 * n
    assert result.gradients == 4 * n
    assert result.optimizer_states == 8 * n
    sgd = estimate("tiny-llama", "full", dtype="fp32", optimizer="sgd")
    assert sgd.optimizer_states == 4 * n


def test_lora_trains_little_but_keeps_activations() -> None:
    full = estimate("llama-2-7b", "full", batch_size=4, seq_len=2048)
    lora = estimate("llama-2-7b", "lora", batch_size=4, seq_len=2048)
    assert lora.gradients < full.gradients / 100
    # parameter-efficient is not memory-efficient: LoRA's activations are most of full fine-tuning's
    assert lora.activations > 0.7 * full.activations


def test_fp16_adapters_need_fp32_master_copies() -> None:
    result = estimate("tiny-llama", "lora", dtype="fp16")
    assert result.master_weights == 4 * result.trainable_params
    assert estimate("tiny-llama", "lora", dtype="bf16").master_weights == 0


def test_nf4_shrinks_the_block_linears() -> None:
    config = load_config("llama-2-7b")
    plain = estimate(config, "lora")
    nf4 = estimate(config, "lora", quantization="nf4")
    int8 = estimate(config, "lora", quantization="int8")
    assert nf4.weights < int8.weights < plain.weights
    assert nf4.weights_by_dtype["nf4"] / (plain.weights_by_dtype["bf16"] / 2) < NF4_BYTES_PER_WEIGHT
    assert any("NF4" in line for line in nf4.assumptions)


def test_checkpointing_and_attention_kernel_change_activations() -> None:
    base = estimate("llama-2-7b", "lora", seq_len=4096)
    assert estimate("llama-2-7b", "lora", seq_len=4096, gradient_checkpointing=True).activations < base.activations / 5
    eager = estimate("llama-2-7b", "lora", seq_len=4096, attention="eager")
    assert eager.activations > 2 * base.activations  # the s^2 softmax


def test_terms_add_up_to_the_total_and_grow_with_the_batch() -> None:
    small = estimate("llama-2-13b", "lora", batch_size=1)
    big = estimate("llama-2-13b", "lora", batch_size=8)
    assert sum(small.terms().values()) == small.total
    assert big.total > small.total
    assert big.activations == pytest.approx(8 * small.activations, rel=0.01)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch_size=0"),
    ({"seq_len": 100_000}, "seq_len=100000"),
    ({"optimizer": "lion"}, "optimizer 'lion'"),
    ({"dtype": "fp8"}, "dtype 'fp8'"),
    ({"quantization": "nf2"}, "quantization 'nf2'"),
])
def test_bad_settings_raise_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SurveyError, match=message):
        estimate("tiny-llama", "lora", **kwargs)


def test_full_fine_tuning_cannot_be_quantized() -> None:
    with pytest.raises(SurveyError, match="quantization"):
        estimate("tiny-llama", "full", quantization="nf4")


@pytest.mark.parametrize("method", list_methods(), ids=lambda m: m.name)
def test_every_registered_method_has_an_estimate(method) -> None:
    try:
        result = estimate("tiny-llama", method, seq_len=64)
    except SurveyError:
        pytest.skip(f"{method.name} does not apply to tiny-llama")
    assert result.total > result.weights > 0
    assert result.assumptions


@pytest.mark.parametrize(("method", "settings"), [
    ("lora", {}),
    ("full", {}),
    ("lora", {"attention": "eager", "batch_size": 2, "seq_len": 128}),
    ("lora", {"gradient_checkpointing": True}),
    ("full", {"dtype": "fp32", "optimizer": "sgd"}),
])
def test_estimate_within_five_percent_of_the_simulation(method: str, settings: dict) -> None:
    est = estimate("tiny-llama", method, **settings)
    sim = simulate("tiny-llama", method, **settings)
    assert abs(est.total - sim.peak) / sim.peak < 0.05


@pytest.mark.parametrize(("model", "method", "settings"), [
    ("tiny-gpt2", "lora", {}),
    ("tiny-gpt2", "full", {"gradient_checkpointing": True}),
    ("tiny-bert", "full", {}),
    ("tiny-bert", "lora", {"gradient_checkpointing": True}),
    ("tiny-t5", "lora", {}),
    ("tiny-gpt2", "pfeiffer", {}),
    ("tiny-llama", "adapterdrop", {"hp": {"drop_layers": 2}}),
    ("tiny-llama", "lora", {"hp": {"layers_to_transform": [2, 3]}}),
    ("tiny-llama", "prefix_tuning", {}),
    ("tiny-llama", "llama_adapter", {"hp": {"adapter_layers": 2}}),
])
def test_cpu_estimate_within_five_percent_of_the_simulation_across_families(model: str, method: str,
                                                                          settings: dict) -> None:
    hp = settings.pop("hp", {})
    kwargs = dict(batch_size=2, seq_len=128, **settings)
    est = estimate(model, method, hp, device="cpu", **kwargs)
    sim = simulate(model, method, hp, **kwargs)
    assert abs(est.total - sim.peak) / sim.peak < 0.05


def test_blocks_below_the_lowest_trainable_module_save_nothing() -> None:
    everywhere = estimate("llama-2-7b", "lora", seq_len=2048)
    top_half = estimate("llama-2-7b", "lora", {"layers_to_transform": list(range(16, 32))}, seq_len=2048)
    assert top_half.activations < 0.55 * everywhere.activations
    dropped = estimate("llama-2-7b", "adapterdrop", {"drop_layers": 16}, seq_len=2048)
    assert dropped.activations < 0.55 * estimate("llama-2-7b", "pfeiffer", seq_len=2048).activations
    assert any("gradients start at block 16" in line for line in dropped.assumptions)
    assert estimate("llama-2-7b", "lst", seq_len=2048).activations < everywhere.activations / 5  # side net only


def test_prefix_positions_are_keys_and_values_only() -> None:
    prompt = estimate("llama-2-7b", "prompt_tuning", {"num_virtual_tokens": 64}, seq_len=512)
    prefix = estimate("llama-2-7b", "prefix_tuning", {"num_virtual_tokens": 64}, seq_len=512)
    plain = estimate("llama-2-7b", "lora", seq_len=512)
    # prompt tuning lengthens everything, logits included; prefixes lengthen only keys and values
    assert prompt.loss_transient > prefix.loss_transient == plain.loss_transient
    assert prompt.activations > prefix.activations
    assert any("queries, MLP, norms and logits stay at 512" in line for line in prefix.assumptions)


def test_device_changes_the_kernels_not_the_llama_block() -> None:
    cpu = estimate("gpt2", "lora", seq_len=1024, device="cpu")
    cuda = estimate("gpt2", "lora", seq_len=1024, device="cuda")
    assert cpu.activations > cuda.activations  # CPU math path keeps three fp32 s^2 tensors per layer
    assert any("math path" in line for line in cpu.assumptions)
    assert any("device CUDA" in line for line in cuda.assumptions)
    assert (estimate("tiny-llama", "lora", device="cpu").activations
            == estimate("tiny-llama", "lora", device="cuda").activations)
    with pytest.raises(SurveyError, match="device 'tpu'"):
        estimate("tiny-llama", "lora", device="tpu")


def test_prefix_methods_refuse_gradient_checkpointing_in_one_line() -> None:
    """Checkpointed layers drop past_key_values; an estimate must not describe a step that loses its prefixes."""
    import pytest

    from survey_utils.errors import SurveyError
    from survey_utils.memory import estimate

    with pytest.raises(SurveyError, match="past_key_values"):
        estimate("tiny-llama", "prefix_tuning", {}, batch_size=1, seq_len=32, gradient_checkpointing=True)
    assert estimate("tiny-llama", "prompt_tuning", {}, batch_size=1, seq_len=32, gradient_checkpointing=True).total > 0


@pytest.mark.parametrize("model", list_models())
def test_methods_that_save_the_same_tensors_get_the_same_estimate(model: str) -> None:
    """LoRA and rsLoRA differ only in a scale: one rule for their saved tensors, on every zoo model."""
    for settings in ({}, {"lora_dropout": 0.1}, {"target_modules": "all-linear"}):
        try:
            lora = estimate(model, "lora", settings, batch_size=4, seq_len=64)
        except SurveyError:
            continue
        assert estimate(model, "rslora", settings, batch_size=4, seq_len=64).as_dict() == lora.as_dict()


def test_adapter_dtype_applies_only_to_added_parameters() -> None:
    """Full fine-tuning adds nothing, so ``adapter_dtype`` changes nothing (peft's autocast_adapter_dtype)."""
    bf16 = estimate("llama-2-7b", "full", batch_size=1, seq_len=512, dtype="bf16", adapter_dtype="bf16")
    fp32 = estimate("llama-2-7b", "full", batch_size=1, seq_len=512, dtype="bf16", adapter_dtype="fp32")
    assert fp32.as_dict() == bf16.as_dict()
    lora_fp32 = estimate("llama-2-7b", "lora", batch_size=1, seq_len=512, dtype="bf16", adapter_dtype="fp32")
    lora_bf16 = estimate("llama-2-7b", "lora", batch_size=1, seq_len=512, dtype="bf16", adapter_dtype="bf16")
    assert lora_fp32.weights > lora_bf16.weights  # LoRA's own parameters do take the adapter dtype
