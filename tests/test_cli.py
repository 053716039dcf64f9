"""The CLI: reference output, JSON keys, listing commands, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from survey_utils.cli import main
from survey_utils.zoo import config_path

REFERENCE = ["count", "--model", "llama-2-7b", "--method", "lora", "--set", "r=8",
             "--set", "target_modules=q_proj,v_proj", "--json"]


@pytest.mark.parametrize("implementation", ["formula", "scratch", "peft"])
def test_count_reference_json(capsys, implementation: str) -> None:
    assert main([*REFERENCE, "--implementation", implementation]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trainable"] == 4_194_304 and result["total"] == 6_742_609_920
    assert set(result) == {"trainable", "total", "trainable_percent"}


def test_count_as_a_subprocess_exactly_as_documented() -> None:
    out = subprocess.run([sys.executable, "-m", "survey_utils", *REFERENCE], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["trainable"] == 4_194_304


def test_models_and_methods_list(capsys) -> None:
    assert main(["models", "--json"]) == 0
    models = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert models["llama-2-7b"]["total"] == 6_738_415_616
    assert main(["methods", "--json"]) == 0
    assert {"lora", "full"} <= {row["name"] for row in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize(("argv", "fragment"), [
    (["count", "--model", "llama-9b", "--method", "lora"], "unknown model 'llama-9b'"),
    (["count", "--model", "gpt2"], "the following arguments are required: --method"),
    (["count", "--model", "gpt2", "--method", "nope"], "unknown method 'nope'"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "r=0"], "r=0 is below its minimum 1"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "r=-3"], "r=-3 is below its minimum 1"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "r=eight"], "r='eight' is not a valid int"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "target_modules=q_proj"], "target module 'q_proj' not found in gpt2"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "rank=4"], "has no hyper-parameter 'rank'"),
    (["count", "--model", "gpt2", "--method", "lora", "--set", "r"], "must look like name=value"),
    (["count"], "required: --model"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv: list[str], fragment: str) -> None:
    with pytest.raises(SystemExit) if argv[0] == "frobnicate" or "--method" not in argv else _no_exit():
        code = main(argv)
        assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_corrupt_config_file_is_one_line(capsys, tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama", ')
    assert main(["count", "--model", str(bad), "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corrupt config file") and err.count("\n") == 1


def _config_file(tmp_path, folder: str = "model", **fields) -> str:
    """The zoo's tiny-llama config with ``fields`` set (a field set to None is left out), as ``folder/config.json``
    (a new folder for new contents: the zoo caches a config by its path)."""
    raw = {**json.loads(config_path("tiny-llama").read_text(encoding="utf-8")), **fields}
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "config.json"
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(("fields", "expected"), [({"_name_or_path": "acme/tiny-llama"}, "acme/tiny-llama"),
                                                  ({"_name_or_path": None}, "llama"), ({"_name_or_path": ""}, "llama")])
def test_count_names_a_config_file_by_what_it_says(capsys, tmp_path, fields: dict, expected: str) -> None:
    """The model's name is the file's _name_or_path, else its model_type: a short name, not a path or JSON."""
    path = _config_file(tmp_path, **fields)
    for extra in ([], ["--set", "num_labels=3"]):  # a copy of the config (a task head's outputs), named the same
        if extra:
            path = _config_file(tmp_path, "classifier", **fields, architectures=["LlamaForSequenceClassification"])
        assert main(["count", "--model", path, "--method", "lora", *extra]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"model {expected}  method lora  (formula)"


def test_three_way_rows_name_a_config_shortly(tmp_path) -> None:
    """A three_way row printed str(config): transformers' config printed its whole JSON as the model's name."""
    from survey_utils.counting import format_rows, model_name, three_way
    from survey_utils.zoo import load_config, to_transformers_config

    path = _config_file(tmp_path, _name_or_path=None)
    cases = [("tiny-llama", "tiny-llama"), (load_config("tiny-llama"), "tiny-llama"),
             (to_transformers_config(load_config("tiny-llama")), "tiny-llama"), (path, "llama"),
             (load_config(path), "llama"), (to_transformers_config(load_config(path)), "llama")]
    for model, expected in cases:
        assert model_name(model) == expected, model_name(model)
    rows = [three_way(model, "lora", r=2) for model, _ in cases[2::3]]
    assert [row["model"] for row in rows] == ["tiny-llama", "llama"]
    printed = format_rows(rows).splitlines()
    assert len(printed) == 4 and all("{" not in line for line in printed)
    assert printed[2].startswith("tiny-llama ") and printed[3].startswith("llama ")


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("argv", [["models"], ["models", "--json"], ["count"], ["frobnicate"], ["models", "-x"]])
def test_models_and_usage_errors_import_no_torch(argv: list[str]) -> None:
    """Cold start (issue 11): listing the zoo and argparse's errors load neither torch, transformers nor peft.

    A fresh interpreter checks; how long each command takes is benchmarks/cold_start.py's business.
    """
    script = ("import sys\nfrom survey_utils.cli import main\n"
              f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


# --- search (chapter 05's budgeted design search) -----------------------------------------------------------------

SEARCH = ["search", "--model", "roberta-base", "--trainable-budget", "1%", "--memory-budget", "4GiB"]


def test_search_json_is_the_experiments_front(capsys) -> None:
    """The command's JSON is ``search(...)``'s front at the budgets it was given (1% of the model's parameters,
    4 GiB), recomputed here from the experiment module; every front point is inside both budgets."""
    from survey_utils.architecture import total_params
    from survey_utils.experiments.ch05_hybrid import search
    from survey_utils.zoo import load_config

    assert main([*SEARCH, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    config = load_config("roberta-base")
    budget = total_params(config) // 100
    assert out == search(config, budget, 4 * 2**30).as_dict()
    assert out["front"] and all(row["trainable"] <= budget and row["peak_bytes"] <= 4 * 2**30 for row in out["front"])


def test_search_text_lists_the_front(capsys) -> None:
    assert main(SEARCH) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("roberta-base: ") and "Pareto front of" in lines[0]
    assert "named configurations at their defaults:" in lines


@pytest.mark.parametrize(("argv", "fragment"), [
    (["search", "--model", "roberta-base", "--trainable-budget", "1%", "--memory-budget", "4"],
     "memory budget '4' has no unit"),
    (["search", "--model", "roberta-base", "--trainable-budget", "lots", "--memory-budget", "4GiB"],
     "trainable budget 'lots' is not a positive parameter count"),
    (["search", "--model", "roberta-base", "--trainable-budget", "0", "--memory-budget", "4GiB"],
     "trainable budget '0' is not a positive parameter count"),
    (["search", "--model", "roberta-base", "--trainable-budget", "10", "--memory-budget", "4GiB"],
     "trainable budget 10 is below the smallest configuration"),
    (["search", "--model", "roberta-base", "--trainable-budget", "1%", "--memory-budget", "1MiB"],
     "memory budget 0.001 GiB is below the smallest configuration"),
    (["search", "--model", "roberta-bass", "--trainable-budget", "1%", "--memory-budget", "4GiB"],
     "unknown model 'roberta-bass'"),
    (["search", "--model", "roberta-base", "--trainable-budget", "1%", "--memory-budget", "4GiB",
      "--batch-size", "0"], "batch_size=0 must be a positive integer"),
])
def test_search_bad_input_is_one_line_and_exit_2(capsys, argv: list[str], fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_search_without_a_budget_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["search", "--model", "roberta-base", "--memory-budget", "4GiB"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trainable-budget" in err
