"""The zoo: every config builds, counts match their published totals, bad input fails in one line, and the
light config reader agrees with transformers' config classes."""

from __future__ import annotations

import copy
import csv
import inspect
import json
import pickle
import re
import subprocess
import sys

import hypothesis.strategies as st
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from transformers import AutoConfig, PretrainedConfig

from survey_utils import architecture
from survey_utils.architecture import total_params
from survey_utils.errors import SurveyError
from survey_utils.zoo import (
    CONFIG_DEFAULTS,
    CONFIG_DEFAULTS_COMMAND,
    MODELS_DIR,
    LightConfig,
    build_config_defaults,
    build_model,
    config_defaults,
    config_path,
    list_models,
    load_config,
    load_pretrained,
    model_class,
    supports_sdpa,
    to_transformers_config,
)

REQUIRED = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base-uncased", "roberta-base", "roberta-large",
            "t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "opt-350m", "opt-6.7b", "bloom-560m",
            "bloom-7b1", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
            "llama-3.1-405b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b",
            "tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5",
            # issue 12, item 3: current models of the types without a hand layout, and a tiny MoE for real tensors
            "llama-3.2-1b", "llama-3.2-3b", "llama-65b", "gemma-2-2b", "gemma-2-9b", "mixtral-8x7b", "phi-3-mini",
            "qwen3-8b", "mt5-base", "mt0-large", "falcon-7b", "pythia-1b", "gpt-neox-20b", "deepseek-v3",
            "tiny-mixtral"]


def _sources() -> dict[str, dict[str, str]]:
    with (MODELS_DIR / "sources.csv").open(encoding="utf-8") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def test_zoo_has_every_required_model() -> None:
    assert set(REQUIRED) <= set(list_models())


@pytest.mark.parametrize("name", REQUIRED)
def test_every_model_has_a_sources_row(name: str) -> None:
    row = _sources()[name]
    assert row["config_source"] or name.startswith("tiny-")


@pytest.mark.parametrize("name", [n for n, r in _sources().items() if r["published_total"]])
def test_count_matches_published_total(name: str) -> None:
    """Within the rounding the published text implies (rel_tolerance), with the source in sources.csv."""
    row = _sources()[name]
    published, tolerance = int(row["published_total"]), float(row["rel_tolerance"])
    counted = total_params(load_config(name))
    assert row["published_source"], name
    assert abs(counted - published) / published <= tolerance, (name, counted, row["published_text"])


@pytest.mark.parametrize("name", ["llama-3.1-405b", "t5-11b", "bloom-7b1"])
def test_big_models_build_on_meta_for_free(name: str) -> None:
    model = build_model(name)
    parameter = next(model.parameters())
    assert parameter.device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == total_params(load_config(name))


