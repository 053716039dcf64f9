"""The registry's test matrix: every registered method, over the zoo, counted three ways.

A method joins by registering; nothing here names a method. For each (method, model) the closed form must
equal counting the model built on ``meta`` with our from-scratch ``apply``, and, where peft has the method,
peft's ``get_nb_trainable_parameters``. Random hyper-parameters come from hypothesis, drawn from each
method's own HyperParam specs.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from survey_utils.architecture import layout, total_params
from survey_utils.counting import closed_form, count, count_parameters, peft_model
from survey_utils.errors import SurveyError
from survey_utils.methods import list_methods
from survey_utils.methods.registry import HyperParam, Method
from survey_utils.targeting import num_blocks
from survey_utils.zoo import build_model, list_models, load_config
from tests.conftest import MATRIX_MODELS, REPRESENTATIVES, SAME_FAMILY_AS, TINY

METHODS = list_methods()
PEFT_METHODS = [m for m in METHODS if m.peft_config is not None]

# MATRIX_MODELS: the zoo less the bigger configs of families walked here (tests/conftest.py's SAME_FAMILY_AS says why
# and where they are counted instead). The tiny MoE (tiny-mixtral) does walk the matrix, and peft parity too: real
# tensors, a router and fused experts (15 s of CPU).
# peft parity on the tiny real-tensor configs, the mixture-of-experts one included (routers and fused experts).
PEFT_MODELS = [*REPRESENTATIVES, "tiny-mixtral"]


def _ids(methods: list[Method]) -> list[str]:
    return [m.name for m in methods]


def _scratch(model: str, method: Method, **hp):
    built = build_model(model, device="meta")
    method.apply(built, **method.resolve(built.config, **hp))
    return count_parameters(built)


@pytest.mark.parametrize("model", MATRIX_MODELS)
@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_closed_form_equals_built_model(method: Method, model: str) -> None:
    try:
        formula = closed_form(model, method)
    except SurveyError:
        with pytest.raises(SurveyError):
            _scratch(model, method)
        return
    built = _scratch(model, method)
    assert (formula.trainable, formula.total) == (built.trainable, built.total)
    assert formula.by_component == built.by_component


def _peft_total(total: int, method: Method, model: str, **hp) -> int:
    """peft's total: ours plus the frozen copies its implementation keeps (``Method.peft_frozen_copies``)."""
    if method.peft_frozen_copies is None:
        return total
    config = load_config(model)
    return total + method.peft_frozen_copies(config, **method.resolve(config, **hp))


@pytest.mark.parametrize("model", PEFT_MODELS)
@pytest.mark.parametrize("method", PEFT_METHODS, ids=_ids(PEFT_METHODS))
def test_closed_form_equals_peft(method: Method, model: str) -> None:
    try:
        formula = closed_form(model, method)
    except SurveyError:
        return
    peft_count = count(model, method, implementation="peft")
    assert (formula.trainable, _peft_total(formula.total, method, model)) == (peft_count.trainable, peft_count.total)


def structure(model: str) -> tuple:
    """What a method's apply and closed form see of a config, sizes aside: its class, and each module (layer index
    replaced by ``*``) with its kind, component, parameter names, tying, mixture-of-experts part and, for a linear,
    which of the config's named sizes its in and out features equal."""
    config = load_config(model)
    shape = layout(config)
    named = {"hidden": shape.hidden_size, "heads x head_dim": shape.num_heads * shape.head_dim,
             "kv heads x head_dim": shape.num_kv_heads * shape.head_dim, "intermediate": shape.intermediate_size,
             "vocab": shape.vocab_size}

    def size(n: int) -> tuple[str, ...]:
        return tuple(sorted(k for k, v in named.items() if v == n)) or ("none",)

    def unnumbered(name: str | None) -> str | None:
        return re.sub(r"\.\d+\.", ".*.", name) if name else name

    modules = frozenset(
        (unnumbered(m.name), m.kind, m.component, tuple(p for p, _ in m.params), unnumbered(m.tied_to), m.moe,
         *((size(m.in_features), size(m.out_features)) if m.kind in ("linear", "conv1d") else ()))
        for m in shape.modules)
    return config.model_type, tuple(config.architectures or ()), shape.is_encoder_decoder, modules


