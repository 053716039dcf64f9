"""Exact counts: the issue's reference numbers, the component split, and built-model counting."""

from __future__ import annotations

import pytest

from survey_utils.counting import closed_form, count, count_parameters, three_way
from survey_utils.errors import SurveyError
from survey_utils.methods import get_method
from survey_utils.zoo import build_model

LLAMA_QV = {"r": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize("implementation", ["formula", "scratch", "peft"])
def test_llama_2_7b_lora_reference_numbers(implementation: str) -> None:
    result = count("llama-2-7b", "lora", implementation, **LLAMA_QV)
    assert (result.trainable, result.total) == (4_194_304, 6_742_609_920)


def test_lora_formula_by_hand() -> None:
    # 32 blocks x (q: 8*(4096+4096) + v: 8*(4096+4096)) = 32 x 131072
    assert closed_form("llama-2-7b", "lora", **LLAMA_QV).trainable == 32 * 2 * 8 * (4096 + 4096)
    # Llama-3-8B's v_proj is 4096 -> 1024 (grouped-query attention, 8 kv heads)
    assert closed_form("llama-3-8b", "lora", **LLAMA_QV).trainable == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_component_split_of_a_built_model_attributes_the_method() -> None:
    model = get_method("lora").apply(build_model("tiny-llama"), **get_method("lora").resolve(r=4))
    split = count_parameters(model).by_component
    assert split["method"][0] == split["method"][1] > 0
    assert all(trainable == 0 for name, (trainable, _) in split.items() if name != "method")


def test_full_fine_tuning_trains_everything_once() -> None:
    result = closed_form("gpt2", "full")
    assert result.trainable == result.total == 124_439_808  # tied lm_head counted once


def test_three_way_row_reports_match() -> None:
    row = three_way("tiny-bert", "lora", r=2)
    assert row["match"] and row["formula"] == row["scratch"] == row["peft"]


def test_unknown_implementation_and_method_are_one_line() -> None:
    with pytest.raises(SurveyError, match="implementation 'jax'"):
        count("gpt2", "lora", "jax")
    with pytest.raises(SurveyError, match="unknown method 'lorra'.*lora"):
        count("gpt2", "lorra")
