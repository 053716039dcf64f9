"""LoRA from scratch: identity at init, parity with peft, merge and unmerge, frozen backbone."""

from __future__ import annotations

import pytest
import torch

from survey_utils.counting import apply_method, peft_model
from survey_utils.methods import get_method
from survey_utils.parity import example_inputs, forward, parity
from survey_utils.zoo import build_model, load_config
from tests.conftest import TINY


@pytest.mark.parametrize("model", TINY)
def test_lora_is_the_identity_at_initialisation(model: str) -> None:
    config = load_config(model)
    inputs = example_inputs(config)
    base = forward(build_model(config, seed=0), inputs)
    adapted = forward(apply_method(build_model(config, seed=0), "lora", r=4), inputs)
    assert torch.equal(base, adapted)


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_matches_peft_and_merges(model: str, use_rslora: bool) -> None:
    report = parity(model, "lora", r=4, lora_alpha=12.0, use_rslora=use_rslora)
    assert report.copied_tensors > 0
    assert report.max_diff_vs_peft <= 1e-10
    assert report.max_diff_merged <= 1e-10


def test_only_lora_factors_train() -> None:
    model = apply_method(build_model("tiny-llama"), "lora", r=2, target_modules=["q_proj"], layers_to_transform=[1])
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.layers.1.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_B"]


def test_unmerge_restores_the_base_weight_exactly_enough() -> None:
    model = apply_method(build_model("tiny-gpt2", dtype=torch.float64), "lora", r=4)
    layer = model.transformer.h[0].attn.c_attn
    torch.nn.init.normal_(layer.lora_B)
    before = layer.base_layer.weight.clone()
    layer.merge()
    assert not torch.allclose(before, layer.base_layer.weight)
    layer.unmerge()
    assert torch.allclose(before, layer.base_layer.weight, atol=1e-12)


# --- LoRA on fused expert tensors (peft's target_parameters) -------------------------------------------------------

def _tiny_moe(experts_implementation: str | None = None):
    """A two-block Mixtral small enough for real tensors: 4 experts of width 48, two per token. transformers runs
    its experts with ``grouped_mm`` (float32/16 only) unless told ``eager`` (a loop over experts, any dtype)."""
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64,
                         architectures=["MixtralForCausalLM"], name_or_path="tiny-moe",
                         experts_implementation=experts_implementation)


def _copy_into_peft(ours: torch.nn.Module, theirs: torch.nn.Module) -> int:
    """Our factors into peft's model: LoRALinear's A, B as they are; ParameterLoRA's per-expert (E, r, d_in) and
    (E, d_out, r) into peft's ParamWrapper's lora_A (r E x d_in) and lora_B (d_out x r E), its reshape rule."""
    from peft.tuners.lora import ParamWrapper

    from survey_utils.methods.layers.experts import ParameterLoRA

    copied = 0
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            mine = ours.get_submodule(path)
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            if isinstance(module, ParamWrapper):
                assert isinstance(mine, ParameterLoRA)
                our_a, our_b = mine.lora_A[module.parameter_name], mine.lora_B[module.parameter_name]
                if our_a.dim() == 3:
                    a.copy_(our_a.reshape(a.shape))
                    b.copy_(our_b.permute(1, 2, 0).reshape(b.shape))
                else:
                    a.copy_(our_a)
                    b.copy_(our_b)
            else:
                a.copy_(mine.lora_A)
                b.copy_(mine.lora_B)
            copied += 1
    return copied


@pytest.mark.parametrize(("implementation", "dtype", "atol"), [("eager", torch.float64, 1e-10),
                                                              ("grouped_mm", torch.float32, 1e-5)])
