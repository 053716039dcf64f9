"""Output parity on sequence-classification layouts: a classifier whose config has no pad token (transformers refuses
a batch of more than one row without one) is checked on a copy that has one, with both example rows; an
encoder-decoder classifier gets rows that end in its end-of-sequence token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from survey_utils.counting import three_way
from survey_utils.parity import example_inputs, parity, with_pad_token
from survey_utils.zoo import build_model, config_path, load_config


def classifier_config(tmp_path: Path, name: str = "tiny-llama", architecture: str = "LlamaForSequenceClassification",
                      **fields: object) -> str:
    """The zoo's config ``name`` as a ``architecture`` with 3 labels and no pad token, written to a file."""
    raw = json.loads(config_path(name).read_text(encoding="utf-8"))
    raw.pop("pad_token_id", None)
    raw.update(architectures=[architecture], num_labels=3, **fields)
    # a file per contents: the zoo caches a config by its path
    path = tmp_path / f"{name}-{architecture}{''.join(f'-{k}={v}' for k, v in fields.items())}.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return str(path)


def test_transformers_refuses_two_rows_without_a_pad_token(tmp_path: Path) -> None:
    """What parity ran into: the head cannot find each row's last token without a pad token."""
    config = load_config(classifier_config(tmp_path))
    assert getattr(config, "pad_token_id", None) is None
    model = build_model(config, device="cpu", seed=0)
    inputs = example_inputs(config)
    assert len(inputs["input_ids"]) == 2
    with pytest.raises(ValueError, match="padding token"), torch.no_grad():
        model(**inputs)


@pytest.mark.parametrize(("name", "architecture", "method"), [
    ("tiny-llama", "LlamaForSequenceClassification", "lora"),
    ("tiny-llama", "LlamaForSequenceClassification", "prompt_tuning"),
    ("tiny-llama", "LlamaForSequenceClassification", "ia3"),
    ("tiny-gpt2", "GPT2ForSequenceClassification", "lora"),
    # scores each row's last end-of-sequence token and builds its decoder ids itself (example_inputs' docstring)
    ("tiny-t5", "T5ForSequenceClassification", "lora"),
])
def test_parity_passes_on_a_classifier_without_a_pad_token(tmp_path: Path, name: str, architecture: str,
                                                           method: str) -> None:
    config = load_config(classifier_config(tmp_path, name, architecture))
    pad = getattr(config, "pad_token_id", None)  # None but for T5, whose config class pads with 0
    report = parity(config, method)
    assert report.ok, report
    assert report.model == config.model_type  # a short name, not the config's JSON
    assert getattr(config, "pad_token_id", None) == pad, "the caller's config is left as it was"


def test_three_way_counts_a_classifier_without_a_pad_token(tmp_path: Path) -> None:
    row = three_way(classifier_config(tmp_path), "lora", r=2)
    assert row["match"], row


def test_the_pad_token_is_the_configs_own_and_only_where_a_classifier_needs_one(tmp_path: Path) -> None:
    config = load_config(classifier_config(tmp_path))
    edited = with_pad_token(config)
    assert edited is not config and edited.pad_token_id == config.eos_token_id
    assert edited.num_labels == config.num_labels and edited.vocab_size == config.vocab_size
    no_special = load_config(classifier_config(tmp_path, eos_token_id=None, bos_token_id=None))
    assert with_pad_token(no_special).pad_token_id == 0  # any token of the vocabulary does
    with_pad = load_config(classifier_config(tmp_path, pad_token_id=5))
    assert with_pad_token(with_pad) is with_pad
    base = load_config("tiny-llama")  # no head: nothing to find, nothing changed
    assert getattr(base, "pad_token_id", None) is None and with_pad_token(base) is base
    token = load_config(classifier_config(tmp_path, architecture="LlamaForTokenClassification"))
    assert with_pad_token(token) is token  # a token classifier scores every position
