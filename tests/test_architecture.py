"""The config-derived layout equals the built model, parameter by parameter, for every zoo model."""

from __future__ import annotations

import time

import pytest

from survey_utils.architecture import layout, params_by_component, total_params
from survey_utils.errors import SurveyError
from survey_utils.zoo import build_model, list_models, load_config


@pytest.mark.parametrize("name", list_models())
def test_layout_names_and_shapes_equal_the_built_model(name: str) -> None:
    config = load_config(name)
    built = {n: p.numel() for n, p in build_model(config, device="meta").named_parameters()}
    derived = {f"{m.name}.{p}": n for m in layout(config).modules if not m.tied_to for p, n in m.params}
    assert derived == built


@pytest.mark.parametrize("name", ["llama-2-7b", "t5-base", "gpt2"])
def test_components_add_up_to_the_total(name: str) -> None:
    config = load_config(name)
    parts = params_by_component(config)
    assert sum(parts.values()) == total_params(config)
    assert all(parts[c] > 0 for c in ("embeddings", "attention", "mlp", "norms"))


def test_the_405b_layout_is_arithmetic_not_a_build() -> None:
    config = load_config("llama-3.1-405b")
    start = time.perf_counter()
    layout(config)
    # Not a speed goal (those live in benchmarks/): a guard that nothing builds a 405B model here.
    assert time.perf_counter() - start < 5.0


def test_a_model_type_without_a_hand_layout_gets_the_generic_layout() -> None:
    from transformers import GPTNeoXConfig

    shape = layout(GPTNeoXConfig(architectures=["GPTNeoXForCausalLM"], num_hidden_layers=2))
    assert shape.family == "gpt_neox" and shape.num_layers == 2 and shape.default_lora_targets == ("query_key_value",)


def test_unknown_model_type_is_one_line() -> None:
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(architectures=["NoSuchModel"])
    config.model_type = "no-such-type"
    with pytest.raises(SurveyError, match="no model class for model type 'no-such-type'"):
        layout(config)


def test_an_edited_copy_gets_the_layout_of_its_edit() -> None:
    """The layout cache must not answer for a config as it was before a field changed (it once did, by identity)."""
    import copy

    config = copy.deepcopy(load_config("tiny-llama"))
    before = layout(config).num_layers
    config.num_hidden_layers = 1
    assert layout(config).num_layers == 1 != before
