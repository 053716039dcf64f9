"""Soft prompts (chapter 02): output parity with peft, identity at init, folding, conventions, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from survey_utils.counting import apply_method, closed_form, count, count_parameters, peft_model
from survey_utils.errors import SurveyError
from survey_utils.methods import get_method
from survey_utils.methods.layers.prompts import remove_soft_prompt
from survey_utils.methods.soft_prompts import check_context, embedding_width, kv_width, prefix_layers
from survey_utils.zoo import build_model, load_config

N = 3
BATCH, LENGTH, DEC_LENGTH = 2, 6, 4
TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]


def _inputs(model: str, padded: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(5, 200, (BATCH, LENGTH), generator=generator)}
    if padded:
        mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
        mask[1, :2] = 0  # left padding on the second row: the mask must be widened, not replaced
        inputs["attention_mask"] = mask
    if load_config(model).is_encoder_decoder:
        inputs["decoder_input_ids"] = torch.randint(5, 200, (BATCH, DEC_LENGTH), generator=generator)
    return inputs


def _output(result) -> torch.Tensor:
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _pair(model: str, method: str, **hp):
    """Our model and peft's, from the same random weights."""
    ours = apply_method(build_model(model, device="cpu"), method, **hp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft_model(build_model(model, device="cpu"), method, **hp)
    return ours, theirs


CASES = [("prompt", "prompt_tuning", {}),
         ("p_tuning_mlp", "p_tuning", {"encoder_hidden_size": 16}),
         ("p_tuning_lstm", "p_tuning", {"encoder_hidden_size": 16, "encoder_reparameterization_type": "LSTM"}),
         ("prefix_mlp", "prefix_tuning", {"encoder_hidden_size": 16})]
# T5 prefixes are checked separately: peft maps its table onto T5's decoder layers differently (see below).
PARITY = [pytest.param(model, method, hp, id=f"{case}-{model}") for case, method, hp in CASES for model in TINY
          if not (model == "tiny-t5" and method == "prefix_tuning")]


@pytest.mark.parametrize("model,method,hp", PARITY)
def test_same_outputs_as_peft(model: str, method: str, hp: dict) -> None:
    ours, theirs = _pair(model, method, num_virtual_tokens=N, **hp)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    inputs = _inputs(model)
    with torch.no_grad():
        expected, got = _output(theirs(**inputs)), _output(ours(**inputs))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_prefix_tuning_without_mlp_matches_peft(model: str) -> None:
    ours, theirs = _pair(model, "p_tuning_v2", num_virtual_tokens=N)
    ours.prompt_encoder.load_state_dict(theirs.prompt_encoder["default"].state_dict())
    inputs = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(_output(ours(**inputs)), _output(theirs(**inputs)), rtol=1e-5, atol=1e-5)


def test_t5_prefix_matches_peft_layer_mapping() -> None:
    """peft 0.21.2 on T5 feeds decoder layer i the prefix blocks (4i, 4i+1) mod 2L of its table: half of the
    table is never read (zero gradient). Ours reads block (2i, 2i+1); with peft's blocks copied, outputs agree."""
    ours, theirs = _pair("tiny-t5", "p_tuning_v2", num_virtual_tokens=N)
    layers, width = prefix_layers(ours.config), kv_width(ours.config)
    table = theirs.prompt_encoder["default"].embedding.weight
    inputs = _inputs("tiny-t5")
    _output(theirs(**inputs)).sum().backward()
    used = table.grad.view(N, 2 * layers, width).abs().sum(dim=(0, 2)) > 0
    assert used.tolist() == [(block % 4) < 2 for block in range(2 * layers)]
    blocks = [b % (2 * layers) for i in range(layers) for b in (4 * i, 4 * i + 1)]
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.copy_(table.view(N, 2 * layers, width)[:, blocks].reshape(N, -1))
        torch.testing.assert_close(_output(ours(**inputs)), _output(theirs(**inputs)), rtol=1e-5, atol=1e-5)


def test_llama_adapter_matches_peft() -> None:
    ours, theirs = _pair("tiny-llama", "llama_adapter", adapter_len=N, adapter_layers=2)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "adaption_" in name:
                target = name.replace("base_model.model.", "", 1)
                ours.get_parameter(target).copy_(parameter)
                if name.endswith("adaption_gate"):  # zero at init: open the gates so the prompts matter
                    parameter.fill_(0.7)
                    ours.get_parameter(target).fill_(0.7)
        inputs = _inputs("tiny-llama")
        torch.testing.assert_close(_output(ours(**inputs)), _output(theirs(**inputs)), rtol=1e-5, atol=1e-5)


def test_llama_adapter_is_identity_at_init() -> None:
    inputs = _inputs("tiny-llama")
    with torch.no_grad():
        base = _output(build_model("tiny-llama", device="cpu")(**inputs))
        adapted = _output(apply_method(build_model("tiny-llama", device="cpu"), "llama_adapter",
                                       adapter_len=4, adapter_layers=3)(**inputs))
    torch.testing.assert_close(adapted, base)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_fold_keeps_outputs_and_leaves_only_prefixes(model: str) -> None:
    ours = apply_method(build_model(model, device="cpu"), "prefix_tuning", num_virtual_tokens=N,
                        encoder_hidden_size=16)
    inputs = _inputs(model)
    with torch.no_grad():
        before = _output(ours(**inputs))
        ours.prompt_encoder.fold()
        after = _output(ours(**inputs))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    config = load_config(model)
    folded = get_method("prefix_tuning").count(config, num_virtual_tokens=N, prefix_projection=False)
    assert count_parameters(ours).trainable == folded == N * 2 * prefix_layers(config) * kv_width(config)


@pytest.mark.parametrize("model", TINY)
def test_removing_the_prompt_restores_the_base_model(model: str) -> None:
    inputs = _inputs(model)
    base_model = build_model(model, device="cpu")
    with torch.no_grad():
        base = _output(base_model(**inputs))
        prompted = apply_method(base_model, "prompt_tuning", num_virtual_tokens=N)
        assert _output(prompted(**inputs)).shape[1] == base.shape[1] + (0 if model == "tiny-t5" else N)
        torch.testing.assert_close(_output(remove_soft_prompt(prompted)(**inputs)), base)


def test_training_the_prompt_changes_outputs_not_weights() -> None:
    model = apply_method(build_model("tiny-gpt2", device="cpu"), "prompt_tuning", num_virtual_tokens=N)
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prompt_encoder")}
    inputs = _inputs("tiny-gpt2", padded=False)
    with torch.no_grad():
        before = _output(model(**inputs))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = _output(model(**inputs))
    assert not torch.allclose(before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


def test_encoder_decoder_convention_against_peft_default() -> None:
    """One prompt table for T5 here; peft's SEQ_2_SEQ_LM default makes two and reads only the first."""
    config = load_config("t5-base")
    d, n = embedding_width(config), 20
    ours = count("t5-base", "prompt_tuning", num_virtual_tokens=n)
    assert ours.trainable == n * d == 15_360
    from peft import PromptTuningConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = get_peft_model(build_model("t5-base", device="meta"),
                                 PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
    assert default.get_nb_trainable_parameters()[0] == 2 * n * d == 30_720
    assert count("t5-base", "prompt_tuning", "peft", num_virtual_tokens=n).trainable == ours.trainable


def test_grouped_query_prefixes_use_the_key_value_width() -> None:
    config = load_config("tiny-llama")  # 4 query heads, 2 key/value heads of 32
    assert kv_width(config) == 64 < config.hidden_size
    hp = {"num_virtual_tokens": 5, "prefix_projection": False}
    assert closed_form(config, "prefix_tuning", **hp).trainable == 5 * 2 * 4 * 64


def test_extra_positions() -> None:
    config = load_config("llama-2-7b")
    for name in ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2"):
        method = get_method(name)
        assert method.extra_positions(config, **method.resolve(config, num_virtual_tokens=7)) == 7


def test_context_errors_name_both_lengths() -> None:
    config = load_config("t5-base")  # 512 positions
    check_context(config, 20, 492)
    with pytest.raises(SurveyError, match=r"20 virtual tokens \+ 500 input tokens = 520 .* 512") as error:
        check_context(config, 20, 500)
    assert "\n" not in str(error.value)
    with pytest.raises(SurveyError, match="512"):
        closed_form("t5-base", "prompt_tuning", num_virtual_tokens=600)
    model = apply_method(build_model("tiny-gpt2", device="cpu"), "prefix_tuning", num_virtual_tokens=510)
    with pytest.raises(SurveyError, match="510 virtual tokens"):
        model(input_ids=torch.ones(1, 8, dtype=torch.long))


@pytest.mark.parametrize("model,hp,fragment", [
    ("bloom-560m", {}, "llama-like"),
    ("tiny-llama", {"adapter_layers": 5}, "adapter_layers=5"),
    ("tiny-llama", {"adapter_layers": 0}, "adapter_layers=0"),
])
def test_llama_adapter_errors(model: str, hp: dict, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment) as error:
        closed_form(model, "llama_adapter", **hp)
    assert "\n" not in str(error.value)


def test_bad_values_are_one_line_errors() -> None:
    with pytest.raises(SurveyError, match="num_virtual_tokens=0"):
        closed_form("tiny-llama", "prompt_tuning", num_virtual_tokens=0)
    with pytest.raises(SurveyError, match="encoder_reparameterization_type='GRU'"):
        closed_form("tiny-llama", "p_tuning", encoder_reparameterization_type="GRU")
    with pytest.raises(SurveyError, match="TEXT needs"):
        closed_form("tiny-llama", "prompt_tuning", prompt_tuning_init="TEXT")


def test_sample_vocab_init_copies_vocabulary_rows() -> None:
    model = apply_method(build_model("tiny-llama", device="cpu"), "prompt_tuning", num_virtual_tokens=N,
                         prompt_tuning_init="SAMPLE_VOCAB")
    vocabulary = model.get_input_embeddings().weight
    for row in model.prompt_encoder.embedding.weight:
        assert (vocabulary == row).all(dim=1).any()


def test_apply_works_under_fake_tensor_mode() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = build_model("tiny-llama", device="cpu")
        for name, hp in [("prefix_tuning", {}), ("p_tuning", {"encoder_reparameterization_type": "LSTM"}),
                         ("llama_adapter", {"adapter_layers": 2})]:
            apply_method(build_model("tiny-llama", device="cpu"), name, **hp)
        apply_method(model, "prompt_tuning", num_virtual_tokens=N)
        assert count_parameters(model).trainable == N * 128
