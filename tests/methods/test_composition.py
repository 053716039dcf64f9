"""Hybrids as compositions: counts are the parts' sums, the built model agrees, collisions are refused."""

from __future__ import annotations

import pytest

from survey_utils.counting import apply_method, closed_form, count_parameters
from survey_utils.errors import SurveyError
from survey_utils.methods import get_method
from survey_utils.methods.composition import Part, compose
from survey_utils.methods.registry import NOT_PLACED, Taxonomy
from survey_utils.zoo import build_model, load_config

NOWHERE = Taxonomy(NOT_PLACED, NOT_PLACED, NOT_PLACED)


def hybrid(*parts: Part):
    return compose("test-hybrid", "test hybrid", "a test", None, NOWHERE, "05_hybrid_unified", parts)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "tiny-t5"])
def test_count_is_the_sum_of_the_parts_and_the_built_model_agrees(model: str) -> None:
    method = hybrid(Part("lora", "lora", {"r": 4}), Part("adapter", "pfeiffer", {"reduction_factor": 8.0}))
    config = load_config(model)
    parts = get_method("lora").count(config, r=4) + get_method("pfeiffer").count(config, reduction_factor=8.0)
    assert method.count(config) == parts
    built = count_parameters(apply_method(build_model(config, device="meta"), method))
    assert built.trainable == parts
    assert closed_form(config, method).total == built.total


def test_hyper_parameters_are_namespaced_with_the_recipe_as_defaults() -> None:
    method = hybrid(Part("lora", "lora", {"r": 4}), Part("prompt", "prompt_tuning", {"num_virtual_tokens": 7}))
    assert method.defaults()["lora.r"] == 4 and method.defaults()["prompt.num_virtual_tokens"] == 7
    config = load_config("tiny-llama")
    assert method.count(config, **{"lora.r": 2}) == (get_method("lora").count(config, r=2)
                                                     + get_method("prompt_tuning").count(config, num_virtual_tokens=7))
    assert method.extra_positions(config, **method.resolve(config)) == 7


def test_memory_terms_are_the_parts_terms() -> None:
    method = hybrid(Part("lora", "lora"), Part("adapter", "pfeiffer"))
    config = load_config("tiny-llama")
    hp = method.resolve(config)
    terms = method.memory_terms(config, 2, 16, 2, 2, **hp)
    lora = get_method("lora").memory_terms(config, 2, 16, 2, 2, **get_method("lora").resolve(config))
    assert {k: v for k, v in terms.items() if k.startswith("lora: ")} == {f"lora: {k}": v for k, v in lora.items()}


@pytest.mark.parametrize(("parts", "fragment"), [
    ((Part("a", "prefix_tuning"), Part("b", "prompt_tuning")), "both add positions"),
    ((Part("a", "lora"), Part("b", "dora")), "both wrap module"),
])
def test_colliding_parts_are_refused_in_one_line(parts: tuple[Part, ...], fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment):
        hybrid(*parts).resolve(load_config("tiny-llama"))
