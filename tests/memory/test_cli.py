"""``python -m survey_utils memory``: the JSON object, the text breakdown, one-line errors."""

from __future__ import annotations

import json

import pytest

from survey_utils.cli import main


def test_json_has_the_documented_keys(capsys) -> None:
    assert main(["memory", "--model", "llama-2-7b", "--method", "lora", "--set", "r=16", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    for key in ("weights", "gradients", "optimizer_states", "activations", "total", "assumptions"):
        assert key in payload
    assert payload["total"] > payload["weights"] > 13 * 10**9
    assert isinstance(payload["assumptions"], list) and payload["assumptions"]


def test_simulate_adds_the_simulated_peak(capsys) -> None:
    assert main(["memory", "--model", "tiny-llama", "--method", "lora", "--seq-len", "64", "--simulate", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert abs(payload["relative_error"]) < 0.05 and payload["simulated_peak"] > 0


def test_text_output_prints_terms_and_assumptions(capsys) -> None:
    assert main(["memory", "--model", "tiny-llama", "--method", "full", "--optimizer", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and "assumptions:" in out and "peak allocated" in out


@pytest.mark.parametrize("argv", [
    ["--batch-size", "0"],
    ["--seq-len", "99999"],
    ["--set", "r=0"],
    ["--method", "nope"],
])
def test_bad_values_exit_2_with_one_line(argv, capsys) -> None:
    assert main(["memory", "--model", "tiny-llama", *(argv if "--method" in argv else ["--method", "lora", *argv])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
