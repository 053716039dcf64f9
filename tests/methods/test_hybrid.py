"""Hybrids (chapter 05): every composition in the registry is its parts plus its own extras, on the zoo
(less the bigger configs of walked families, ``tests/conftest.py``'s ``SAME_FAMILY_AS``).

The registry drives these tests: a method built by ``compose`` (``Method.parts`` not empty) joins them by
registering. Its extras (gates, learned scales) are measured as the built hybrid minus the same parts composed
without them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PretrainedConfig

from survey_utils.counting import apply_method, closed_form, count_parameters
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.memory.simulation import simulate
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.composition import Part, compose
from survey_utils.methods.hybrid import S4, S4_STRATEGIES, s4_groups, spindle_sizes
from survey_utils.methods.registry import NOT_PLACED, Method, Taxonomy
from survey_utils.parity import example_inputs, forward
from survey_utils.zoo import build_model, load_config
from tests.conftest import MATRIX_MODELS, TINY

HYBRIDS = [m for m in list_methods() if m.parts]
CHECKED = HYBRIDS  # every composition (S4 included) registered by chapter 05
NOWHERE = Taxonomy(NOT_PLACED, NOT_PLACED, NOT_PLACED)


def parts_only(method: Method, config: PretrainedConfig | None = None) -> Method:
    """The same parts, composed without the hybrid's own extras; with ``config``, each part fixed at the settings
    the hybrid gives it on that model (S4's groups become its parts' layers)."""
    parts = method.parts
    if config is not None:
        settled = method.part_hyperparams(config, **method.resolve(config))
        parts = tuple(Part(p.label, p.method, settled[p.label]) for p in method.parts)
    return compose(f"{method.name}-parts", "parts", "a test", None, NOWHERE, method.chapter, parts)


def refused(method: Method, model: str) -> bool:
    """The hybrid does not apply to this model (a one-line SurveyError: S4's BitFit on a model without biases)."""
    try:
        method.resolve(load_config(model))
    except SurveyError as error:
        assert "\n" not in str(error)
        return True
    return False


def _ids(methods: list[Method]) -> list[str]:
    return [m.name for m in methods]


def test_the_chapter_registers_hybrids() -> None:
    assert {m.chapter for m in HYBRIDS} >= {"05_hybrid_unified"} and len(HYBRIDS) >= 4


@pytest.mark.parametrize("model", MATRIX_MODELS)
@pytest.mark.parametrize("method", CHECKED, ids=_ids(CHECKED))
def test_count_is_the_parts_plus_the_extras(method: Method, model: str) -> None:
    config = load_config(model)
    try:
        hp = method.resolve(config)
    except SurveyError:
        return
    by_part = method.part_hyperparams(config, **hp)
    parts = sum(p.registered.trainable_params(config, **by_part[p.label]) for p in method.parts)
    assert parts == parts_only(method, config).count(config)
    formula = closed_form(config, method)
    built = count_parameters(apply_method(build_model(config, device="meta"), method))
    bare = count_parameters(apply_method(build_model(config, device="meta"), parts_only(method, config)))
    assert (formula.trainable, formula.total) == (built.trainable, built.total)
    assert formula.trainable - parts == built.trainable - bare.trainable >= 0


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", CHECKED, ids=_ids(CHECKED))
def test_identity_at_init_where_the_parts_are(method: Method, model: str) -> None:
    """Without its soft prompt (prefixes change the output by design), every hybrid is the base model at init."""
    from survey_utils.methods.layers.prompts import remove_soft_prompt

    if refused(method, model):
        return
    config = load_config(model)
    inputs = example_inputs(config)
    base = forward(build_model(config, device="cpu", seed=0, dtype=torch.float64), inputs)
    built = apply_method(build_model(config, device="cpu", seed=0, dtype=torch.float64), method)
    forward(built, inputs)
    if hasattr(built, "prompt_encoder"):
        remove_soft_prompt(built)
    assert torch.equal(forward(built, inputs), base)


@pytest.mark.parametrize("method", [m for m in HYBRIDS if m.count(load_config("tiny-bert"))
                                    > parts_only(m, load_config("tiny-bert")).count(load_config("tiny-bert"))],
                         ids=lambda m: m.name)
def test_the_extras_train(method: Method) -> None:
    """Gates and learned scales receive gradients and move in three optimizer steps."""
    config = load_config("tiny-bert")
    built = apply_method(build_model(config, device="cpu", seed=0), method)
    bare = {n for n, _ in apply_method(build_model(config, device="meta"), parts_only(method, config)).named_parameters()}
    extras = {n: p.detach().clone() for n, p in built.named_parameters()
              if p.requires_grad and n.replace(".branch.", ".") not in bare}
    assert extras
    optimizer = torch.optim.AdamW([p for p in built.parameters() if p.requires_grad], lr=1e-2)
    inputs = example_inputs(config)
    for _ in range(3):
        built(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(built.named_parameters())
    assert [n for n, value in extras.items() if torch.equal(after[n], value)] == []


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("method", CHECKED, ids=_ids(CHECKED))
def test_memory_estimate_within_5_percent_of_simulation(method: Method, model: str) -> None:
    if refused(method, model):
        return
    estimated = estimate(model, method, batch_size=2, seq_len=64, device="cpu").total
    simulated = simulate(model, method, batch_size=2, seq_len=64).peak
    assert abs(estimated / simulated - 1) < 0.05


# AdapterHub's configs (adapters 1.2.0, src/adapters/configuration/adapter_config.py), as the recipes' defaults.
ADAPTERHUB = {
    "mam_adapter": {"prefix.num_virtual_tokens": 30, "prefix.encoder_hidden_size": 800,
                    "prefix.prefix_projection": True, "adapter.reduction_factor": 2.0,
                    "adapter.non_linearity": "relu", "adapter.scaling": 4.0},
    "unipelt": {"prefix.num_virtual_tokens": 10, "prefix.encoder_hidden_size": 512, "adapter.reduction_factor": 16.0,
                "adapter.non_linearity": "relu", "lora.r": 8, "lora.lora_alpha": 2.0},
    "compacter_pp": {"compacter.placement": "pfeiffer", "compacter.reduction_factor": 32.0,
                     "compacter.non_linearity": "gelu", "compacter.phm_dim": 4, "compacter.phm_rank": 1},
    "scaled_parallel": {"adapter.reduction_factor": 2.0, "adapter.non_linearity": "relu", "adapter.scaling": 1.0},
}


@pytest.mark.parametrize("name", sorted(ADAPTERHUB))
def test_defaults_are_adapterhubs(name: str) -> None:
    defaults = get_method(name).defaults()
    assert {k: defaults[k] for k in ADAPTERHUB[name]} == ADAPTERHUB[name]


# The closing note of chapter 05 quotes these (trainable parameters at the defaults).
AT_DEFAULTS = {
    ("mam_adapter", "roberta-base"): 22_493_984, ("mam_adapter", "t5-large"): 90_626_848,
    ("unipelt", "roberta-base"): 11_083_376, ("unipelt", "t5-large"): 34_674_392,
    ("compacter_pp", "roberta-base"): 28_576, ("compacter_pp", "t5-large"): 152_128,
    ("scaled_parallel", "roberta-base"): 7_091_724, ("scaled_parallel", "t5-large"): 50_405_424,
}


@pytest.mark.parametrize(("name", "model"), sorted(AT_DEFAULTS))
def test_counts_at_defaults(name: str, model: str) -> None:
    assert get_method(name).count(load_config(model)) == AT_DEFAULTS[(name, model)]


@pytest.mark.parametrize(("parts", "fragment"), [
    ((Part("a", "prefix_tuning"), Part("b", "p_tuning_v2")), "parts a and b both add positions"),
    ((Part("a", "lora"), Part("b", "lora", {"r": 2})), "parts a and b both wrap module"),
])
def test_colliding_parts_are_one_line(parts: tuple[Part, ...], fragment: str) -> None:
    method = compose("collide", "collide", "a test", None, NOWHERE, "05_hybrid_unified", parts)
    with pytest.raises(SurveyError, match=fragment) as info:
        method.resolve(load_config("tiny-bert"))
    assert "\n" not in str(info.value)


def test_a_bad_part_setting_names_itself() -> None:
    with pytest.raises(SurveyError, match=r"lora.r=0 is below its minimum 1"):
        get_method("unipelt").resolve(load_config("tiny-bert"), **{"lora.r": 0})


# --- S4 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("blocks", "sizes"), [(4, [1, 1, 1, 1]), (6, [1, 2, 2, 1]), (12, [2, 4, 4, 2]),
                                               (24, [4, 8, 8, 4]), (32, [5, 11, 11, 5]), (13, [2, 4, 5, 2])])