def test_tiny_models_get_real_seeded_tensors() -> None:
    first, second = build_model("tiny-llama", seed=3), build_model("tiny-llama", seed=3)
    assert next(first.parameters()).device.type == "cpu"
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_config_path_is_accepted_anywhere_a_name_is(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text((MODELS_DIR / "tiny-gpt2.json").read_text())
    assert total_params(load_config(str(path))) == total_params(load_config("tiny-gpt2"))


@pytest.mark.parametrize(("content", "fragment"), [
    ("{not json", "corrupt config file"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"architectures": ["LlamaForCausalLM"]}), "no 'model_type'"),
    (json.dumps({"model_type": "llama"}), "no 'architectures'"),
    (json.dumps({"model_type": "no-such-type", "architectures": ["X"]}), "not a valid"),
])
def test_bad_config_files_fail_in_one_line(tmp_path, content: str, fragment: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(SurveyError, match=fragment) as error:
        load_config(str(path))
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_unknown_model_names_the_bad_value_and_the_nearest() -> None:
    with pytest.raises(SurveyError, match=r"unknown model 'llama-2-7': choose|unknown model 'llama-2-7'; .*llama-2-7b"):
        load_config("llama-2-7")


def test_unknown_model_class_is_one_line(tmp_path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2NoSuchHead"]}))
    with pytest.raises(SurveyError, match="GPT2NoSuchHead"):
        build_model(str(path))


def test_from_pretrained_without_weights_falls_back_with_one_line(capsys, tmp_path) -> None:
    model = load_pretrained("tiny-gpt2", weights=tmp_path / "no-weights-here")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "using random init" in lines[0]
    assert next(model.parameters()).device.type == "cpu"


def test_from_pretrained_loads_real_weights_when_present(tmp_path) -> None:
    saved = build_model("tiny-gpt2", seed=7)
    saved.save_pretrained(tmp_path)
    loaded = load_pretrained("tiny-gpt2", weights=tmp_path)
    for a, b in zip(saved.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


# --- The light config: transformers' values without importing transformers ---------------------------------

LIGHT_MODELS = [n for n in list_models() if json.loads((MODELS_DIR / f"{n}.json").read_text())["model_type"]
                in config_defaults()["types"]]


def _architecture_reads() -> list[str]:
    """Every config attribute architecture.py reads (``config.x`` or ``getattr(config, "x"``), found in its source."""
    source = inspect.getsource(architecture)
    names = set(re.findall(r"\bconfig\.([A-Za-z_]\w*)\b(?!\()", source))
    names |= set(re.findall(r"getattr\(config, \"(\w+)\"", source))
    return sorted((names | set(architecture._SIZE_FIELDS)) - {"to_json_string"})


def _fresh_layout(config, monkeypatch: pytest.MonkeyPatch) -> architecture.Layout | str:
    """architecture.layout with empty caches (equal configs cannot share a cached answer), or its refusal."""
    monkeypatch.setattr(architecture, "_CACHE", {})
    monkeypatch.setattr(architecture, "_BY_ID", {})
    try:
        return architecture.layout(config)
    except SurveyError as error:
        return f"refused: {error}"


def _transformers_config(raw: dict, label: str):
    """What load_config gave before the light reader: transformers' class, built from the raw dict."""
    raw = dict(raw)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.name_or_path = label
    return config


def test_config_defaults_are_what_the_installed_transformers_gives() -> None:
    """Regenerating config_defaults.json from the installed transformers gives the committed file."""
    committed = json.loads(CONFIG_DEFAULTS.read_text(encoding="utf-8"))
    assert json.loads(json.dumps(build_config_defaults(), sort_keys=True)) == committed, (
        f"config_defaults.json is stale: run `{CONFIG_DEFAULTS_COMMAND}` and review the diff")
    assert committed["transformers_version"] == transformers.__version__
    assert committed["command"] == CONFIG_DEFAULTS_COMMAND


def test_light_families_are_the_hand_layout_families() -> None:
    assert set(config_defaults()["types"]) == set(architecture._BUILDERS)
    # Other zoo families (issue 12) get transformers' config and the generic layout.
    assert {json.loads(p.read_text())["model_type"] for p in MODELS_DIR.glob("*.json")} <= set(
        config_defaults()["model_types"])


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_config_equals_transformers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same to_dict, same JSON (the layout's cache key), same attributes, same layout module by module."""
    light = load_config(name)
    full = _transformers_config(json.loads(config_path(name).read_text()), name)
    assert isinstance(light, LightConfig) and not isinstance(light, PretrainedConfig)
    assert light.to_dict() == full.to_dict()
    assert light.to_json_string(use_diff=False) == full.to_json_string(use_diff=False)
    for attribute in _architecture_reads() + sorted(full.attribute_map) + ["name_or_path", "num_labels"]:
        assert hasattr(light, attribute) == hasattr(full, attribute), attribute
        assert getattr(light, attribute, None) == getattr(full, attribute, None), attribute
    ours, theirs = _fresh_layout(light, monkeypatch), _fresh_layout(full, monkeypatch)
    assert isinstance(ours, architecture.Layout) and ours == theirs
    assert ours.total == theirs.total and ours.by_component == theirs.by_component


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_missing_optional_keys_give_the_same_config_both_ways(name: str, tmp_path, monkeypatch) -> None:
    """Drop each key that has a default, one at a time: the same config (or the same refusal) both ways."""
    raw = json.loads(config_path(name).read_text())
    for key in sorted(set(raw) - {"model_type", "architectures"}):
        reduced = {k: v for k, v in raw.items() if k != key}
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(reduced))
        try:
            full = _transformers_config(reduced, str(path))
        except Exception:  # noqa: BLE001 - transformers refuses it: so must the light reader
            with pytest.raises(SurveyError, match="is not a valid"):
                load_config(str(path))
            continue
        light = load_config(str(path))
        assert light.to_dict() == full.to_dict(), key
        assert _fresh_layout(light, monkeypatch) == _fresh_layout(full, monkeypatch), key


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_edited_configs_are_read_as_transformers_reads_them(data: st.DataObject, tmp_path) -> None:
    """Any mix of dropped keys and wrong values: both readers accept it with equal configs, or both refuse."""
    name = data.draw(st.sampled_from(LIGHT_MODELS), label="model")
    raw = json.loads(config_path(name).read_text())
    keys = sorted(set(raw) - {"model_type", "architectures"})
    dropped = data.draw(st.sets(st.sampled_from(keys), max_size=4), label="dropped")
    values = st.one_of(st.none(), st.booleans(), st.integers(-2, 64), st.sampled_from([0.5, "x", "", [], {}, [1]]))
    edited = data.draw(st.dictionaries(st.sampled_from(keys), values, max_size=2), label="edited")
    raw = {**{k: v for k, v in raw.items() if k not in dropped}, **edited}
    path = tmp_path / f"edited-{abs(hash(json.dumps(raw, sort_keys=True)))}.json"
    path.write_text(json.dumps(raw))
    try:
        full = _transformers_config(raw, str(path))
    except Exception:  # noqa: BLE001
        full = None
    dtype = raw.get("dtype") if raw.get("dtype") is not None else raw.get("torch_dtype")
    if not isinstance(dtype, (str, type(None))):
        full = None  # transformers keeps a dtype that is no name, then its to_dict() fails or mangles it: refused
    try:
        light = load_config(str(path))
    except SurveyError as error:
        assert full is None, f"the light reader refused what transformers accepts: {error}"
        assert "\n" not in str(error) and str(path) in str(error)
        return
    assert full is not None, "the light reader accepted what transformers refuses"
    assert light.to_dict() == full.to_dict()


def test_reading_the_zoo_and_bad_input_never_imports_torch_or_transformers(tmp_path) -> None:
    """The closed-form path's config reader is torch-free, errors included (a fresh interpreter checks)."""
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"model_type": "llama", ')
    untyped = tmp_path / "untyped.json"
    untyped.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-type", "architectures": ["X"]}))
    script = f"""
import sys
from survey_utils.errors import SurveyError
import json
from survey_utils.zoo import MODELS_DIR, config_defaults, list_models, load_config, supports_sdpa
LIGHT = set(config_defaults()["types"])
for name in list_models():  # the hand-layout families (others get transformers' config: issue 12)
    if json.load(open(MODELS_DIR / (name + ".json")))["model_type"] in LIGHT:
        supports_sdpa(load_config(name))
for bad in ["llama-2-7", {str(corrupt)!r}, {str(untyped)!r}, {str(unknown)!r}]:
    try:
        load_config(bad)
    except SurveyError as error:
        print(error)
print(sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-1] == "[]", out
    assert ["unknown model 'llama-2-7'" in lines[0], "corrupt config file" in lines[1],
            "no 'model_type'" in lines[2], "no model type 'no-such-type'" in lines[3]] == [True] * 4, out


def test_the_zoos_config_is_read_only_and_a_copy_is_not() -> None:
    config = load_config("tiny-llama")
    with pytest.raises(AttributeError, match="read-only"):
        config.use_cache = False
    copied = copy.deepcopy(config)
    copied.use_cache = False
    copied._attn_implementation = "eager"
    assert config.use_cache is True and copied.use_cache is False and copied._attn_implementation == "eager"
    with pytest.raises(Exception, match="hidden_size"):
        copied.hidden_size = "wide"  # type-checked as transformers checks it
    full = to_transformers_config(copied)
    assert full.use_cache is False and full._attn_implementation == "eager"
    assert to_transformers_config(config).use_cache is True
    assert pickle.loads(pickle.dumps(config)) == config


def test_a_built_model_owns_its_config() -> None:
    """Setting a field on a model's config leaves the zoo's shared config as it was (X-LoRA's use_cache once
    leaked into every later load_config(..., full=True) in the same process)."""
    model = build_model("tiny-llama", device="meta")
    model.config.use_cache = False
    assert load_config("tiny-llama", full=True).use_cache is True


def test_full_configs_are_transformers_and_cached() -> None:
    full = load_config("tiny-gpt2", full=True)
    assert isinstance(full, PretrainedConfig) and full is load_config("tiny-gpt2", full=True)
    assert full is to_transformers_config(load_config("tiny-gpt2"))
    assert load_config(full) is full
    assert full.hidden_size == full.n_embd == load_config("tiny-gpt2").hidden_size


def test_a_family_without_a_hand_layout_gets_the_transformers_config(tmp_path) -> None:
    path = tmp_path / "neox.json"
    path.write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    config = load_config(str(path))
    assert isinstance(config, PretrainedConfig) and config.model_type == "gpt_neox"
    assert architecture.layout(config).family == "gpt_neox"  # the generic layout, read from a meta build


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5", "opt-350m", "bloom-560m"])
def test_recorded_sdpa_support_is_the_model_classes(name: str) -> None:
    assert supports_sdpa(load_config(name)) == model_class(load_config(name, full=True))._supports_sdpa