def test_each_config_left_out_has_its_twin_in_the_matrix() -> None:
    """``SAME_FAMILY_AS``: a config left out of the matrix names a walked zoo config of the same structure (see
    :func:`structure`) to which the same registered methods apply, and no smaller config of it is left out instead."""
    for name, walked in SAME_FAMILY_AS.items():
        assert name in list_models() and walked in MATRIX_MODELS, name
        assert structure(name) == structure(walked), f"{name} and {walked} differ in structure"
        differ = [m.name for m in METHODS if _succeeds(m, name) != _succeeds(m, walked)]
        assert not differ, f"{name} and {walked}: these methods apply to one and not the other: {differ}"
        assert total_params(load_config(walked)) <= total_params(load_config(name)), f"{walked} is the bigger"


def test_every_method_applies_somewhere() -> None:
    """The matrix above tolerates a method refusing a model; no method may refuse all of them."""
    for method in METHODS:
        assert any(_succeeds(method, model) for model in list_models()), method.name


def _succeeds(method: Method, model: str) -> bool:
    try:
        closed_form(model, method)
        return True
    except SurveyError:
        return False


def hyperparam_strategy(hp: HyperParam, model: str) -> st.SearchStrategy:
    """Values a user could plausibly pick, from the hyper-parameter's own spec and the model's shape."""
    shape = layout(load_config(model))
    if hp.choices is not None:
        base: st.SearchStrategy = st.sampled_from(hp.choices)
    elif hp.type == "int":
        low = int(hp.minimum if hp.minimum is not None else 0)
        high = int(hp.maximum) if hp.maximum is not None else low + 64
        base = st.integers(low, high)
    elif hp.type == "float":
        low = hp.minimum if hp.minimum is not None else 0.0
        high = hp.maximum if hp.maximum is not None else 64.0
        base = st.floats(low, high, allow_nan=False)
    elif hp.type == "bool":
        base = st.booleans()
    elif hp.type == "targets":
        base = st.lists(st.sampled_from(shape.linear_names()), min_size=1, unique=True)
    elif hp.type == "int_list":
        base = st.lists(st.integers(0, num_blocks(shape) - 1), min_size=1, max_size=4, unique=True)
    else:
        return st.just(hp.default)
    return st.one_of(st.just(None), base) if hp.nullable else base


@st.composite
def method_settings(draw, method: Method, model: str) -> dict:
    return {hp.name: draw(hyperparam_strategy(hp, model)) for hp in method.hyperparams
            if hp.name != "layers_pattern"}


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_three_way_random_hyperparameters(method: Method, model: str, data) -> None:
    hp = data.draw(method_settings(method, model))
    try:
        formula = closed_form(model, method, **hp)
    except SurveyError:
        with pytest.raises(SurveyError):
            _scratch(model, method, **hp)
        return
    built = _scratch(model, method, **hp)
    assert (formula.trainable, formula.total) == (built.trainable, built.total)
    if method.peft_config is not None:
        wrapped = peft_model(build_model(model, device="meta"), method, **hp)
        assert (formula.trainable, _peft_total(formula.total, method, model, **hp)) == wrapped.get_nb_trainable_parameters()


MASKED_METHODS = [m for m in METHODS if m.mask_kept is not None]


@pytest.mark.parametrize("method", MASKED_METHODS, ids=_ids(MASKED_METHODS))
def test_a_masked_count_is_the_unmasked_entries_of_the_real_mask(method: Method) -> None:
    """``Method.mask_kept``: on a tiny model with real weights (the mask ranked on values, not a stand-in) the
    built model's count is the number of unmasked entries, each distinct and in range, and equals the closed form
    at the method's defaults, per component too."""
    import torch

    from survey_utils.methods.registry import MASK_INDEX_SUFFIX

    for model in TINY:
        try:
            formula = closed_form(model, method)
        except SurveyError:
            continue
        built = build_model(model, device="cpu", dtype=torch.float32)
        method.apply(built, **{**method.resolve(built.config), **_small_data(method)})
        entries = 0
        for name, index in built.named_buffers():
            if name.endswith(MASK_INDEX_SUFFIX):
                parameter = built.get_parameter(name[:-len(MASK_INDEX_SUFFIX)])
                assert parameter.requires_grad and index.unique().numel() == index.numel()
                assert 0 <= int(index.min()) and int(index.max()) < parameter.numel()
                entries += index.numel()
        counted = count_parameters(built)
        assert entries == counted.trainable == formula.trainable
        assert counted.by_component == formula.by_component


def _small_data(method: Method) -> dict:
    """Fewer scoring examples / first-phase steps than the defaults: the count does not depend on them."""
    return {hp.name: 2 for hp in method.hyperparams if hp.type == "int" and hp.name != "top_k"}