def test_expert_lora_is_the_identity_at_init_and_matches_peft_and_merges(implementation: str, dtype: torch.dtype,
                                                                          atol: float) -> None:
    """all-linear on a Mixtral: attention linears, the routers and every expert of the fused tensors, as peft
    0.21.2's ParamWrapper adapts them (gate_up_proj at rank 2r, alpha 2 alpha); outputs equal peft's, with either
    of transformers' expert implementations."""
    from survey_utils.methods.common import merge, unmerge
    from survey_utils.methods.layers.experts import ParameterLoRA
    from survey_utils.parity import randomise_method_params

    config = _tiny_moe(implementation)
    hp = {"target_modules": "all-linear", "r": 4, "lora_alpha": 6.0}
    inputs = example_inputs(config)
    base = forward(build_model(config, device="cpu", seed=0, dtype=dtype), inputs)
    ours = apply_method(build_model(config, device="cpu", seed=0, dtype=dtype), "lora", **hp)
    assert torch.equal(forward(ours, inputs), base)  # B = 0
    wrappers = [m for m in ours.modules() if isinstance(m, ParameterLoRA)]
    assert len(wrappers) == 4  # the experts and the router of each block
    experts = ours.model.layers[0].mlp.experts
    assert experts.lora_A["gate_up_proj"].shape == (4, 8, 32) and experts.lora_B["gate_up_proj"].shape == (4, 96, 8)
    assert experts.lora_A["down_proj"].shape == (4, 4, 48) and experts.lora_B["down_proj"].shape == (4, 32, 4)
    theirs = peft_model(build_model(config, device="cpu", seed=0, dtype=dtype), "lora", **hp)
    randomise_method_params(ours, get_method("lora"), std=0.2)
    assert _copy_into_peft(ours, theirs) == 2 * (4 + 3)  # per block: q, k, v, o; gate_up, down, router
    adapted = forward(ours, inputs)
    assert (adapted - base).abs().max() > 1e-3
    assert (adapted - forward(theirs, inputs)).abs().max() <= atol
    merge(ours)
    assert (forward(ours, inputs) - adapted).abs().max() <= atol
    unmerge(ours)
    assert (forward(ours, inputs) - adapted).abs().max() <= atol


def test_expert_lora_gradients_match_peft() -> None:
    """Each expert's factors get peft's gradients (only the routed tokens reach an expert's update)."""
    from survey_utils.parity import randomise_method_params

    config = _tiny_moe("eager")
    hp = {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "r": 2}
    ours = apply_method(build_model(config, device="cpu", seed=0, dtype=torch.float64), "lora", **hp)
    theirs = peft_model(build_model(config, device="cpu", seed=0, dtype=torch.float64), "lora", **hp)
    randomise_method_params(ours, get_method("lora"), std=0.2)
    _copy_into_peft(ours, theirs)
    inputs = example_inputs(config)
    for model in (ours, theirs):
        model(**inputs).logits.pow(2).mean().backward()
    checked = 0
    for name, wrapper in theirs.named_modules():
        if hasattr(wrapper, "parameter_name"):  # peft nests a wrapper per tensor; ours holds both in one module
            module = ours.get_submodule(name.removeprefix("base_model.model.").replace(".base_layer", ""))
            grad_a = module.lora_A[wrapper.parameter_name].grad
            assert torch.allclose(grad_a.reshape(-1, grad_a.shape[-1]), wrapper.lora_A["default"].weight.grad,
                                  atol=1e-12)
            grad_b = module.lora_B[wrapper.parameter_name].grad
            assert torch.allclose(grad_b.permute(1, 2, 0).reshape(grad_b.shape[1], -1),
                                  wrapper.lora_B["default"].weight.grad, atol=1e-12)
            checked += 1
    assert checked == 2 * 2  # two tensors per block


@pytest.mark.parametrize(("settings", "fragment"), [
    ({"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.nope"]},
     "target parameter 'mlp.experts.nope' matches no parameter"),
    ({"target_modules": ["q_proj"], "target_parameters": ["gate_up_proj"], "r": 0}, "r=0 is below its minimum 1"),
    ({"target_modules": "all-linear", "lora_dropout": 0.1}, "lora_dropout=0.1 with LoRA on parameters"),
    ({"target_modules": ["q_proj", "w1"]}, "names w1 without w3"),
    ({"target_modules": [], "target_parameters": ["gate.weight"], "layers_to_transform": None},
     None),
])
def test_expert_lora_bad_input_is_one_line(settings: dict, fragment: str | None) -> None:
    from survey_utils.counting import closed_form
    from survey_utils.errors import SurveyError

    if fragment is None:  # the router alone: one r x (h + E) pair per block
        assert closed_form(_tiny_moe(), "lora", **settings).trainable == 2 * 8 * (32 + 4)
        return
    with pytest.raises(SurveyError, match=fragment) as info:
        closed_form(_tiny_moe(), "lora", **settings)
    assert "\n" not in str(info.value)


