"""The zoo: every config builds, counts match their published totals, bad input fails in one line."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from survey_utils.architecture import total_params
from survey_utils.errors import SurveyError
from survey_utils.zoo import MODELS_DIR, build_model, list_models, load_config, load_pretrained

REQUIRED = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "bert-base-uncased", "roberta-base", "roberta-large",
            "t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b", "opt-350m", "opt-6.7b", "bloom-560m",
            "bloom-7b1", "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
            "llama-3.1-405b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-72b",
            "tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"]


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