def test_spindle_grouping(blocks: int, sizes: list[int]) -> None:
    assert spindle_sizes(blocks) == sizes


@pytest.mark.parametrize("model", ["roberta-base", "gpt2", "tiny-bert", "opt-350m"])
def test_s4_parts_serve_their_groups(model: str) -> None:
    """Adapter in G1-G3, LoRA in G1 and G4, BitFit's biases in G3 and G4 only, with one size per strategy."""
    from survey_utils.targeting import layer_index

    config, method = load_config(model), S4
    groups = s4_groups(config, None)
    assert sorted(i for g in groups for i in g) == list(range(len(sum(groups, []))))
    by_part = method.part_hyperparams(config, **method.resolve(config))
    for part in ("adapter", "lora"):
        assert by_part[part]["layers_to_transform"] == sorted(i for g in S4_STRATEGIES[part] for i in groups[g])
    biases = get_method("bitfit").unfrozen_params(config, **by_part["bitfit"])
    assert {layer_index(spec.name) for spec, _ in biases} == {i for g in S4_STRATEGIES["bitfit"] for i in groups[g]}
    built = apply_method(build_model(config, device="meta"), method)
    trained = {n for n, p in built.named_parameters() if p.requires_grad}
    assert {layer_index(n) for n in trained if "lora_" in n} == set(by_part["lora"]["layers_to_transform"])
    assert {layer_index(n) for n in trained if "adapter_" in n} == set(by_part["adapter"]["layers_to_transform"])