def test_dora_and_qlora_refuse_what_peft_moves_to_parameters() -> None:
    from survey_utils.counting import closed_form
    from survey_utils.errors import SurveyError

    with pytest.raises(SurveyError, match="dora on 'mixtral' would adapt the parameters"):
        closed_form(_tiny_moe(), "dora", target_modules="all-linear")
    with pytest.raises(SurveyError, match="would adapt the parameters down_proj, gate_up_proj, weight"):
        closed_form(_tiny_moe(), "qlora", target_modules="all-linear", blocksize=16)


def test_target_parameters_from_the_command_line() -> None:
    method = get_method("lora")
    assert method.parse_settings(["target_modules=all-linear"]) == {"target_modules": "all-linear"}  # the keyword
    assert method.parse_settings(["target_parameters=mlp.experts.gate_up_proj,mlp.experts.down_proj"]) == {
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


@pytest.mark.parametrize(("implementation", "model_dtype", "adapter_dtype"),
                         [("eager", torch.float32, torch.float32), ("grouped_mm", torch.float32, torch.float32),
                          ("eager", torch.bfloat16, torch.float32)])
def test_expert_lora_memory_terms_are_the_saved_tensors(implementation: str, model_dtype: torch.dtype,
                                                        adapter_dtype: torch.dtype) -> None:
    """What LoRA on the experts and routers adds to the tensors autograd saves (distinct storages, parameters
    excluded), on real tensors, ours and peft's alike, equals its memory terms: the routed rows (top-k of E),
    the whole W + BA, and with fp32 factors on a bf16 model their cast copies."""
    from survey_utils.counting import peft_model

    def saved(model: torch.nn.Module, ids: torch.Tensor) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.untyped_storage().data_ptr() not in params:
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=ids)
        return sum(storages.values())

    def built(make, hp: dict) -> torch.nn.Module:
        model = make(build_model(config, device="cpu", seed=0, dtype=model_dtype), "lora", **hp).train()
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(adapter_dtype)
        return model

    config = _tiny_moe(implementation)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    method = get_method("lora")
    base = {"target_modules": ["q_proj"]}  # gradients reach every block: the backbone saves the same either way
    experts = {**base, "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]}
    terms = [sum(method.memory_terms(config, 2, 16, model_dtype.itemsize, adapter_dtype.itemsize,
                                     **method.resolve(config, **hp)).values()) for hp in (base, experts)]
    for make in (apply_method, peft_model):
        measured = saved(built(make, experts), ids) - saved(built(make, base), ids)
        assert measured == terms[1] - terms[0] > 0


@pytest.mark.parametrize(("settings", "tolerance"), [
    ({"target_modules": ["q_proj"], "target_parameters": ["gate_up_proj", "down_proj"]}, 1e-4),
    ({"target_modules": ["q_proj", "gate"]}, 1e-4),  # peft moves the router to target_parameters gate.weight
    # Gradients enter at the first block's expert outputs: its down_proj keeps its input rows but not W + BA (its
    # input carries no gradient). The estimate is 6 KB (0.03%) under: the int64 dispatch index and the fp32 routing
    # weight of each routed row and the int32 expert offsets, which scale and scatter those outputs, sit in the
    # backbone's MoE recipe (memory/activations.py) at the activation's stage, below where gradients enter here.
    ({"target_modules": [], "target_parameters": ["down_proj"]}, 1e-3),
])
def test_expert_lora_estimate_equals_the_simulation(settings: dict, tolerance: float) -> None:
    """The memory estimate (backbone recipe + LoRA's terms, gradients entering where the parameters act) against
    the fake-tensor simulation of a training step, on a two-block Mixtral in bf16, without checkpointing."""
    from transformers import MixtralConfig

    from survey_utils.memory.closed_form import estimate
    from survey_utils.memory.simulation import simulate

    config = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=1024,
                           architectures=["MixtralForCausalLM"], name_or_path="two-block-mixtral")
    ours = estimate(config, "lora", settings, batch_size=2, seq_len=128, dtype="bf16", device="cpu").total
    simulated = simulate(config, "lora", settings, batch_size=2, seq_len=128, dtype="bf16").peak
    assert abs(ours - simulated) <= tolerance * simulated, (ours, simulated)
