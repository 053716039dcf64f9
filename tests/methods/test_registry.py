"""The registry's contract: hyper-parameter parsing and validation, one registration per method."""

from __future__ import annotations

import pytest

from survey_utils.errors import SurveyError
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.registry import HyperParam, Method, Taxonomy, register


def test_every_method_cites_its_paper_and_chapter() -> None:
    for method in list_methods():
        assert method.paper and method.chapter[:2].isdigit(), method.name
        assert method.apply.__doc__ and method.trainable_params.__doc__, method.name


def test_parse_from_command_line_text() -> None:
    lora = get_method("lora")
    assert lora.parse_settings(["r=16", "target_modules=q_proj, v_proj", "use_rslora=true",
                                "layers_to_transform=0,1"]) == {
        "r": 16, "target_modules": ["q_proj", "v_proj"], "use_rslora": True, "layers_to_transform": [0, 1]}


@pytest.mark.parametrize(("hp", "value", "fragment"), [
    (HyperParam("r", "int", 8, "rank", minimum=1), 0, "r=0 is below its minimum 1"),
    (HyperParam("r", "int", 8, "rank", minimum=1), 2.5, "must be an integer"),
    (HyperParam("r", "int", 8, "rank", minimum=1), True, "must be an integer"),
    (HyperParam("p", "float", 0.0, "p", maximum=0.99), 1.5, "above its maximum"),
    (HyperParam("p", "float", 0.0, "p"), float("nan"), "finite"),
    (HyperParam("act", "str", "relu", "a", choices=("relu", "gelu")), "swish", "not one of relu, gelu"),
    (HyperParam("flag", "bool", False, "f"), "yes", "true or false"),
    (HyperParam("t", "targets", None, "t"), None, "must be set"),
])
def test_bad_values_name_themselves(hp: HyperParam, value, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment):
        hp.check(value)


def test_registering_twice_is_refused() -> None:
    lora = get_method("lora")
    with pytest.raises(ValueError, match="registered twice"):
        register(lora)


def test_bad_default_is_refused_at_registration() -> None:
    bad = Method(name="bad-default", title="x", paper="p", arxiv_id=None, taxonomy=Taxonomy("", "", ""),
                 chapter="99", hyperparams=(HyperParam("r", "int", 0, "rank", minimum=1),),
                 apply=lambda model, **hp: model, trainable_params=lambda config, **hp: 0)
    with pytest.raises(SurveyError, match="r=0"):
        register(bad)
    assert "bad-default" not in {m.name for m in list_methods()}
