"""The registry's contract: hyper-parameter parsing and validation, one registration per method."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from survey_utils.errors import SurveyError
from survey_utils.experiments.ch02_soft_prompts import peft_trainable_at_defaults
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.registry import HyperParam, Method, Taxonomy, register, saves_nothing
from survey_utils.parity import parity
from survey_utils.zoo import load_config


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
                 apply=lambda model, **hp: model, trainable_params=lambda config, **hp: 0,
                 memory_terms=saves_nothing)
    with pytest.raises(SurveyError, match="r=0"):
        register(bad)
    assert "bad-default" not in {m.name for m in list_methods()}


def test_a_peft_method_must_say_how_parity_copies_its_values() -> None:
    lora = get_method("lora")
    orphan = dataclasses.replace(lora, name="orphan", peft_param_map={}, peft_state_sync=None)
    with pytest.raises(ValueError, match="peft_param_map"):
        register(orphan)


def test_no_method_leaves_its_memory_terms_to_chance() -> None:
    """``memory_terms`` is a required field: forgetting it fails at construction, not silently at zero."""
    with pytest.raises(TypeError, match="memory_terms"):
        Method(name="x", title="x", paper="p", arxiv_id=None, taxonomy=Taxonomy("", "", ""), chapter="99",
               hyperparams=(), apply=lambda model, **hp: model, trainable_params=lambda config, **hp: 0)


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_declares_its_memory_terms(method: str) -> None:
    """Each method's terms run at its defaults on a model it applies to and give whole bytes."""
    registered = get_method(method)
    for model in ("llama-2-7b", "roberta-base", "gpt2", "t5-base"):
        config = load_config(model)
        try:
            hp = registered.resolve(config)
        except SurveyError:
            continue
        terms = registered.memory_terms(config, 2, 16, 2, 2, **hp)
        assert isinstance(terms, dict) and all(isinstance(v, int) and v >= 0 for v in terms.values()), method
        return
    pytest.fail(f"{method} applies to none of the models")


PEFT_METHODS = [m.name for m in list_methods() if m.peft_config is not None]


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_defaults_are_pefts_defaults(method: str) -> None:
    """Every hyper-parameter we share with peft's config has peft's default (where peft sets one)."""
    registered = get_method(method)
    config = load_config("llama-2-7b")
    explicit = registered.peft_config(config, **registered.resolve(config))
    defaults = {f.name: f.default for f in dataclasses.fields(explicit) if f.default is not dataclasses.MISSING}
    defaults.update(registered.peft_variant)
    differ = {hp.name: (hp.default, defaults[hp.name]) for hp in registered.hyperparams
              if hp.name in defaults and defaults[hp.name] is not None and hp.default != defaults[hp.name]}
    assert not differ, f"{method}: ours vs peft's default {differ}"


@pytest.mark.slow
@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("model", ["tiny-llama", "gpt2", "roberta-base", "t5-base", "llama-2-7b"])
def test_counts_at_defaults_equal_pefts(method: str, model: str) -> None:
    """Our closed form at our defaults == peft's trainable count with peft's own defaults, on the same model."""
    registered = get_method(method)
    config = load_config(model)
    try:
        ours = registered.count(config)
    except SurveyError:
        pytest.skip(f"{method} does not apply to {model}")
    assert ours == peft_trainable_at_defaults(model, method)


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_every_peft_method_has_output_parity(method: str) -> None:
    """Output parity at the method's defaults on the first tiny model it applies to (the registry drives it)."""
    registered = get_method(method)
    try:
        model = _first_model_for(registered)
    except LookupError as reason:  # e.g. LLaMA-Adapter's 30 adapted layers: its own tests pass a smaller value
        pytest.skip(str(reason))
    report = parity(model, method)
    assert report.ok, report


def _first_model_for(method: Method) -> str:
    for model in ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"):
        try:
            method.resolve(load_config(model))
            return model
        except SurveyError:
            continue
    raise LookupError(f"{method.name} at its defaults applies to no tiny model")


