"""The zoo's stored snapshots (survey_utils.snapshots): fresh, equal to what transformers gives, and used only
while the config is unchanged."""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys

import pytest

from survey_utils import snapshots
from survey_utils.architecture import layout
from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.memory import estimate
from survey_utils.zoo import LightConfig, _read_json, config_path, load_config, to_transformers_config

MODELS = snapshots.snapshot_models()
HEAVY = ("torch", "transformers", "peft")


def test_the_zoo_has_models_without_a_hand_layout() -> None:
    assert len(MODELS) >= 10, MODELS


def test_no_stray_snapshot_files() -> None:
    """One file per such model and nothing else: a stale file would be dead weight in the repository."""
    expected = set()
    for name in MODELS:
        raw = _read_json(config_path(name))
        expected.add(snapshots.snapshot_path(snapshots.snapshot_key(raw, raw.pop("model_type"))).name)
    assert {p.name for p in snapshots.SNAPSHOT_DIR.glob("*")} == expected


@pytest.mark.parametrize("name", MODELS)
def test_stored_snapshot_is_what_a_rebuild_gives_byte_for_byte(name: str) -> None:
    record = snapshots.build_snapshot(name)
    path = snapshots.snapshot_path(record["key"])
    assert path.is_file(), f"no snapshot for {name}: run {snapshots.COMMAND}"
    assert path.read_bytes() == snapshots.encode_snapshot(record), f"stale snapshot for {name}: run {snapshots.COMMAND}"


@pytest.mark.parametrize("name", MODELS)
def test_snapshot_config_holds_transformers_values_and_layout(name: str) -> None:
    import torch

    from survey_utils.generic_layout import generic_layout, transposed_modules

    light = load_config(name)
    assert isinstance(light, LightConfig) and light._snapshot is not None
    full = to_transformers_config(copy.deepcopy(light))
    assert not isinstance(full, LightConfig)
    values = {k: (str(v).split(".")[1] if isinstance(v, torch.dtype) else v) for k, v in vars(full).items()}
    assert light._values == values
    assert light.to_json_string(use_diff=False) == full.to_json_string(use_diff=False)
    stored, built = layout(light), generic_layout(full)
    assert stored == built
    assert transposed_modules(stored) == transposed_modules(built)
    assert stored.total == built.total and stored.active_params == built.active_params


@pytest.mark.parametrize("name", MODELS)
def test_light_and_full_configs_give_the_same_answers(name: str) -> None:
    light = load_config(name)
    full = to_transformers_config(copy.deepcopy(light))
    assert closed_form(light, "full") == closed_form(full, "full")
    assert _estimate_or_refusal(light) == _estimate_or_refusal(full)


def _estimate_or_refusal(config) -> object:
    """The memory estimate, or its one-line refusal."""
    try:
        return estimate(config, "full", {}, batch_size=1, seq_len=256, dtype="bf16")
    except SurveyError as error:
        return str(error)


def test_a_changed_copy_is_built_again() -> None:
    """An edited config is not the stored one: its layout comes from a meta build of the edit."""
    name = next(n for n in MODELS if "pythia" in n)
    light = copy.deepcopy(load_config(name))
    blocks = layout(light).num_layers
    light.num_hidden_layers = 1
    assert layout(light).num_layers == 1 != blocks


def test_a_config_that_matches_no_snapshot_is_answered_exactly(tmp_path) -> None:
    """A config differing in any field (here one that changes no shape) misses the snapshot: transformers'
    class answers, with the same layout."""
    name = next(n for n in MODELS if "pythia" in n)
    raw = _read_json(config_path(name))
    raw["bos_token_id"] = 1
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    other = load_config(path)
    assert not isinstance(other, LightConfig)
    assert layout(other).total == layout(load_config(name)).total


def test_corrupt_or_foreign_snapshot_files_are_ignored(tmp_path, monkeypatch) -> None:
    name = next(n for n in MODELS if "pythia" in n)
    raw = _read_json(config_path(name))
    model_type = raw.pop("model_type")
    key = snapshots.snapshot_key(raw, model_type)
    monkeypatch.setattr(snapshots, "SNAPSHOT_DIR", tmp_path)
    snapshots._read.cache_clear()
    try:
        snapshots.snapshot_path(key).write_bytes(b"not gzip")
        assert snapshots.find_snapshot(raw, model_type) is None
        snapshots.snapshot_path(key).write_bytes(gzip.compress(b'{"key": "another"}'))
        snapshots._read.cache_clear()
        assert snapshots.find_snapshot(raw, model_type) is None
    finally:
        snapshots._read.cache_clear()


def test_keys_follow_the_config_and_the_versions(monkeypatch) -> None:
    raw = {"hidden_size": 8}
    key = snapshots.snapshot_key(raw, "gpt_neox")
    assert snapshots.snapshot_key({"hidden_size": 9}, "gpt_neox") != key
    assert snapshots.snapshot_key(raw, "falcon") != key
    monkeypatch.setattr(snapshots, "_version", lambda package: "0.0")
    assert snapshots.snapshot_key(raw, "gpt_neox") != key


def test_values_json_cannot_hold_round_trip() -> None:
    value = {"s": {"b", "a"}, "t": (1, (2, 3)), "ids": {0: "x", 1: "y"}, "nan": float("inf"), "l": [None, True]}
    assert snapshots._decode(json.loads(json.dumps(snapshots._encode(value)))) == value


@pytest.mark.parametrize("argv", [
    ["advise", "--model", "{model}", "--gpu-memory", "48GB"],
    ["count", "--model", "{model}", "--method", "lora"],
    ["memory", "--model", "{model}", "--method", "lora"],
])
def test_commands_on_snapshot_models_import_no_torch(argv: list[str]) -> None:
    """What makes ``advise`` answer in under a second cold (issue 16; the time is benchmarks/cold_start.py's
    business): no command on these models loads torch, transformers or peft."""
    script = ("import sys\nfrom survey_utils.cli import main\n"
              f"for model in {MODELS!r}:\n"
              f"    main([a.replace('{{model}}', model) for a in {argv!r}])\n"
              "    loaded = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
              "    print(model, loaded)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.split(" ", 1)[0] in MODELS]
    assert [line.split(" ", 1)[1] for line in lines] == ["[]"] * len(MODELS), done.stdout[-2000:] + done.stderr