@pytest.mark.parametrize(("sizes", "fragment"), [
    ([2, 4, 4], r"S4 group_sizes=\[2, 4, 4\] must be four positive sizes covering the 12 blocks of roberta-base "
                r"\(they cover 10\)"),
    ([2, 4, 4, 4], r"covering the 12 blocks of roberta-base \(they cover 14\)"),
    ([0, 6, 4, 2], r"four positive sizes"),
])
def test_a_bad_s4_group_list_is_one_line(sizes: list[int], fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment) as info:
        S4.resolve(load_config("roberta-base"), group_sizes=sizes)
    assert "\n" not in str(info.value)


def test_s4_on_a_model_without_biases_is_one_line() -> None:
    with pytest.raises(SurveyError, match=r"S4's BitFit groups \(G3, G4: blocks 12-23\) of t5-large have no bias"):
        S4.resolve(load_config("t5-large"))


def test_s4_count_at_defaults() -> None:
    """Chapter 05 quotes it; on t5-large S4 is refused (no biases for its BitFit groups)."""
    assert S4.count(load_config("roberta-base")) == 2_008_512


def test_s4_explicit_groups_change_the_count() -> None:
    config, method = load_config("roberta-base"), S4
    assert method.count(config, group_sizes=[3, 3, 3, 3]) != method.count(config)
    assert method.count(config, group_sizes=[2, 4, 4, 2]) == method.count(config)


def test_a_part_that_unfreezes_must_come_before_a_part_that_wraps() -> None:
    parts = (Part("adapter", "houlsby"), Part("bitfit", "bitfit"))
    method = compose("late-bitfit", "late", "a test", None, NOWHERE, "05_hybrid_unified", parts)
    with pytest.raises(SurveyError, match=r"part bitfit must come before part adapter, which wraps module"):
        method.resolve(load_config("tiny-bert"))