_TORCH_FREE_CHECK = """
import sys
from survey_utils.errors import SurveyError
from survey_utils.methods import list_methods
from survey_utils.zoo import load_config

counted = 0
for model in ("tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "llama-2-7b", "opt-350m", "bloom-560m"):
    config = load_config(model)
    for method in list_methods():
        try:
            hp = method.resolve(config)
        except SurveyError:
            continue  # the method does not apply to this model at its defaults
        method.trainable_params(config, **hp)
        method.added_params(config, **hp)
        method.memory_terms(config, 2, 16, 2, 4, **hp)  # batch 2, 16 positions, bf16 model, fp32 adapter
        for extra in (method.extra_positions, method.gradient_sites, method.largest_trainable_tensor):
            if extra is not None:
                extra(config, **hp)
        if method.default_targets is not None:
            method.default_targets(config)
        counted += 1
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "peft"})
print(counted, heavy)
"""


def test_registry_and_closed_forms_load_without_torch() -> None:
    """``import survey_utils.methods`` and every closed form (counts, memory terms, positions, gradient sites,
    default targets) on zoo configs import neither torch, transformers nor peft: the command line's count
    answers in well under a second."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _TORCH_FREE_CHECK], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    counted, heavy = result.stdout.split(maxsplit=1)
    assert int(counted) >= 7 * 10 and heavy.strip() == "[]", result.stdout


def test_ia3_default_targets_are_peft_s() -> None:
    """The (IA)^3 tables the closed form reads without peft are the installed peft's."""
    from survey_utils.methods import peft_mappings

    assert peft_mappings.from_peft() == {"IA3_TARGET_MODULES": peft_mappings.IA3_TARGET_MODULES,
                                         "IA3_FEEDFORWARD_MODULES": peft_mappings.IA3_FEEDFORWARD_MODULES}, (
        "peft's IA3 mappings changed: python -m survey_utils.methods.peft_mappings > "
        "survey_utils/methods/peft_mappings.py")


# Hyper-parameters that only size a scoring pass inside ``apply`` (FISH mask's and Child-tuning's Fisher examples,
# LT-SFT's first full fine-tuning): the layers it leaves behind are the same whatever the size, and at the defaults
# (1024 backward passes each, 100 AdamW steps) fish_mask and child_tuning took 60 s each here, a tenth of the suite's
# CPU. tests/methods/test_selective.py checks what the scores select.
SCORING_PASS_SIZES = {"num_samples": 4, "full_ft_steps": 4}


@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_runs_forward_and_merged_on_the_odd_tiny_models(method: str) -> None:
    """Applied at its defaults with real tensors, a method's model runs a forward pass, and again after merging
    where it merges, on the two architectures whose layers are odd (T5 reads ``wo.weight``'s dtype, GPT-2 has
    Conv1D): wrappers must behave like the layers they wrap. Llama and BERT are run by the parity tests. A scoring
    pass run inside ``apply`` gets a few examples or steps (``SCORING_PASS_SIZES``), not its default."""
    from survey_utils.counting import apply_method
    from survey_utils.methods.common import merge
    from survey_utils.parity import example_inputs, forward
    from survey_utils.zoo import build_model

    registered = get_method(method)
    scoring = {k: v for k, v in SCORING_PASS_SIZES.items() if k in {h.name for h in registered.hyperparams}}
    ran = 0
    for model in ("tiny-gpt2", "tiny-t5"):
        try:
            built = apply_method(build_model(model, device="cpu", seed=0), registered, **scoring)
        except SurveyError:
            continue
        built.eval()
        inputs = example_inputs(built.config)
        if registered.takes_task_ids:
            inputs["task_ids"] = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.long)
        assert torch.isfinite(forward(built, inputs)).all(), (method, model)
        if registered.mergeable:
            assert torch.isfinite(forward(merge(built), inputs)).all(), (method, model)
        ran += 1
    if ran == 0:
        pytest.skip(f"{method} at its defaults applies to neither tiny-gpt2 nor tiny-t5")
